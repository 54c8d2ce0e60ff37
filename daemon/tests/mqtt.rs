//! The MQTT front against a real Mosquitto broker (installed by scripts/bootstrap-system,
//! started here on a free port): 3.1.1 and 5 clients, payload and MQTT 5 routes, bad
//! payloads, availability and Last Will, a broker restart, a fleet sharing one request topic,
//! and Home Assistant discovery.

mod common;

use common::broker::Broker;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use mulmd::config::Config;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SHOES: &str = "How do I remove odor from inside my shoes?";
const OPENER: &str = "Removing odor from inside your shoes is a";
const WAIT: Duration = Duration::from_secs(90);

/// A daemon with only its MQTT front, in-process.
struct Daemon {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start(port: u16, node: &str, tune: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = common::fixture("smollm2")?;
        let mut config = Config::default();
        config.model.dir = dir;
        config.grpc.listen = String::new();
        config.grpc.grace_period_ms = 5000;
        let m = &mut config.mqtt;
        m.enabled = true;
        m.port = port;
        m.node_id = node.into();
        m.reconnect_min_ms = 100;
        m.reconnect_max_ms = 500;
        tune(&mut config);
        let prepared = tokio::task::spawn_blocking(move || mulmd::daemon::prepare(config)).await.unwrap().unwrap();
        let listeners = mulmd::daemon::bind(&prepared.config).await.unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let done = tokio::spawn(async move { mulmd::daemon::run(prepared, listeners, s.cancelled_owned()).await.unwrap() });
        // The daemon subscribes, then announces `online` on the same connection, so once
        // `online` is seen its subscriptions are live: a request sent earlier could reach
        // the broker first and be dropped with no subscriber to take it.
        let status = format!("mulmd/{node}/status");
        static WATCHERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = WATCHERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut watcher = Client::v311(port, &format!("ready-{node}-{id}"), &[&status]).await;
        while watcher.on(&status).await.payload.as_ref() != b"online" {}
        Some(Self { stop, done })
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.done).await.expect("the daemon stops within its grace period").unwrap();
    }
}

/// One received message, from either protocol version.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Bytes,
    retain: bool,
    qos: u8,
    correlation: Option<Bytes>,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("reply on {} is not JSON ({e}): {:?}", self.topic, self.payload))
    }
}

/// Publishes (topic, payload, optional MQTT 5 response topic and correlation data).
type Publisher = Box<dyn Fn(String, Vec<u8>, Option<(String, Bytes)>) + Send + Sync>;

/// A test client that subscribes, waits for the SUBACK, and hands out what arrives.
struct Client {
    publish: Publisher,
    rx: mpsc::UnboundedReceiver<Msg>,
}

impl Client {
    /// An MQTT 3.1.1 client: what Home Assistant and most hubs speak.
    async fn v311(port: u16, name: &str, filters: &[&str]) -> Self {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg { topic: p.topic.clone(), payload: p.payload.clone(), retain: p.retain, qos: p.qos as u8, correlation: None });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
            tokio::time::timeout(WAIT, ack_rx.recv()).await.expect("SUBACK");
        }
        let c = client.clone();
        let publish = Box::new(move |topic: String, payload: Vec<u8>, _v5: Option<(String, Bytes)>| {
            c.try_publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
        });
        Self { publish, rx }
    }

    /// An MQTT 5 client, which can ask for replies on a Response Topic with Correlation Data.
    async fn v5(port: u16, name: &str, filters: &[&str]) -> Self {
        use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_max_packet_size(Some(1 << 20));
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let correlation = p.properties.as_ref().and_then(|pr| pr.correlation_data.clone());
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let _ = tx.send(Msg { topic, payload: p.payload.clone(), retain: p.retain, qos: p.qos as u8, correlation });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
            tokio::time::timeout(WAIT, ack_rx.recv()).await.expect("SUBACK");
        }
        let c = client.clone();
        let publish = Box::new(move |topic: String, payload: Vec<u8>, v5: Option<(String, Bytes)>| {
            let props = v5.map(|(response_topic, correlation_data)| PublishProperties {
                response_topic: Some(response_topic),
                correlation_data: Some(correlation_data),
                ..Default::default()
            });
            match props {
                Some(p) => c.try_publish_with_properties(topic, QoS::AtLeastOnce, false, payload, p).unwrap(),
                None => c.try_publish(topic, QoS::AtLeastOnce, false, payload).unwrap(),
            }
        });
        Self { publish, rx }
    }

    fn send(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        (self.publish)(topic.into(), payload.into(), None);
    }

    fn send_v5(&self, topic: &str, payload: impl Into<Vec<u8>>, response_topic: &str, correlation: &[u8]) {
        (self.publish)(topic.into(), payload.into(), Some((response_topic.into(), Bytes::copy_from_slice(correlation))));
    }

    async fn next(&mut self) -> Msg {
        tokio::time::timeout(WAIT, self.rx.recv()).await.expect("a message within the wait").unwrap()
    }

    /// Messages up to and including the first `final` or `error` reply.
    async fn answer(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            let t = m.json()["type"].as_str().unwrap_or_default().to_string();
            out.push(m);
            if t == "final" || t == "error" {
                return out;
            }
        }
    }

    /// The next message on `topic`, skipping others.
    async fn on(&mut self, topic: &str) -> Msg {
        loop {
            let m = self.next().await;
            if m.topic == topic {
                return m;
            }
        }
    }
}

fn types(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().map(|m| m.json()["type"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_home_assistant_style_publish_gets_the_opener_then_the_rest_on_the_default_topic() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |_| {}).await else { return };
    let mut c = Client::v311(broker.port, "ha", &["mulmd/pi5/answer/#", "mulmd/pi5/status"]).await;
    assert_eq!(c.on("mulmd/pi5/status").await.payload.as_ref(), b"online");
    c.send("mulmd/pi5/ask", json!({"id": "kitchen-1", "query": SHOES}).to_string());
    let msgs = c.answer().await;
    let kinds = types(&msgs);
    assert_eq!(kinds[0], "opener", "{kinds:?}");
    assert_eq!(kinds.last().unwrap(), "final");
    assert!(kinds[1..kinds.len() - 1].iter().all(|k| k == "delta"), "{kinds:?}");
    assert!(msgs.iter().all(|m| m.topic == "mulmd/pi5/answer/kitchen-1" && !m.retain));
    let opener = msgs[0].json();
    assert_eq!(opener["text"], OPENER);
    assert!(opener["ttft_ms"].as_f64().unwrap() > 0.0);
    let last = msgs.last().unwrap();
    assert_eq!(last.qos, 1, "the final reply is sent with QoS 1");
    let f = last.json();
    assert_eq!((f["id"].as_str(), f["node"].as_str()), (Some("kitchen-1"), Some("pi5")));
    assert_eq!(f["opener"], OPENER);
    let text = f["text"].as_str().unwrap();
    let deltas: String = msgs[1..msgs.len() - 1].iter().map(|m| m.json()["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(text, format!("{OPENER}{deltas}"), "the final text is the opener plus every delta");
    assert_eq!(f["fallback"]["reason"], "not_configured");
    d.stop().await;
}

#[tokio::test]
async fn reply_to_in_the_payload_routes_the_answer_and_stream_false_sends_only_the_final() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |_| {}).await else { return };
    let mut c = Client::v311(broker.port, "hub", &["home/answers"]).await;
    c.send("mulmd/pi5/ask", json!({"id": 7, "query": SHOES, "reply_to": "home/answers", "stream": false, "options": {"cloud": false}}).to_string());
    let msgs = c.answer().await;
    assert_eq!(types(&msgs), ["final"]);
    let f = msgs[0].json();
    assert_eq!(f["id"], "7");
    assert_eq!(f["fallback"]["reason"], "disabled");
    d.stop().await;
}

#[tokio::test]
async fn an_mqtt5_response_topic_gets_every_reply_with_its_correlation_data() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |c| c.mqtt.stream_words = true).await else { return };
    let mut c = Client::v5(broker.port, "app", &["app/inbox"]).await;
    // No id at all: the MQTT 5 route is enough.
    c.send_v5("mulmd/pi5/ask", json!({"query": SHOES}).to_string(), "app/inbox", b"corr-123");
    let msgs = c.answer().await;
    let kinds = types(&msgs);
    assert_eq!(kinds.iter().filter(|k| *k == "word").count(), 8, "{kinds:?}");
    assert_eq!(kinds[8], "opener", "{kinds:?}");
    assert!(msgs.iter().all(|m| m.topic == "app/inbox" && m.correlation.as_deref() == Some(&b"corr-123"[..])));
    let ids: BTreeSet<String> = msgs.iter().map(|m| m.json()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 1, "one generated id on every reply: {ids:?}");
    d.stop().await;
}

#[tokio::test]
async fn malformed_payloads_get_error_replies_and_the_daemon_keeps_answering() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |c| c.mqtt.max_request_bytes = 1000).await else { return };
    let mut c = Client::v5(broker.port, "tester", &["errs/#", "mulmd/pi5/answer/#"]).await;
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("bad-json", b"{this is not json".to_vec(), true, "not JSON"),
        ("bad-utf8", vec![0xff, 0xfe, b'{', b'}'], true, "UTF-8"),
        ("oversized", json!({"id": "big", "query": "x".repeat(2000)}).to_string().into_bytes(), true, "mqtt.max_request_bytes"),
        ("wrong-type", json!({"id": "w1", "query": 5, "reply_to": "errs/wrong-type"}).to_string().into_bytes(), false, "malformed"),
        ("bad-option", json!({"id": "w2", "query": "Hi?", "reply_to": "errs/bad-option", "options": {"max_words": 999}}).to_string().into_bytes(), false, "max_words_limit"),
        ("empty", json!({"id": "w3", "query": "  ", "reply_to": "errs/empty"}).to_string().into_bytes(), false, "empty"),
    ];
    for (name, payload, v5, _) in &cases {
        if *v5 {
            c.send_v5("mulmd/pi5/ask", payload.clone(), &format!("errs/{name}"), name.as_bytes());
        } else {
            c.send("mulmd/pi5/ask", payload.clone());
        }
    }
    let mut errors = BTreeMap::new();
    while errors.len() < cases.len() {
        let m = c.next().await;
        let v = m.json();
        assert_eq!(v["type"], "error", "{v}");
        errors.insert(m.topic.trim_start_matches("errs/").to_string(), v);
    }
    for (name, _, _, needle) in &cases {
        let msg = errors[*name]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    assert_eq!(errors["wrong-type"]["id"], "w1");
    assert_eq!(errors["wrong-type"]["code"], "bad_request");
    assert_eq!(errors["bad-option"]["code"], "invalid_options");
    // An oversize request with only an id: its error goes to the id's own answer topic.
    c.send("mulmd/pi5/ask", json!({"id": "big2", "query": "x".repeat(2000)}).to_string());
    let v = c.on("mulmd/pi5/answer/big2").await.json();
    assert!(v["type"] == "error" && v["message"].as_str().unwrap().contains("mqtt.max_request_bytes"), "{v}");
    // A reply_to that is another daemon's request topic is refused; the asker still hears why.
    c.send("mulmd/pi5/ask", json!({"id": "r1", "query": "Hi?", "reply_to": "mulmd/kitchen/ask"}).to_string());
    let v = c.on("mulmd/pi5/answer/r1").await.json();
    assert!(v["type"] == "error" && v["message"].as_str().unwrap().contains("request topic"), "{v}");
    // Larger than mqtt.max_packet_bytes: MQTT 5 has the broker drop it before it reaches
    // mulmd (no reply is possible); the connection stays up.
    c.send("mulmd/pi5/ask", json!({"id": "huge", "query": "x".repeat(70_000)}).to_string());
    // A payload with no route at all is only logged; the loop goes on and answers the next.
    c.send("mulmd/pi5/ask", b"garbage".to_vec());
    c.send("mulmd/pi5/ask", json!({"id": "ok", "query": SHOES, "stream": false}).to_string());
    let m = c.on("mulmd/pi5/answer/ok").await;
    assert_eq!(m.json()["type"], "final");
    d.stop().await;
}

#[tokio::test]
async fn availability_is_retained_online_then_offline_on_stop_and_by_last_will_on_a_crash() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |_| {}).await else { return };
    let mut watcher = Client::v311(broker.port, "w1", &["mulmd/pi5/status"]).await;
    assert_eq!(watcher.on("mulmd/pi5/status").await.payload.as_ref(), b"online");
    // A late subscriber still learns the state: it is retained.
    let mut late = Client::v311(broker.port, "w2", &["mulmd/pi5/status"]).await;
    let m = late.on("mulmd/pi5/status").await;
    assert!(m.retain && m.payload.as_ref() == b"online");
    d.stop().await;
    assert_eq!(watcher.on("mulmd/pi5/status").await.payload.as_ref(), b"offline");

    // A daemon that vanishes without a word: the broker publishes its Last Will.
    let Some(d) = Daemon::start(broker.port, "pi5", |c| c.mqtt.keep_alive_s = 5).await else { return };
    assert_eq!(watcher.on("mulmd/pi5/status").await.payload.as_ref(), b"online");
    d.done.abort();
    let _ = d.done.await;
    let m = watcher.on("mulmd/pi5/status").await;
    assert_eq!(m.payload.as_ref(), b"offline");
    let mut late = Client::v311(broker.port, "w3", &["mulmd/pi5/status"]).await;
    assert_eq!(late.on("mulmd/pi5/status").await.payload.as_ref(), b"offline", "the Last Will is retained");
}

#[tokio::test]
async fn after_a_broker_restart_the_daemon_reconnects_resubscribes_and_answers() {
    let Some(mut broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |_| {}).await else { return };
    let mut c = Client::v311(broker.port, "before", &["mulmd/pi5/status"]).await;
    assert_eq!(c.on("mulmd/pi5/status").await.payload.as_ref(), b"online");
    broker.restart();
    // The new broker knows nothing (no persistence): "online" can only come from a reconnect.
    let mut c = Client::v311(broker.port, "after", &["mulmd/pi5/status", "mulmd/pi5/answer/#"]).await;
    assert_eq!(c.on("mulmd/pi5/status").await.payload.as_ref(), b"online");
    // Subscriptions are restored right after "online"; ask until the request lands.
    c.send("mulmd/pi5/ask", json!({"id": "again", "query": SHOES, "stream": false}).to_string());
    let m = c.on("mulmd/pi5/answer/again").await;
    assert_eq!(m.json()["opener"], OPENER);
    d.stop().await;
}

#[tokio::test]
async fn a_shared_subscription_splits_fleet_requests_between_two_daemons() {
    let Some(broker) = Broker::start() else { return };
    let Some(a) = Daemon::start(broker.port, "board-a", |c| c.mqtt.share_group = "fleet".into()).await else { return };
    let Some(b) = Daemon::start(broker.port, "board-b", |c| c.mqtt.share_group = "fleet".into()).await else { return };
    let mut c = Client::v311(broker.port, "fleet-client", &["fleet/answers", "mulmd/+/status"]).await;
    let mut online = BTreeSet::new();
    while online.len() < 2 {
        let m = c.next().await;
        if m.payload.as_ref() == b"online" {
            online.insert(m.topic.clone());
        }
    }
    let n = 6;
    for i in 0..n {
        c.send("mulmd/ask", json!({"id": format!("q{i}"), "query": SHOES, "reply_to": "fleet/answers", "stream": false}).to_string());
    }
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while by_id.values().map(Vec::len).sum::<usize>() < n {
        let m = c.on("fleet/answers").await;
        let v = m.json();
        assert_eq!(v["type"], "final", "{v}");
        by_id.entry(v["id"].as_str().unwrap().into()).or_default().push(v["node"].as_str().unwrap().into());
    }
    assert_eq!(by_id.len(), n, "every request answered exactly once: {by_id:?}");
    let nodes: BTreeSet<&String> = by_id.values().flatten().collect();
    assert_eq!(nodes.len(), 2, "both boards took a share: {by_id:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn home_assistant_discovery_is_published_and_republished_when_home_assistant_starts() {
    let Some(broker) = Broker::start() else { return };
    let Some(d) = Daemon::start(broker.port, "pi5", |c| c.mqtt.discovery = true).await else { return };
    let mut ha = Client::v311(broker.port, "homeassistant", &["homeassistant/sensor/pi5/+/config", "mulmd/pi5/state"]).await;
    let mut configs = BTreeMap::new();
    while configs.len() < 6 {
        let m = ha.next().await;
        if m.topic.ends_with("/config") {
            configs.insert(m.topic.clone(), m.json());
        }
    }
    // Retained, so a Home Assistant that subscribes later still finds the device.
    let mut late = Client::v311(broker.port, "late-ha", &["homeassistant/sensor/pi5/+/config"]).await;
    assert!(late.next().await.retain, "discovery configs are retained");
    let ttft = &configs["homeassistant/sensor/pi5/ttft_ms/config"];
    assert_eq!(ttft["state_topic"], "mulmd/pi5/state");
    assert_eq!(ttft["availability_topic"], "mulmd/pi5/status");
    assert_eq!(ttft["device"]["identifiers"][0], "mulmd_pi5");
    // Home Assistant restarts and announces itself: the daemon describes itself again.
    ha.send("homeassistant/status", "online");
    let mut again = BTreeSet::new();
    while again.len() < 6 {
        let m = ha.next().await;
        if m.topic.ends_with("/config") {
            again.insert(m.topic.clone());
        }
    }
    // An answer updates the state the sensors read.
    ha.send("mulmd/pi5/ask", json!({"id": "s1", "query": SHOES, "stream": false}).to_string());
    loop {
        let m = ha.on("mulmd/pi5/state").await;
        let v = m.json();
        if v["requests"] == 1 {
            assert!(v["ttft_ms"].as_f64().unwrap() > 0.0 && v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
            assert_eq!(v["cloud"], "off");
            break;
        }
    }
    d.stop().await;
}

/// A hub that keeps no history asks a follow-up with the same conversation_id: the cloud
/// hears the first question and its answer before the second.
#[tokio::test]
async fn a_follow_up_with_a_conversation_id_carries_the_earlier_turns() {
    use common::fake_cloud::{chunk, done, fake_cloud, finish, Reply};
    let Some(broker) = Broker::start() else { return };
    let cloud = fake_cloud(vec![
        Reply::Stream(vec![chunk(" in about ten minutes."), finish(), done()]),
        Reply::Stream(vec![chunk(" a bit longer, twelve minutes."), finish(), done()]),
    ])
    .await;
    let url = cloud.url.clone();
    let Some(d) = Daemon::start(broker.port, "pi5", move |c| {
        c.cloud.enabled = true;
        c.cloud.base_url = url;
        c.cloud.max_retries = 0;
    })
    .await
    else {
        return;
    };
    let mut c = Client::v311(broker.port, "hub", &["mulmd/pi5/answer/#"]).await;
    c.send("mulmd/pi5/ask", json!({"id": "q1", "query": "How long do I boil an egg?", "stream": false, "conversation_id": "kitchen"}).to_string());
    let first = c.on("mulmd/pi5/answer/q1").await.json();
    c.send("mulmd/pi5/ask", json!({"id": "q2", "query": "And a hard one?", "stream": false, "conversation_id": "kitchen"}).to_string());
    let second = c.on("mulmd/pi5/answer/q2").await.json();
    assert!(second["text"].as_str().unwrap().ends_with("twelve minutes."), "{second}");
    let sent = cloud.bodies.lock().unwrap()[1]["messages"].clone();
    let texts: Vec<&str> = sent.as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    assert!(texts.contains(&"How long do I boil an egg?") && texts.contains(&first["text"].as_str().unwrap()), "{texts:?}");
    d.stop().await;
}
