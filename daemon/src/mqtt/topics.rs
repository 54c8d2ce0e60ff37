//! The topic layout, in one place (documented in the README):
//!
//! | topic                                  | direction | what                                  |
//! |----------------------------------------|-----------|---------------------------------------|
//! | `<prefix>/<node>/ask`                  | in        | requests for this daemon              |
//! | `$share/<group>/<prefix>/ask`          | in        | fleet requests, split between boards  |
//! | `<prefix>/<node>/answer/<id>`          | out       | replies when the request names no route |
//! | `<prefix>/<node>/status`               | out       | `online` / `offline`, retained (LWT)  |
//! | `<prefix>/<node>/state`                | out       | last answer's figures, retained       |
//! | `<discovery>/sensor/<node>/<key>/config` | out     | Home Assistant discovery, retained    |
//! | `<discovery>/status`                   | in        | Home Assistant's birth message        |

use crate::config::MqttSection;

#[derive(Debug, Clone)]
pub struct Topics {
    pub node: String,
    pub request: String,
    /// The shared-subscription filter, when the daemon is part of a fleet.
    pub fleet_filter: Option<String>,
    /// The fleet's request topic as publishers use it (without `$share/<group>/`).
    pub fleet: String,
    pub status: String,
    pub state: String,
    pub discovery_prefix: String,
    pub birth: String,
    prefix: String,
    answer_base: String,
}

impl Topics {
    pub fn new(c: &MqttSection, node: &str) -> Self {
        let p = &c.prefix;
        Self {
            node: node.to_string(),
            request: format!("{p}/{node}/ask"),
            fleet_filter: (!c.share_group.is_empty()).then(|| format!("$share/{}/{p}/ask", c.share_group)),
            fleet: format!("{p}/ask"),
            status: format!("{p}/{node}/status"),
            state: format!("{p}/{node}/state"),
            discovery_prefix: c.discovery_prefix.clone(),
            birth: format!("{}/status", c.discovery_prefix),
            prefix: p.clone(),
            answer_base: format!("{p}/{node}/answer"),
        }
    }

    /// Where replies go when a request names no route of its own.
    pub fn default_reply(&self, id: &str) -> String {
        format!("{}/{id}", self.answer_base)
    }

    /// True for topics requests arrive on (so a reply is never sent back into them).
    pub fn is_request(&self, topic: &str) -> bool {
        topic == self.request || topic == self.fleet
    }

    /// True for any `<prefix>/…/ask`: some daemon's request topic, or one like it.
    pub fn is_any_request(&self, topic: &str) -> bool {
        topic.strip_prefix(&self.prefix).and_then(|r| r.strip_prefix('/')).is_some_and(|rest| rest == "ask" || rest.ends_with("/ask"))
    }

    pub fn discovery(&self, key: &str) -> String {
        format!("{}/sensor/{}/{key}/config", self.discovery_prefix, self.node)
    }
}

/// This machine's name as one topic level: lower-case letters, digits, '-' and '_'.
pub fn default_node_id() -> String {
    let raw = crate::host::sys::host_name().unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_ascii_lowercase() } else { '_' })
        .take(64)
        .collect();
    if id.is_empty() { "mulmd".into() } else { id }
}

/// Why `topic` cannot be a reply topic, if it cannot.
pub fn check_reply_topic(topic: &str, topics: &Topics) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 512 {
        return Err("reply_to must be a topic of 1 to 512 bytes".into());
    }
    if topic.contains(['+', '#', '\0']) || topic.starts_with('$') {
        return Err(format!("reply_to {topic:?} must be a plain topic: no wildcards '+'/'#' and no leading '$'"));
    }
    // Any daemon's request topic, not only this one's: replies there would be read as
    // requests by every board of the fleet.
    if topics.is_request(topic) || topics.is_any_request(topic) {
        return Err(format!("reply_to {topic:?} is a request topic; replies there would be read as requests"));
    }
    // A request must not be able to make the daemon overwrite its own announcements or
    // Home Assistant's configuration.
    if topic == topics.status || topic == topics.state || topic.starts_with(&format!("{}/", topics.discovery_prefix)) {
        return Err(format!("reply_to {topic:?} is one of mulmd's own or Home Assistant's topics; choose another"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_reply_topic_rules() {
        let c = MqttSection { share_group: "kitchen".into(), ..crate::config::Config::default().mqtt };
        let t = Topics::new(&c, "pi5");
        assert_eq!(t.request, "mulmd/pi5/ask");
        assert_eq!(t.fleet_filter.as_deref(), Some("$share/kitchen/mulmd/ask"));
        assert_eq!(t.default_reply("42"), "mulmd/pi5/answer/42");
        assert_eq!(t.discovery("ttft"), "homeassistant/sensor/pi5/ttft/config");
        assert!(check_reply_topic("home/answers", &t).is_ok());
        assert!(check_reply_topic("mulmd/pi5/answer/ask", &t).is_err(), "any .../ask under the prefix");
        assert!(check_reply_topic("other/pi5/ask", &t).is_ok());
        assert!(check_reply_topic("mulmd/pi5/asking", &t).is_ok());
        for bad in ["", "a/+/b", "a/#", "$SYS/x", "mulmd/pi5/ask", "mulmd/ask", "mulmd/kitchen/ask", "mulmd/pi5/status", "mulmd/pi5/state", "homeassistant/sensor/x/config"] {
            assert!(check_reply_topic(bad, &t).is_err(), "{bad}");
        }
        let id = default_node_id();
        assert!(!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{id}");
    }

    proptest::proptest! {
        #[test]
        fn an_accepted_reply_topic_is_plain_and_not_a_request_or_our_own(topic in "\\PC{0,40}") {
            let c = MqttSection { share_group: "kitchen".into(), ..crate::config::Config::default().mqtt };
            let t = Topics::new(&c, "pi5");
            if check_reply_topic(&topic, &t).is_ok() {
                proptest::prop_assert!(!topic.contains(['+', '#', '\0']) && !topic.starts_with('$'));
                proptest::prop_assert!(!t.is_request(&topic) && !t.is_any_request(&topic));
                proptest::prop_assert!(topic != t.status && topic != t.state && !topic.starts_with("homeassistant/"));
            }
        }
    }
}
