//! One typed configuration (`/etc/mulmd/mulmd.toml`): every key has a default, `print-config`
//! prints them all with comments, and `check` lists every problem with its key and the fix
//! before anything binds or loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cloud::RecoveryMode;

pub const DEFAULT_PATH: &str = "/etc/mulmd/mulmd.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub engine: EngineSection,
    pub opener: OpenerSection,
    pub cloud: CloudSection,
    pub grpc: GrpcSection,
    pub mqtt: MqttSection,
    pub metrics: MetricsSection,
    pub log: LogSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Names this daemon in topics; empty: the host name.
    pub node_id: String,
    /// First level of every topic.
    pub prefix: String,
    /// Empty: "mulmd-<node_id>".
    pub client_id: String,
    pub username: String,
    /// Empty: $CREDENTIALS_DIRECTORY/mqtt_password when present.
    pub password_file: PathBuf,
    pub tls: bool,
    /// PEM bundle to trust instead of the system's roots (with tls).
    pub ca_file: PathBuf,
    pub keep_alive_s: u64,
    /// Largest MQTT packet accepted from the broker (announced in CONNECT).
    pub max_packet_bytes: u32,
    /// Largest request payload answered; larger ones get an error reply.
    pub max_request_bytes: usize,
    /// Non-empty: also take requests from `$share/<group>/<prefix>/ask`.
    pub share_group: String,
    /// Publish every opener word as it completes (besides the opener, deltas and final).
    pub stream_words: bool,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Home Assistant MQTT discovery of this daemon's sensors.
    pub discovery: bool,
    pub discovery_prefix: String,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            node_id: String::new(),
            prefix: "mulmd".into(),
            client_id: String::new(),
            username: String::new(),
            password_file: PathBuf::new(),
            tls: false,
            ca_file: PathBuf::new(),
            keep_alive_s: 30,
            max_packet_bytes: 65536,
            max_request_bytes: 8192,
            share_group: String::new(),
            stream_words: false,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30000,
            discovery: false,
            discovery_prefix: "homeassistant".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint (GET /metrics); empty: off.
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSection {
    /// TCP address; empty disables TCP.
    pub listen: String,
    /// Unix socket path; empty disables it.
    pub unix_socket: PathBuf,
    /// Octal permission bits of the socket file, e.g. "660".
    pub unix_socket_mode: String,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub grace_period_ms: u64,
}

impl Default for GrpcSection {
    fn default() -> Self {
        Self { listen: "127.0.0.1:50051".into(), unix_socket: PathBuf::new(), unix_socket_mode: "660".into(), grace_period_ms: 10000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Empty: $MULMD_MODEL_DIR or ~/.cache/mulmd/models/smollm2-135m-instruct.
    pub dir: PathBuf,
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    pub workers: usize,
    pub queue_depth: usize,
    /// "auto" (the fast cores of a big.LITTLE SoC), "off", or a CPU list like "4-7".
    pub cpu_affinity: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenerSection {
    pub min_words: usize,
    pub max_words: usize,
    pub max_tokens: usize,
    /// The most words a request may ask for.
    pub max_words_limit: usize,
    /// Longest accepted question, in characters.
    pub max_query_chars: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudSection {
    pub enabled: bool,
    pub base_url: String,
    pub model: String,
    /// Empty: $CREDENTIALS_DIRECTORY/cloud_api_key (systemd LoadCredential), if present.
    pub api_key_file: PathBuf,
    pub recovery: RecoveryMode,
    pub connect_timeout_ms: u64,
    pub first_token_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub total_timeout_ms: u64,
    pub max_retries: u32,
    pub max_tokens: u32,
    pub include_usage: bool,
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// "text" (journald-friendly) or "json".
    pub format: String,
    /// tracing's filter syntax: "info", "mulmd=debug,warn", ...
    pub level: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { dir: PathBuf::new(), threads: 1 }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        Self { workers: 1, queue_depth: 8, cpu_affinity: "auto".into() }
    }
}

impl Default for OpenerSection {
    fn default() -> Self {
        Self { min_words: 4, max_words: 8, max_tokens: 48, max_words_limit: 16, max_query_chars: 2000 }
    }
}

impl Default for CloudSection {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: "http://127.0.0.1:8080/v1".into(),
            model: "default".into(),
            api_key_file: PathBuf::new(),
            recovery: RecoveryMode::Natural,
            connect_timeout_ms: 3000,
            first_token_timeout_ms: 10000,
            idle_timeout_ms: 10000,
            total_timeout_ms: 60000,
            max_retries: 2,
            max_tokens: 400,
            include_usage: true,
            headers: BTreeMap::new(),
        }
    }
}

impl CloudSection {
    /// The client settings this section describes (the key is loaded separately, from
    /// `api_key_file` or the systemd credential).
    pub fn client_config(&self) -> crate::cloud::CloudConfig {
        use std::time::Duration;
        let mut cfg = crate::cloud::CloudConfig::new(&self.base_url, &self.model);
        cfg.connect_timeout = Duration::from_millis(self.connect_timeout_ms);
        cfg.first_token_timeout = Duration::from_millis(self.first_token_timeout_ms);
        cfg.idle_timeout = Duration::from_millis(self.idle_timeout_ms);
        cfg.total_timeout = Duration::from_millis(self.total_timeout_ms);
        cfg.max_retries = self.max_retries;
        cfg.max_tokens = self.max_tokens;
        cfg.include_usage = self.include_usage;
        cfg.extra_headers = self.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        cfg
    }

    /// `api_key_file` when set, else None (the credential directory is then looked up).
    pub fn key_file(&self) -> Option<&Path> {
        (!self.api_key_file.as_os_str().is_empty()).then_some(self.api_key_file.as_path())
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self { format: "text".into(), level: "info".into() }
    }
}

/// The full default configuration with comments: what `mulmd print-config` prints.
pub const TEMPLATE: &str = r#"# mulmd configuration. Every key is optional; these are the defaults.

[model]
# Model directory (mulm.json, model.onnx, tokenizer.json). Empty: $MULMD_MODEL_DIR, else
# ~/.cache/mulmd/models/smollm2-135m-instruct.
dir = ""
# Matrix-multiply threads per inference worker; 0 = one per core in engine.cpu_affinity
# (on an RK3588, the four Cortex-A76 cores).
threads = 1

[engine]
# Inference worker threads, each with its own KV cache.
workers = 1
# Requests that may wait for a worker; beyond that a request is refused at once as busy.
queue_depth = 8
# Cores the inference threads may run on: "auto" picks the fast cores of a big.LITTLE SoC
# (highest cpu_capacity, else highest max frequency) and leaves uniform machines alone;
# "off"; or a CPU list such as "4-7".
cpu_affinity = "auto"

[opener]
# The opener stops between min_words and max_words, at a clause boundary when it can.
min_words = 4
max_words = 8
# Hard cap on opener tokens.
max_tokens = 48
# The most words a request may ask for.
max_words_limit = 16
# Longest accepted question, in characters.
max_query_chars = 2000

[cloud]
# Continue answers with an OpenAI-compatible model. Off: the device finishes the sentence.
enabled = false
# Up to and including the API version.
base_url = "http://127.0.0.1:8080/v1"
model = "default"
# File holding only the API key. Empty: $CREDENTIALS_DIRECTORY/cloud_api_key when present
# (systemd LoadCredential=cloud_api_key:...). Never put the key in this file.
api_key_file = ""
# How a wrong opener is repaired: "natural", "explicit" or "humor".
recovery = "natural"
connect_timeout_ms = 3000
# From the request to the first continuation text.
first_token_timeout_ms = 10000
# Longest silence between chunks.
idle_timeout_ms = 10000
# The whole continuation, retries included.
total_timeout_ms = 60000
# Retries before any continuation text is shown (never after).
max_retries = 2
max_tokens = 400
# Ask for token usage (stream_options.include_usage); turn off for providers that reject it.
include_usage = true

[cloud.headers]
# Extra HTTP headers, e.g. "X-Org" = "home"

[grpc]
# TCP address of the gRPC API; "" disables TCP. Keep it on loopback unless a firewall guards it.
# Port 0 takes a free port; the "serving" log line and systemd's status say which.
listen = "127.0.0.1:50051"
# Unix socket for local clients, e.g. "/run/mulmd/api.sock"; "" disables it.
unix_socket = ""
# Permission bits of the socket file (octal).
unix_socket_mode = "660"
# On SIGTERM: stop accepting, then give in-flight answers this long to finish.
grace_period_ms = 10000

[mqtt]
# Answer requests from an MQTT broker (MQTT 5; clients may speak 3.1.1 to the broker).
enabled = false
host = "127.0.0.1"
port = 1883
# Names this daemon in topics; "" uses the host name. Requests go to <prefix>/<node_id>/ask.
node_id = ""
prefix = "mulmd"
# "" uses "mulmd-<node_id>"; must be unique on the broker.
client_id = ""
username = ""
# File holding only the password. Empty: $CREDENTIALS_DIRECTORY/mqtt_password when present.
password_file = ""
tls = false
# PEM file of the CA to trust (with tls = true); "" uses the system's roots.
ca_file = ""
keep_alive_s = 30
# Largest packet the broker may send us (MQTT 5 Maximum Packet Size).
max_packet_bytes = 65536
# Larger request payloads are refused with an error reply.
max_request_bytes = 8192
# Fleets: when set, also take requests from the shared subscription
# $share/<share_group>/<prefix>/ask, so several boards split one request stream.
share_group = ""
# Also publish each opener word the moment it is complete.
stream_words = false
# Reconnect backoff: doubles from min to max after each failed attempt.
reconnect_min_ms = 500
reconnect_max_ms = 30000
# Home Assistant MQTT discovery (a device with latency, speed and cloud-status sensors),
# republished whenever Home Assistant announces itself on <discovery_prefix>/status.
discovery = false
discovery_prefix = "homeassistant"

[metrics]
# Prometheus endpoint (GET /metrics), e.g. "127.0.0.1:9464"; "" turns it off. Port 0 as above.
listen = ""

[log]
# "text" for journald, or "json".
format = "text"
# tracing filter: "info", "mulmd=debug,warn", ...
level = "info"
"#;

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn problem(key: &str, message: impl Into<String>) -> Problem {
    Problem { key: key.into(), message: message.into() }
}

/// Parses and validates; on failure returns every problem found.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let value: toml::Table = text.parse().map_err(|e: toml::de::Error| vec![problem("(file)", format!("not valid TOML: {}", e.message()))])?;
    let mut problems = Vec::new();
    let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
    // Unknown keys, all of them (serde would stop at the first).
    for (section, v) in &value {
        match (defaults.get(section), v) {
            (None, _) => problems.push(problem(section, format!("unknown section or key; known sections: {}", defaults.keys().cloned().collect::<Vec<_>>().join(", ")))),
            (Some(toml::Value::Table(known)), toml::Value::Table(given)) => {
                for key in given.keys() {
                    if !known.contains_key(key) && !(section == "cloud" && key == "headers") {
                        problems.push(problem(&format!("{section}.{key}"), format!("unknown key; known keys: {}", known.keys().cloned().collect::<Vec<_>>().join(", "))));
                    }
                }
            }
            (Some(_), _) => problems.push(problem(section, "must be a table, e.g. [section]")),
        }
    }
    // Type errors, section by section.
    let mut config = Config::default();
    macro_rules! section {
        ($name:literal, $field:ident) => {
            if let Some(toml::Value::Table(t)) = value.get($name) {
                let known: toml::Table = match defaults.get($name) {
                    Some(toml::Value::Table(k)) => t.iter().filter(|(key, _)| k.contains_key(*key) || ($name == "cloud" && *key == "headers")).map(|(a, b)| (a.clone(), b.clone())).collect(),
                    _ => toml::Table::new(),
                };
                match known.try_into() {
                    Ok(s) => config.$field = s,
                    Err(e) => problems.push(problem($name, format!("{}", toml::de::Error::message(&e)))),
                }
            }
        };
    }
    section!("model", model);
    section!("engine", engine);
    section!("opener", opener);
    section!("cloud", cloud);
    section!("grpc", grpc);
    section!("mqtt", mqtt);
    section!("metrics", metrics);
    section!("log", log);
    problems.extend(validate(&config));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// Reads and checks a file.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![problem("(file)", format!("cannot read {}: {e}", path.display()))])?;
    parse(&text)
}

/// The checks that span keys or values; each names its key and the fix.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    if c.model.threads > 64 {
        p.push(problem("model.threads", "must be 0..=64: 0 for one per fast core, else the number of threads"));
    }
    if let Err(e) = c.engine.cpu_affinity.parse::<crate::cpus::Affinity>() {
        p.push(problem("engine.cpu_affinity", e));
    }
    if !(1..=16).contains(&c.engine.workers) {
        p.push(problem("engine.workers", "must be 1..=16; each worker holds a KV cache and uses model.threads cores"));
    }
    if !(1..=1024).contains(&c.engine.queue_depth) {
        p.push(problem("engine.queue_depth", "must be 1..=1024"));
    }
    let o = &c.opener;
    if o.min_words == 0 || o.min_words > o.max_words {
        p.push(problem("opener.min_words", format!("must be at least 1 and at most opener.max_words ({})", o.max_words)));
    }
    if o.max_words > o.max_words_limit || o.max_words_limit > 64 {
        p.push(problem("opener.max_words", format!("must not exceed opener.max_words_limit ({}), which is at most 64", o.max_words_limit)));
    }
    if !(1..=512).contains(&o.max_tokens) {
        p.push(problem("opener.max_tokens", "must be 1..=512"));
    }
    if o.max_query_chars == 0 {
        p.push(problem("opener.max_query_chars", "must be positive"));
    }
    let cl = &c.cloud;
    if cl.enabled {
        if !(cl.base_url.starts_with("http://") || cl.base_url.starts_with("https://")) {
            p.push(problem("cloud.base_url", format!("{:?} must start with http:// or https://", cl.base_url)));
        }
        if cl.model.trim().is_empty() {
            p.push(problem("cloud.model", "is empty; name the model the endpoint should run"));
        }
        if !cl.api_key_file.as_os_str().is_empty() && !cl.api_key_file.is_file() {
            p.push(problem("cloud.api_key_file", format!("{} does not exist; create it (key only) or leave the key empty", cl.api_key_file.display())));
        }
    }
    for (key, v) in [
        ("cloud.connect_timeout_ms", cl.connect_timeout_ms),
        ("cloud.first_token_timeout_ms", cl.first_token_timeout_ms),
        ("cloud.idle_timeout_ms", cl.idle_timeout_ms),
        ("cloud.total_timeout_ms", cl.total_timeout_ms),
    ] {
        if !(100..=600_000).contains(&v) {
            p.push(problem(key, "must be between 100 and 600000 milliseconds"));
        }
    }
    if cl.first_token_timeout_ms > cl.total_timeout_ms {
        p.push(problem("cloud.first_token_timeout_ms", "must not exceed cloud.total_timeout_ms"));
    }
    for name in cl.headers.keys() {
        if name.eq_ignore_ascii_case("authorization") {
            p.push(problem("cloud.headers", "must not set Authorization: put the key in cloud.api_key_file or a systemd credential"));
        } else if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            p.push(problem("cloud.headers", format!("{name:?} is not a valid header name")));
        }
    }
    let g = &c.grpc;
    if !g.listen.is_empty() && g.listen.parse::<std::net::SocketAddr>().is_err() {
        p.push(problem("grpc.listen", format!("{:?} is not an address like 127.0.0.1:50051 (\"\" disables TCP)", g.listen)));
    }
    if g.listen.is_empty() && g.unix_socket.as_os_str().is_empty() && !c.mqtt.enabled {
        p.push(problem("grpc.listen", "and grpc.unix_socket are both empty and MQTT is off; enable at least one front end"));
    }
    if u32::from_str_radix(&g.unix_socket_mode, 8).map(|m| m > 0o777).unwrap_or(true) {
        p.push(problem("grpc.unix_socket_mode", format!("{:?} is not octal permission bits like \"660\"", g.unix_socket_mode)));
    }
    if g.grace_period_ms > 600_000 {
        p.push(problem("grpc.grace_period_ms", "must be at most 600000 (10 minutes)"));
    }
    let m = &c.mqtt;
    if m.enabled {
        if m.host.trim().is_empty() {
            p.push(problem("mqtt.host", "is empty; name the broker, e.g. \"127.0.0.1\""));
        }
        if m.port == 0 {
            p.push(problem("mqtt.port", "must be a port number, usually 1883 (8883 with tls)"));
        }
        if !m.password_file.as_os_str().is_empty() && !m.password_file.is_file() {
            p.push(problem("mqtt.password_file", format!("{} does not exist", m.password_file.display())));
        }
        if !m.ca_file.as_os_str().is_empty() && !m.ca_file.is_file() {
            p.push(problem("mqtt.ca_file", format!("{} does not exist", m.ca_file.display())));
        }
    }
    for (key, v) in [("mqtt.node_id", &m.node_id), ("mqtt.prefix", &m.prefix), ("mqtt.share_group", &m.share_group), ("mqtt.discovery_prefix", &m.discovery_prefix)] {
        if v.contains(['+', '#', '/']) || v.starts_with('$') || v.contains(char::is_whitespace) {
            p.push(problem(key, format!("{v:?} must be one topic level: no '/', '+', '#', spaces or leading '$'")));
        }
    }
    if m.prefix.is_empty() || m.discovery_prefix.is_empty() {
        p.push(problem("mqtt.prefix", "and mqtt.discovery_prefix must not be empty"));
    }
    if !(5..=3600).contains(&m.keep_alive_s) {
        p.push(problem("mqtt.keep_alive_s", "must be 5..=3600 seconds"));
    }
    if !(1024..=268_435_455).contains(&m.max_packet_bytes) {
        p.push(problem("mqtt.max_packet_bytes", "must be between 1024 and 268435455 (MQTT's limit)"));
    }
    if m.max_request_bytes == 0 || m.max_request_bytes as u64 >= m.max_packet_bytes as u64 {
        p.push(problem("mqtt.max_request_bytes", format!("must be positive and below mqtt.max_packet_bytes ({})", m.max_packet_bytes)));
    }
    if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms || m.reconnect_max_ms > 600_000 {
        p.push(problem("mqtt.reconnect_min_ms", "must be positive, at most mqtt.reconnect_max_ms, which is at most 600000"));
    }
    if !c.metrics.listen.is_empty() && c.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
        p.push(problem("metrics.listen", format!("{:?} is not an address like 127.0.0.1:9464 (\"\" turns metrics off)", c.metrics.listen)));
    }
    if !matches!(c.log.format.as_str(), "text" | "json") {
        p.push(problem("log.format", format!("{:?} must be \"text\" or \"json\"", c.log.format)));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_template_is_exactly_the_defaults() {
        assert_eq!(parse(TEMPLATE).unwrap(), Config::default());
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let text = r#"
            colour = "blue"
            [model]
            threads = 999
            typo_key = 1
            [opener]
            min_words = 9
            max_words = 3
            [cloud]
            enabled = true
            base_url = "ftp://x"
            recovery = "sarcasm"
            [cloud.headers]
            Authorization = "Bearer sk-123"
            [log]
            format = "xml"
        "#;
        let problems = parse(text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in ["colour", "model.typo_key", "cloud"] {
            assert!(keys.contains(&want), "{want} missing from {problems:?}");
        }
        // The cloud section's bad enum stops its own parse; the others are still validated.
        assert!(problems.iter().any(|p| p.key == "cloud" && p.message.contains("sarcasm")), "{problems:?}");
        assert!(keys.contains(&"model.threads") && keys.contains(&"opener.min_words") && keys.contains(&"log.format"), "{problems:?}");
        let fixed = text.replace("\"sarcasm\"", "\"humor\"");
        let problems = parse(&fixed).unwrap_err();
        assert!(problems.iter().any(|p| p.key == "cloud.base_url"), "{problems:?}");
        assert!(problems.iter().any(|p| p.key == "cloud.headers" && p.message.contains("api_key_file")), "{problems:?}");
        assert!(!problems.iter().any(|p| p.to_string().contains("sk-123")), "a key must never be echoed");
    }

    #[test]
    fn the_packaged_config_differs_from_the_defaults_only_where_a_board_needs_it() {
        let packaged = parse(include_str!("../../packaging/mulmd.toml")).unwrap();
        let mut expected = Config::default();
        expected.model.dir = "/var/lib/mulmd/models/default".into();
        expected.model.threads = 0;
        expected.grpc.unix_socket = "/run/mulmd/api.sock".into();
        assert_eq!(packaged, expected);
    }

    #[test]
    fn broken_toml_is_reported_as_such() {
        let p = parse("[model\nthreads = ").unwrap_err();
        assert_eq!(p[0].key, "(file)");
        assert!(p[0].message.contains("TOML"));
    }
}
