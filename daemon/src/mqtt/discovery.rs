//! Home Assistant MQTT discovery: one device per daemon with a few sensors read from the
//! retained state topic (the answer service's `StatsSnapshot`), all tied to the availability
//! topic so they go "unavailable" when the daemon does.

use serde_json::{json, Value};

use super::topics::Topics;

/// One sensor: (key in the state, name, unit, device_class, state_class).
type Sensor = (&'static str, &'static str, Option<&'static str>, Option<&'static str>, Option<&'static str>);

const SENSORS: &[Sensor] = &[
    ("ttft_ms", "Time to first token", Some("ms"), Some("duration"), Some("measurement")),
    ("opener_ms", "Opener latency", Some("ms"), Some("duration"), Some("measurement")),
    ("tokens_per_s", "Opener speed", Some("tokens/s"), None, Some("measurement")),
    ("cloud_first_token_ms", "Cloud first token", Some("ms"), Some("duration"), Some("measurement")),
    ("cloud", "Cloud status", None, None, None),
    ("requests", "Requests answered", None, None, Some("total_increasing")),
];

/// Every (topic, retained config payload) to publish.
pub fn configs(t: &Topics, model: &str) -> Vec<(String, Value)> {
    let device = json!({
        "identifiers": [format!("mulmd_{}", t.node)],
        "name": format!("mulmd {}", t.node),
        "manufacturer": "mulmd",
        "model": model,
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    SENSORS
        .iter()
        .map(|(key, name, unit, class, state_class)| {
            let mut c = json!({
                "name": name,
                "unique_id": format!("mulmd_{}_{key}", t.node),
                "state_topic": t.state,
                "value_template": format!("{{{{ value_json.{key} }}}}"),
                "availability_topic": t.status,
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device,
            });
            if let Some(u) = unit {
                c["unit_of_measurement"] = (*u).into();
            }
            if let Some(d) = class {
                c["device_class"] = (*d).into();
            }
            if let Some(s) = state_class {
                c["state_class"] = (*s).into();
            }
            (t.discovery(key), c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sensor_reads_a_field_of_the_state() {
        let t = Topics::new(&crate::config::Config::default().mqtt, "pi5");
        let state = serde_json::to_value(crate::answer::StatsSnapshot::default()).unwrap();
        let configs = configs(&t, "mulm-28m");
        assert_eq!(configs.len(), SENSORS.len());
        for (topic, c) in configs {
            let key = topic.split('/').nth(3).unwrap();
            assert!(state.get(key).is_some(), "{key} is not in the state payload");
            assert_eq!(c["state_topic"], "mulmd/pi5/state");
            assert_eq!(c["availability_topic"], "mulmd/pi5/status");
            assert_eq!(c["value_template"], format!("{{{{ value_json.{key} }}}}"));
        }
    }
}
