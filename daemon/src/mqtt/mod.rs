//! The MQTT front end for home-automation hubs (MQTT 5 to the broker; requesting clients may
//! speak 3.1.1). Topics are laid out in [`topics`], payloads in [`message`].
//!
//! Routing a reply: the request's MQTT 5 Response Topic (with its Correlation Data echoed),
//! else the payload's `reply_to`, else `<prefix>/<node>/answer/<id>` — Home Assistant's
//! publish action cannot set MQTT 5 properties, so the payload routes must work.
//!
//! QoS and retain: requests are subscribed with QoS 1; `word`, `opener`, `delta` and
//! `correction` replies go out with QoS 0 (the final reply repeats the whole text); `final`
//! and `error` with QoS 1; no reply is ever retained. `status` (`online`, Last Will
//! `offline`) and discovery configs are retained with QoS 1, `state` retained with QoS 0.
//!
//! rumqttc neither waits between reconnects nor restores subscriptions, so the loop here
//! does both: a capped exponential backoff, and on every CONNACK it subscribes again and
//! republishes `online` (and discovery).

pub mod discovery;
pub mod message;
pub mod topics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Transport;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answer::{new_request_id, AnswerEvent, Answerer, Front};
use crate::config::MqttSection;
use crate::host::secrets::{load_word, Secret, SecretError};
use topics::Topics;

/// The systemd credential name of the broker password.
pub const PASSWORD_CREDENTIAL: &str = "mqtt_password";

/// Why the MQTT front could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Password(#[from] SecretError),
    #[error("{0}")]
    Tls(String),
}

pub struct MqttFront {
    cfg: MqttSection,
    topics: Topics,
    answerer: Arc<Answerer>,
    password: Option<Secret>,
}

/// Where one request's replies go.
#[derive(Clone)]
struct Route {
    topic: String,
    correlation: Option<Bytes>,
}

impl MqttFront {
    /// Reads the password (file or credential) now, so a bad one stops start-up.
    pub fn new(cfg: &MqttSection, answerer: Arc<Answerer>) -> Result<Self, MqttError> {
        let file = (!cfg.password_file.as_os_str().is_empty()).then_some(cfg.password_file.as_path());
        let password = load_word(file, PASSWORD_CREDENTIAL, "MQTT password file")?;
        let node = if cfg.node_id.is_empty() { topics::default_node_id() } else { cfg.node_id.clone() };
        let front = Self { topics: Topics::new(cfg, &node), cfg: cfg.clone(), answerer, password };
        front.options()?; // a missing CA file is a start-up error, not a reconnect loop
        Ok(front)
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    fn options(&self) -> Result<MqttOptions, MqttError> {
        let c = &self.cfg;
        let client_id = if c.client_id.is_empty() { format!("mulmd-{}", self.topics.node) } else { c.client_id.clone() };
        let mut o = MqttOptions::new(client_id, c.host.clone(), c.port);
        o.set_keep_alive(Duration::from_secs(c.keep_alive_s));
        // A fresh session each time: a question asked while the daemon was away is stale by
        // the time it could be answered, so the broker should not queue it.
        o.set_clean_start(true);
        o.set_max_packet_size(Some(c.max_packet_bytes));
        o.set_connection_timeout(10);
        // Words are small publishes a few ms apart: with Nagle's algorithm on, each would wait
        // for the broker's ACK of the one before (the gRPC front lost ~30 ms per answer so).
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        o.set_network_options(net);
        o.set_last_will(LastWill::new(&self.topics.status, "offline", QoS::AtLeastOnce, true, None));
        if !c.username.is_empty() || self.password.is_some() {
            o.set_credentials(c.username.clone(), self.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default());
        }
        if c.tls {
            crate::host::tls::install_crypto();
            let ca = crate::host::tls::read_ca(&c.ca_file, "mqtt.ca_file").map_err(MqttError::Tls)?;
            o.set_transport(Transport::tls(ca, None, None));
        }
        Ok(o)
    }

    /// Serves until `stop`, then stops taking requests, lets in-flight answers finish within
    /// `grace`, publishes `offline` and disconnects.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, grace: Duration) -> Result<(), MqttError> {
        let (client, mut events) = AsyncClient::new(self.options()?, 256);
        // Every answer runs as a task of this tracker, so the stop can wait for them.
        let answers = TaskTracker::new();
        let mut backoff = Backoff::new(self.cfg.reconnect_min_ms, self.cfg.reconnect_max_ms);
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if failures > 0 {
                            tracing::info!(attempts = failures, "reconnected to the MQTT broker");
                        } else {
                            tracing::info!(broker = %format!("{}:{}", self.cfg.host, self.cfg.port), node = %self.topics.node, "connected to the MQTT broker");
                        }
                        failures = 0;
                        backoff.reset();
                        tokio::spawn(self.clone().on_connected(client.clone()));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => self.dispatch(p, &client, &answers),
                    Ok(_) => {}
                    Err(e) => {
                        failures += 1;
                        let wait = backoff.next();
                        // One warning per outage; the retries after it are debug lines.
                        if failures == 1 {
                            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT broker unreachable; reconnecting with backoff");
                        } else {
                            tracing::debug!(error = %e, attempt = failures, retry_in_ms = wait.as_millis() as u64, "MQTT reconnect failed");
                        }
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
            }
        }
        // Stop taking requests, then keep the connection turning while answers finish.
        let _ = client.try_unsubscribe(self.topics.request.clone());
        if let Some(f) = &self.topics.fleet_filter {
            let _ = client.try_unsubscribe(f.clone());
        }
        answers.close();
        let deadline = tokio::time::Instant::now() + grace;
        let drained = pump_until(&mut events, deadline, answers.wait()).await;
        if !drained {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "MQTT answers outlived the grace period");
        }
        let _ = client.publish(self.topics.status.clone(), QoS::AtLeastOnce, true, "offline").await;
        let _ = client.disconnect().await;
        // Flush the last publishes and the DISCONNECT, which suppresses the Last Will. The
        // Outgoing event comes before the bytes are flushed, so keep polling until the broker
        // closes the connection (its answer to DISCONNECT), or give up after a few seconds.
        let flush_until = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Ok(_)) = tokio::time::timeout_at(flush_until, events.poll()).await {}
        tracing::info!("MQTT front stopped");
        Ok(())
    }

    /// After every CONNACK: subscribe (sessions are clean), announce, and describe.
    async fn on_connected(self: Arc<Self>, client: AsyncClient) {
        let t = &self.topics;
        let mut filters = vec![t.request.clone()];
        filters.extend(t.fleet_filter.clone());
        if self.cfg.discovery {
            filters.push(t.birth.clone());
        }
        for f in filters {
            if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                tracing::warn!(filter = %f, error = %e, "MQTT subscribe failed");
            }
        }
        let _ = client.publish(t.status.clone(), QoS::AtLeastOnce, true, "online").await;
        if self.cfg.discovery {
            self.publish_discovery(&client).await;
        }
        self.publish_state(&client).await;
    }

    async fn publish_discovery(&self, client: &AsyncClient) {
        for (topic, config) in discovery::configs(&self.topics, &self.answerer.model_name()) {
            let _ = client.publish(topic, QoS::AtLeastOnce, true, config.to_string()).await;
        }
    }

    async fn publish_state(&self, client: &AsyncClient) {
        let body = serde_json::to_string(&self.answerer.stats().snapshot()).unwrap_or_default();
        let _ = client.publish(self.topics.state.clone(), QoS::AtMostOnce, true, body).await;
    }

    /// Handles one incoming publish without blocking the event loop.
    fn dispatch(self: &Arc<Self>, p: Publish, client: &AsyncClient, answers: &TaskTracker) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if topic == self.topics.birth {
            if self.cfg.discovery && p.payload.as_ref() == b"online" {
                tracing::info!("Home Assistant came online; republishing discovery");
                let (me, client) = (self.clone(), client.clone());
                tokio::spawn(async move { me.publish_discovery(&client).await });
            }
            return;
        }
        if !self.topics.is_request(&topic) {
            return;
        }
        let arrived = Instant::now();
        let props = p.properties.unwrap_or_default();
        let v5_route = props.response_topic.filter(|t| topics::check_reply_topic(t, &self.topics).is_ok()).map(|topic| Route { topic, correlation: props.correlation_data.clone() });
        let (me, client) = (self.clone(), client.clone());
        let (request, route) = match message::parse(&p.payload, self.cfg.max_request_bytes) {
            Err(bad) => {
                let route = v5_route.or_else(|| me.payload_route(bad.reply_to.as_deref(), bad.id.as_deref()).ok());
                tracing::warn!(topic = %topic, bytes = p.payload.len(), reply_sent = route.is_some(), error = %bad.message, "rejected an MQTT request");
                if let Some(route) = route {
                    let body = message::error_body(bad.id.as_deref().unwrap_or(""), &me.topics.node, "bad_request", &bad.message);
                    answers.spawn(async move { publish(&client, &route, body, true, me.cfg.max_packet_bytes).await });
                }
                return;
            }
            Ok(req) => {
                let route = match v5_route {
                    Some(r) => Ok(r),
                    None => me.payload_route(req.reply_to.as_deref(), req.id.as_deref()),
                };
                (req, route)
            }
        };
        match route {
            Ok(route) => {
                answers.spawn(async move { me.answer(request, route, arrived, &client).await });
            }
            Err(why) => {
                // The reply_to was refused; the id's own answer topic still reaches the asker.
                let fallback = request.id.as_deref().map(|id| Route { topic: me.topics.default_reply(id), correlation: None });
                tracing::warn!(topic = %topic, reply_sent = fallback.is_some(), error = %why, "rejected an MQTT request");
                if let Some(route) = fallback {
                    let body = message::error_body(request.id.as_deref().unwrap_or(""), &me.topics.node, "bad_request", &why);
                    answers.spawn(async move { publish(&client, &route, body, true, me.cfg.max_packet_bytes).await });
                }
            }
        }
    }

    /// The route named in the payload, or the default reply topic for the id.
    fn payload_route(&self, reply_to: Option<&str>, id: Option<&str>) -> Result<Route, String> {
        match (reply_to, id) {
            (Some(t), _) => topics::check_reply_topic(t, &self.topics).map(|_| Route { topic: t.to_string(), correlation: None }),
            (None, Some(id)) => Ok(Route { topic: self.topics.default_reply(id), correlation: None }),
            (None, None) => Err("the request has neither an id, a reply_to nor an MQTT 5 response topic".into()),
        }
    }

    async fn answer(&self, req: message::Request, route: Route, arrived: Instant, client: &AsyncClient) {
        let id = req.id.clone().unwrap_or_else(new_request_id);
        let node = &self.topics.node;
        let request = match self.answerer.admit_conversation(id.clone(), Front::Mqtt, arrived, req.conversation, req.conversation_id, &req.options) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(id = %id, code = e.code(), error = %e, "refused an MQTT request");
                return publish(client, &route, message::error_body(&id, node, e.code(), &e.to_string()), true, self.cfg.max_packet_bytes).await;
            }
        };
        let mut events = self.answerer.answer(request);
        while let Some(ev) = events.next().await {
            let done = matches!(ev, AnswerEvent::Done(_));
            if let Some((body, terminal)) = message::reply(&id, node, &ev, req.stream, self.cfg.stream_words) {
                publish(client, &route, body, terminal, self.cfg.max_packet_bytes).await;
            }
            if done {
                self.publish_state(client).await;
            }
        }
    }
}

/// Publishes one reply: QoS 1 for terminal replies, QoS 0 otherwise; never retained; at most
/// `max_packet` bytes in all (see `message::encode`).
async fn publish(client: &AsyncClient, route: &Route, body: Value, terminal: bool, max_packet: u32) {
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        correlation_data: route.correlation.clone(),
        ..Default::default()
    };
    let qos = if terminal { QoS::AtLeastOnce } else { QoS::AtMostOnce };
    // The packet's topic and properties take room beside the payload.
    let limit = (max_packet as usize).saturating_sub(route.topic.len() + 512);
    if let Err(e) = client.publish_with_properties(route.topic.clone(), qos, false, message::encode(body, limit), props).await {
        tracing::warn!(topic = %route.topic, error = %e, "MQTT reply could not be queued");
    }
}

/// Polls the event loop (so queued publishes go out) until `done` resolves or `deadline`
/// passes; true when `done` resolved.
async fn pump_until(events: &mut EventLoop, deadline: tokio::time::Instant, done: impl std::future::Future<Output = ()>) -> bool {
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => return true,
            _ = tokio::time::sleep_until(deadline) => return false,
            ev = events.poll() => {
                if ev.is_err() {
                    // Disconnected while draining: wait a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Capped exponential backoff: min, 2·min, 4·min, … up to max.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Self {
        let min = Duration::from_millis(min_ms.max(1));
        Self { min, max: Duration::from_millis(max_ms.max(min_ms)), next: min }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(500, 3000);
        let waits: Vec<u64> = (0..6).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 3000, 3000, 3000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(500));
    }
}
