//! One typed configuration (`/etc/mulmd/mulmd.toml`). The commented file `default.toml` is
//! the one place defaults are written: `print-config` prints it, [`Config::default`] is it
//! parsed, and a file on disk is read as that file with its keys overriding. Checking lists
//! every problem with its key and the fix, before anything binds or loads.

mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use crate::host::cpus::Affinity;
pub use types::{FileMode, LogFormat, PromptLayout, RecoveryMode};

pub const DEFAULT_PATH: &str = "/etc/mulmd/mulmd.toml";

/// The full default configuration with comments: what `mulmd print-config` prints.
pub const TEMPLATE: &str = include_str!("default.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub engine: EngineSection,
    pub opener: OpenerSection,
    pub conversation: ConversationSection,
    pub cloud: CloudSection,
    pub grpc: GrpcSection,
    pub http: HttpSection,
    pub mqtt: MqttSection,
    pub metrics: MetricsSection,
    pub auth: AuthSection,
    pub discovery: DiscoverySection,
    pub tls: TlsSection,
    pub log: LogSection,
}

impl Default for Config {
    /// `default.toml`, parsed.
    fn default() -> Self {
        parse(TEMPLATE).expect("the built-in default configuration is valid (a unit test checks it)")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Empty: $MULMD_MODEL_DIR or ~/.cache/mulmd/models/smollm2-135m-instruct.
    pub dir: PathBuf,
    pub threads: usize,
    /// Empty: the default plan cache directory; "off": no plan cache.
    pub plan_cache: String,
    /// MiB of cached plans kept; 0: none.
    pub plan_cache_mb: u64,
}

impl ModelSection {
    /// The model directory this section names, or the default one.
    pub fn dir(&self) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            crate::host::paths::default_model_dir()
        } else {
            self.dir.clone()
        }
    }

    /// The plan cache this section configures.
    pub fn plan_cache(&self) -> crate::engine::PlanCache {
        use crate::engine::PlanCache;
        match self.plan_cache.as_str() {
            "off" => PlanCache::off(),
            "" => crate::engine::plan_cache_dir().map_or_else(PlanCache::off, |d| PlanCache::at(d, self.plan_cache_mb)),
            dir => PlanCache::at(PathBuf::from(dir), self.plan_cache_mb),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub workers: usize,
    pub queue_depth: usize,
    pub cpu_affinity: Affinity,
    /// Prompt tokens fed per forward pass; cancellation and the watchdog are checked between.
    pub prefill_chunk_tokens: usize,
    /// MiB of recent prompts' KV caches kept for prompts that start the same way; 0: none.
    pub prefix_cache_mb: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenerSection {
    pub min_words: usize,
    pub max_words: usize,
    pub max_tokens: usize,
    /// The most words a request may ask for.
    pub max_words_limit: usize,
    /// Longest accepted question, in characters.
    pub max_query_chars: usize,
    /// Longest accepted prompt (chat template and question), in the model's tokens.
    pub max_prompt_tokens: usize,
    /// The voice policy's bounds (see default.toml).
    pub voice_min_chars: usize,
    pub voice_max_words: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationSection {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub keep: usize,
    pub keep_turns: usize,
    pub keep_bytes: usize,
    pub keep_minutes: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    pub enabled: bool,
    pub base_url: String,
    pub model: String,
    /// Empty: $CREDENTIALS_DIRECTORY/cloud_api_key (systemd LoadCredential), if present.
    pub api_key_file: PathBuf,
    pub recovery: RecoveryMode,
    /// How the opener is put to the model: probed, prefill or instruct.
    pub prompt: PromptLayout,
    pub connect_timeout_ms: u64,
    pub first_token_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub total_timeout_ms: u64,
    pub max_retries: u32,
    pub max_tokens: u32,
    /// The most continuation text shown, in bytes; the cloud stream is dropped at the cap.
    pub max_output_bytes: usize,
    /// The most continuation chunks (about one token each) read.
    pub max_output_chunks: usize,
    pub include_usage: bool,
    pub headers: BTreeMap<String, String>,
}

impl CloudSection {
    /// `api_key_file` when set, else None (the credential directory is then looked up).
    pub fn key_file(&self) -> Option<&Path> {
        (!self.api_key_file.as_os_str().is_empty()).then_some(self.api_key_file.as_path())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSection {
    /// TCP address; empty disables TCP.
    pub listen: String,
    /// Unix socket path; empty disables it.
    pub unix_socket: PathBuf,
    pub unix_socket_mode: FileMode,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub grace_period_ms: u64,
    /// gRPC-Web on the TCP port.
    pub web: bool,
    /// Origins whose pages may call the API from a browser (CORS allow-list).
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub enabled: bool,
    pub listen: String,
    /// The model name the API lists and answers to.
    pub model: String,
    pub ollama: bool,
    pub openai: bool,
    /// The voice policy as the default of each API.
    pub ollama_voice: bool,
    pub openai_voice: bool,
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint (GET /metrics); empty: off.
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Bearer tokens for every TCP listener; empty: $CREDENTIALS_DIRECTORY/tokens when present.
    pub tokens_file: PathBuf,
    /// Serve beyond loopback without tokens (else that is refused at start).
    pub allow_unauthenticated_lan: bool,
}

impl AuthSection {
    pub fn file(&self) -> Option<&Path> {
        (!self.tokens_file.as_os_str().is_empty()).then_some(self.tokens_file.as_path())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySection {
    /// mDNS/DNS-SD advertisement while a listener is beyond loopback.
    pub mdns: bool,
    /// Empty: "mulmd on <host name>".
    pub instance: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain; with `key_file`, TLS on every TCP listener.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM CA for client certificates (mutual TLS); empty: none asked for.
    pub client_ca_file: PathBuf,
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: LogFormat,
    /// tracing's filter syntax: "info", "mulmd=debug,warn", ...
    pub level: String,
}

/// One thing wrong with a configuration (or, from [`warnings`], worth a second look).
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

/// Parses `text` as overrides of `default.toml` and checks the values; on failure returns
/// every problem found. Files named in it are not looked at (see [`load`]).
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let given: toml::Table = text.parse().map_err(|e: toml::de::Error| vec![problem("(file)", format!("not valid TOML: {}", e.message()))])?;
    let defaults: toml::Table = TEMPLATE.parse().expect("default.toml is TOML");
    let mut problems = Vec::new();
    let mut merged = defaults.clone();
    for (section, value) in &given {
        let Some(toml::Value::Table(base)) = defaults.get(section) else {
            let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
            problems.push(problem(section, format!("unknown section or key; known sections: {}", known.join(", "))));
            continue;
        };
        let toml::Value::Table(keys) = value else {
            problems.push(problem(section, format!("must be a table, e.g. [{section}]")));
            continue;
        };
        let table = overlay(section, base, keys, &mut problems);
        merged.insert(section.clone(), toml::Value::Table(table));
    }
    let config: Config = match toml::Value::Table(merged).try_into() {
        Ok(c) => c,
        Err(e) => {
            // overlay() kept only values that deserialize; reaching here is a bug in it.
            problems.push(problem("(file)", toml::de::Error::message(&e)));
            return Err(problems);
        }
    };
    problems.extend(validate(&config));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// `base` (a section of the defaults) with every key of `given` that is known and of the right
/// type put over it; each other key becomes a problem naming `section.key`.
fn overlay(section: &str, base: &toml::Table, given: &toml::Table, problems: &mut Vec<Problem>) -> toml::Table {
    let mut table = base.clone();
    for (key, value) in given {
        let name = format!("{section}.{key}");
        if let Some(to) = moved(&name) {
            problems.push(problem(&name, format!("moved to {to}; rename the key")));
            continue;
        }
        if !base.contains_key(key) {
            let known: Vec<&str> = base.keys().map(String::as_str).collect();
            problems.push(problem(&name, format!("unknown key; known keys: {}", known.join(", "))));
            continue;
        }
        let mut candidate = table.clone();
        candidate.insert(key.clone(), value.clone());
        match check_section(section, candidate) {
            Ok(()) => {
                table.insert(key.clone(), value.clone());
            }
            Err(message) => problems.push(problem(&name, message)),
        }
    }
    table
}

/// Where a key of an earlier release lives now.
fn moved(key: &str) -> Option<&'static str> {
    match key {
        "http.tokens_file" => Some("auth.tokens_file (one token list now guards gRPC, the HTTP APIs and /metrics)"),
        _ => None,
    }
}

/// Whether `table` deserializes as the section called `section`.
fn check_section(section: &str, table: toml::Table) -> Result<(), String> {
    fn check<T: DeserializeOwned>(table: toml::Table) -> Result<(), String> {
        table.try_into::<T>().map(|_| ()).map_err(|e| toml::de::Error::message(&e).to_string())
    }
    match section {
        "model" => check::<ModelSection>(table),
        "engine" => check::<EngineSection>(table),
        "opener" => check::<OpenerSection>(table),
        "conversation" => check::<ConversationSection>(table),
        "cloud" => check::<CloudSection>(table),
        "grpc" => check::<GrpcSection>(table),
        "http" => check::<HttpSection>(table),
        "mqtt" => check::<MqttSection>(table),
        "metrics" => check::<MetricsSection>(table),
        "auth" => check::<AuthSection>(table),
        "tls" => check::<TlsSection>(table),
        "discovery" => check::<DiscoverySection>(table),
        "log" => check::<LogSection>(table),
        other => Err(format!("no section {other}")),
    }
}

/// Reads and checks a file, including the files and directories it names (see [`check_files`]).
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![problem("(file)", format!("cannot read {}: {e}", path.display()))])?;
    let config = parse(&text)?;
    let mut missing = check_files(&config);
    missing.extend(exposure(&config, has_tokens(&config)).0);
    if missing.is_empty() {
        Ok(config)
    } else {
        Err(missing)
    }
}

/// The checks of values alone (ranges, addresses, names); each names its key and the fix.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    if c.model.threads > 64 {
        p.push(problem("model.threads", "must be 0..=64: 0 for one per fast core, else the number of threads"));
    }
    if c.model.plan_cache_mb > 1 << 20 {
        p.push(problem("model.plan_cache_mb", "must be 0..=1048576 MiB; 0 keeps no plans"));
    }
    if !c.model.plan_cache.is_empty() && c.model.plan_cache != "off" && !Path::new(&c.model.plan_cache).is_absolute() {
        p.push(problem("model.plan_cache", "must be empty (the default directory), \"off\", or an absolute directory"));
    }
    if !(1..=16).contains(&c.engine.workers) {
        p.push(problem("engine.workers", "must be 1..=16; each worker holds a KV cache and uses model.threads cores"));
    }
    if !(1..=1024).contains(&c.engine.queue_depth) {
        p.push(problem("engine.queue_depth", "must be 1..=1024"));
    }
    if !(16..=4096).contains(&c.engine.prefill_chunk_tokens) {
        p.push(problem("engine.prefill_chunk_tokens", "must be 16..=4096 tokens"));
    }
    if c.engine.prefix_cache_mb > 65536 {
        p.push(problem("engine.prefix_cache_mb", "must be 0..=65536 MiB; 0 keeps no prompt caches"));
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
    if !(16..=131_072).contains(&o.max_prompt_tokens) {
        p.push(problem("opener.max_prompt_tokens", "must be 16..=131072 tokens (the model's context is a further bound)"));
    }
    if !(1..=1000).contains(&o.voice_min_chars) {
        p.push(problem("opener.voice_min_chars", "must be 1..=1000 characters"));
    }
    if !(1..=64).contains(&o.voice_max_words) {
        p.push(problem("opener.voice_max_words", "must be 1..=64 words"));
    }
    let cv = &c.conversation;
    if !(1..=10_000).contains(&cv.max_messages) {
        p.push(problem("conversation.max_messages", "must be 1..=10000"));
    }
    if !(1024..=16 << 20).contains(&cv.max_bytes) {
        p.push(problem("conversation.max_bytes", "must be 1024..=16777216 bytes"));
    }
    if cv.keep > 100_000 || cv.keep_turns > 1000 || cv.keep_bytes > 16 << 20 || cv.keep_minutes > 7 * 24 * 60 {
        p.push(problem("conversation.keep", "keep (at most 100000), keep_turns (1000), keep_bytes (16 MiB) and keep_minutes (a week) are too large"));
    }
    let cl = &c.cloud;
    if cl.enabled {
        if !(cl.base_url.starts_with("http://") || cl.base_url.starts_with("https://")) {
            p.push(problem("cloud.base_url", format!("{:?} must start with http:// or https://", cl.base_url)));
        }
        if cl.model.trim().is_empty() {
            p.push(problem("cloud.model", "is empty; name the model the endpoint should run"));
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
    if !(1..=100_000).contains(&cl.max_tokens) {
        p.push(problem("cloud.max_tokens", "must be 1..=100000"));
    }
    if !(256..=1 << 20).contains(&cl.max_output_bytes) {
        p.push(problem("cloud.max_output_bytes", "must be 256..=1048576 bytes"));
    }
    if cl.max_output_chunks < cl.max_tokens as usize || cl.max_output_chunks > 1_000_000 {
        p.push(problem("cloud.max_output_chunks", format!("must be at least cloud.max_tokens ({}) and at most 1000000", cl.max_tokens)));
    }
    for (name, value) in &cl.headers {
        if name.eq_ignore_ascii_case("authorization") {
            p.push(problem("cloud.headers", "must not set Authorization: put the key in cloud.api_key_file or a systemd credential"));
        } else if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            p.push(problem("cloud.headers", format!("{name:?} is not a valid header name")));
        } else if value.chars().any(|c| c.is_control() && c != '\t') {
            // Such a value cannot be sent: every request would fail and fall back.
            p.push(problem(&format!("cloud.headers.{name}"), "holds a control character (a line break?); header values are one line of text"));
        }
    }
    let g = &c.grpc;
    if !g.listen.is_empty() && g.listen.parse::<SocketAddr>().is_err() {
        p.push(problem("grpc.listen", format!("{:?} is not an address like 127.0.0.1:50051 (\"\" disables TCP)", g.listen)));
    }
    if g.listen.is_empty() && g.unix_socket.as_os_str().is_empty() && !c.mqtt.enabled && !c.http.enabled {
        p.push(problem("grpc.listen", "and grpc.unix_socket are both empty and MQTT and HTTP are off; enable at least one front end"));
    }
    let h = &c.http;
    if h.enabled {
        if h.listen.parse::<SocketAddr>().is_err() {
            p.push(problem("http.listen", format!("{:?} is not an address like 127.0.0.1:11434", h.listen)));
        }
        if !h.ollama && !h.openai {
            p.push(problem("http.ollama", "and http.openai are both off; serve at least one API or set http.enabled = false"));
        }
        if h.model.trim().is_empty() || h.model.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            p.push(problem("http.model", format!("{:?} must be a name without spaces, e.g. \"mulmd\"", h.model)));
        }
    }
    if !(1024..=64 << 20).contains(&h.max_request_bytes) {
        p.push(problem("http.max_request_bytes", "must be 1024..=67108864 bytes"));
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
    }
    for (key, v) in [("mqtt.node_id", &m.node_id), ("mqtt.prefix", &m.prefix), ("mqtt.share_group", &m.share_group), ("mqtt.discovery_prefix", &m.discovery_prefix)] {
        if v.contains(['+', '#', '/']) || v.starts_with('$') || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
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
    if c.discovery.instance.len() > 63 || c.discovery.instance.contains(|ch: char| ch.is_control() || ch == '.') {
        p.push(problem("discovery.instance", "must be at most 63 bytes, without dots or control characters (a DNS-SD instance name)"));
    }
    for o in &c.grpc.cors_origins {
        let host = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
        let ok = o == "*" || host.is_some_and(|h| !h.is_empty() && !h.contains('/') && axum::http::HeaderValue::from_str(o).is_ok());
        if !ok {
            p.push(problem("grpc.cors_origins", format!("{o:?} is not an origin like \"https://app.example\" or \"http://192.168.1.5:8080\" (scheme, host and port, no path, no trailing slash)")));
        }
    }
    let (cert, key) = (c.tls.cert_file.as_os_str().is_empty(), c.tls.key_file.as_os_str().is_empty());
    if cert != key {
        p.push(problem(if cert { "tls.cert_file" } else { "tls.key_file" }, "tls.cert_file and tls.key_file go together: set both (`mulmd tls init` makes a pair) or neither"));
    }
    if cert && !c.tls.client_ca_file.as_os_str().is_empty() {
        p.push(problem("tls.client_ca_file", "client certificates need TLS: set tls.cert_file and tls.key_file too"));
    }
    if !c.metrics.listen.is_empty() && c.metrics.listen.parse::<SocketAddr>().is_err() {
        p.push(problem("metrics.listen", format!("{:?} is not an address like 127.0.0.1:9464 (\"\" turns metrics off)", c.metrics.listen)));
    }
    p
}

/// The checks against this machine: every file or directory the configuration names exists.
pub fn check_files(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    let dir = c.model.dir();
    if !dir.is_dir() {
        let fix = if c.model.dir.as_os_str().is_empty() {
            "prepare the default model with `export/mulm-export default-model` or set model.dir"
        } else {
            "set model.dir to a model directory made by export/mulm-export"
        };
        p.push(problem("model.dir", format!("{} is not a directory; {fix}", dir.display())));
    }
    let files = [
        ("cloud.api_key_file", &c.cloud.api_key_file, c.cloud.enabled, "create it (key only) or leave it empty"),
        ("auth.tokens_file", &c.auth.tokens_file, true, "create it (\"name token\" per line) or leave it empty"),
        ("tls.cert_file", &c.tls.cert_file, true, "make a pair with `mulmd tls init` or leave tls.cert_file and tls.key_file empty"),
        ("tls.key_file", &c.tls.key_file, true, "make a pair with `mulmd tls init` or leave tls.cert_file and tls.key_file empty"),
        ("tls.client_ca_file", &c.tls.client_ca_file, true, "point it at the PEM of the CA that signs client certificates, or leave it empty"),
        ("mqtt.password_file", &c.mqtt.password_file, c.mqtt.enabled, "create it (password only) or leave it empty"),
        ("mqtt.ca_file", &c.mqtt.ca_file, c.mqtt.enabled && c.mqtt.tls, "point it at the broker's CA certificate (PEM) or leave it empty"),
    ];
    for (key, path, used, fix) in files {
        if used && !path.as_os_str().is_empty() && !path.is_file() {
            p.push(problem(key, format!("{} does not exist; {fix}", path.display())));
        }
    }
    p
}

/// Settings that are valid but worth a second look (listeners beyond loopback that were
/// explicitly allowed without tokens).
pub fn warnings(c: &Config) -> Vec<Problem> {
    exposure(c, has_tokens(c)).1
}

/// Whether clients will be asked for tokens: a token file is named (its contents are checked
/// when the daemon loads it), or systemd passes the `tokens` credential (outside the service:
/// the file the packaged unit loads it from holds something).
pub fn has_tokens(c: &Config) -> bool {
    c.auth.file().is_some() || {
        use crate::host::secrets::{credential_given, PACKAGED_TOKENS, TOKENS_CREDENTIAL};
        credential_given(TOKENS_CREDENTIAL, Path::new(PACKAGED_TOKENS))
    }
}

/// The TCP listeners that are reachable beyond this machine: (setting, address).
pub fn beyond_loopback(c: &Config) -> Vec<(&'static str, &str)> {
    let http = if c.http.enabled { c.http.listen.as_str() } else { "" };
    [("grpc.listen", c.grpc.listen.as_str()), ("http.listen", http), ("metrics.listen", c.metrics.listen.as_str())]
        .into_iter()
        .filter(|(_, addr)| addr.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback()))
        .collect()
}

/// Who may connect, given whether tokens are configured (a file or the systemd credential):
/// a listener beyond loopback with no token is a problem (the daemon refuses to start), or,
/// with `auth.allow_unauthenticated_lan`, a warning. Returns (problems, warnings).
pub fn exposure(c: &Config, has_tokens: bool) -> (Vec<Problem>, Vec<Problem>) {
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    if has_tokens {
        return (problems, warnings);
    }
    for (key, addr) in beyond_loopback(c) {
        if c.auth.allow_unauthenticated_lan {
            warnings.push(problem(key, format!("{addr} is reachable from other machines and no token is asked for (auth.allow_unauthenticated_lan); make sure a firewall or VPN decides who connects")));
        } else {
            problems.push(problem(
                key,
                format!("{addr} is reachable from other machines, and no token is configured: anyone on the network could use the daemon and its cloud quota. Add tokens (auth.tokens_file, \"name token\" per line, or the systemd credential \"tokens\"), bind to 127.0.0.1, or set auth.allow_unauthenticated_lan = true if a firewall decides who connects"),
            ));
        }
    }
    (problems, warnings)
}

#[cfg(test)]
mod tests;
