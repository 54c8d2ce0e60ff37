//! The answer service against a scriptable fake OpenAI-compatible server, for the faults a real
//! server cannot produce on demand. Each fault must still give the opener, then exactly one
//! terminal event (Done, with the local model finishing the sentence where the cloud failed),
//! and the engine must go on serving.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mulmd::answer::{Admission, Answer, AnswerEvent, AnswerRequest, Answerer, Front, Source};
use mulmd::cloud::{CloudClient, CloudConfig, Repair};
use mulmd::config::{Config, RecoveryMode};
use mulmd::engine::{Engine, EngineConfig, OpenerOptions};
use mulmd::host::secrets::Secret;

const SHOES: &str = "How do I remove odor from inside my shoes?";
const OPENER: &str = "Removing odor from inside your shoes is a";

use common::fake_cloud::{chunk, done, fake_cloud, finish, Reply};

fn client(url: &str) -> Arc<CloudClient> {
    let mut cfg = CloudConfig::new(url, "fake-model");
    cfg.first_token_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.total_timeout = Duration::from_secs(20);
    cfg.max_retries = 2;
    cfg.api_key = Some(test_key());
    Arc::new(CloudClient::new(cfg).unwrap())
}

fn test_key() -> Secret {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("key");
    std::fs::write(&f, "sk-test-SECRET-4242").unwrap();
    mulmd::cloud::load_api_key(Some(&f)).unwrap().unwrap()
}

fn engine() -> Option<Arc<Engine>> {
    let model = common::load("smollm2")?;
    Some(Arc::new(Engine::start(model, EngineConfig::default()).unwrap()))
}

fn request(recovery: RecoveryMode) -> AnswerRequest {
    AnswerRequest { recovery, ..AnswerRequest::question("t", Front::Cli, SHOES, OpenerOptions::default()) }
}

/// Runs one answer; returns all events, checking the stream's shape on the way.
async fn ask(engine: &Arc<Engine>, cloud: Option<Arc<CloudClient>>, recovery: RecoveryMode) -> (Vec<AnswerEvent>, Answer) {
    let answerer = Answerer::new(engine.clone(), cloud, Admission::from_config(&Config::default()));
    let mut stream = answerer.answer(request(recovery));
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        events.push(ev);
    }
    let terminal = events.iter().filter(|e| matches!(e, AnswerEvent::Done(_) | AnswerEvent::Error(_))).count();
    assert_eq!(terminal, 1, "exactly one terminal event: {events:?}");
    let Some(AnswerEvent::Done(done)) = events.last() else { panic!("the last event is not Done: {:?}", events.last()) };
    assert_eq!(done.opener, OPENER, "the opener comes first, whatever the cloud does");
    let opener_done = events.iter().position(|e| matches!(e, AnswerEvent::OpenerDone { .. })).unwrap();
    assert!(events[..opener_done].iter().all(|e| matches!(e, AnswerEvent::Word(_))));
    // What was streamed is exactly what Done reports.
    let streamed: String = events
        .iter()
        .map(|e| match e {
            AnswerEvent::Word(w) => format!("{}{}", if w.index == 0 { "" } else { &w.leading }, w.text),
            AnswerEvent::Delta { text, .. } => text.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(streamed, done.text);
    assert!(!format!("{events:?}").contains("SECRET-4242"), "the API key leaked into an event");
    let d = (**done).clone();
    (events, d)
}

fn sources(events: &[AnswerEvent]) -> Vec<Source> {
    events.iter().filter_map(|e| if let AnswerEvent::Delta { source, .. } = e { Some(*source) } else { None }).collect()
}

#[tokio::test]
async fn a_restated_opener_is_dropped_and_the_key_is_sent() {
    let Some(engine) = engine() else { return };
    let cloud = fake_cloud(vec![Reply::Stream(vec![
        ": keep-alive comment\n\n".into(),
        chunk("Removing odor from "),
        chunk("inside your shoes is a"),
        chunk(" simple task."),
        finish(),
        done(),
    ])])
    .await;
    let (_, a) = ask(&engine, Some(client(&cloud.url)), RecoveryMode::Natural).await;
    assert_eq!(a.text, format!("{OPENER} simple task."));
    assert!(a.fallback.is_none() && !a.corrected);
    assert_eq!(a.repairs, [Repair::Restated]);
    // The layout probe and the continuation both carry the key.
    assert_eq!(cloud.probes.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(cloud.auth.lock().unwrap().as_slice(), ["authorization: Bearer sk-test-SECRET-4242"; 2]);
    assert_eq!(cloud.bodies.lock().unwrap()[0]["messages"].as_array().unwrap().last().unwrap()["content"], OPENER, "the prefill layout");
}

#[tokio::test]
async fn a_correction_is_reported_before_the_continuation() {
    let Some(engine) = engine() else { return };
    let cloud = fake_cloud(vec![Reply::Stream(vec![chunk("[[redirect]] simple"), chunk(" fix: baking soda."), finish(), done()])]).await;
    let (events, a) = ask(&engine, Some(client(&cloud.url)), RecoveryMode::Explicit).await;
    let c = events.iter().position(|e| *e == AnswerEvent::Correction).expect("a Correction event");
    let first_delta = events.iter().position(|e| matches!(e, AnswerEvent::Delta { .. })).unwrap();
    assert!(c < first_delta);
    assert!(a.corrected && a.text.ends_with(" simple fix: baking soda.") && !a.text.contains("[[redirect]]"));
}

#[tokio::test]
async fn rate_limited_then_served_retries_after_the_given_delay() {
    let Some(engine) = engine() else { return };
    let cloud = fake_cloud(vec![
        Reply::Status(429, vec![("retry-after".into(), "1".into())], r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#.into()),
        Reply::Stream(vec![chunk(" common chore."), finish(), done()]),
    ])
    .await;
    let (_, a) = ask(&engine, Some(client(&cloud.url)), RecoveryMode::Natural).await;
    assert_eq!(cloud.completions.load(Ordering::SeqCst), 2);
    assert!(a.fallback.is_none());
    assert!(a.text.ends_with("common chore."));
}

#[tokio::test]
async fn a_server_error_then_success_is_retried() {
    let Some(engine) = engine() else { return };
    let cloud = fake_cloud(vec![Reply::Status(500, vec![], "{}".into()), Reply::Stream(vec![chunk(" chore."), finish(), done()])]).await;
    let (_, a) = ask(&engine, Some(client(&cloud.url)), RecoveryMode::Natural).await;
    assert_eq!(cloud.completions.load(Ordering::SeqCst), 2);
    assert!(a.fallback.is_none());
}

async fn expect_fallback(script: Vec<Reply>, reason: &str) -> (Vec<AnswerEvent>, Answer) {
    let engine = engine().expect("checked by the caller");
    let cloud = fake_cloud(script).await;
    let (events, a) = ask(&engine, Some(client(&cloud.url)), RecoveryMode::Natural).await;
    let f = a.fallback.clone().unwrap_or_else(|| panic!("expected a fallback ({reason}): {a:?}"));
    assert_eq!(f.reason, reason, "{f:?}");
    assert!(!f.message.contains("SECRET"));
    assert!(sources(&events).contains(&Source::Local) || mulmd_ends_sentence(&a.text), "the local model finished the sentence: {a:?}");
    // The engine still serves after the fault.
    let (_, again) = ask(&engine, None, RecoveryMode::Natural).await;
    assert_eq!(again.opener, OPENER);
    (events, a)
}

fn mulmd_ends_sentence(t: &str) -> bool {
    t.trim_end().ends_with(['.', '!', '?'])
}

#[tokio::test]
async fn an_error_event_mid_stream_falls_back_after_the_text_already_shown() {
    if common::fixture("smollm2").is_none() {
        return;
    }
    let script = vec![Reply::Stream(vec![
        chunk(" simple"),
        "data: {\"error\":{\"message\":\"upstream overloaded\",\"type\":\"server_error\"}}\n\n".into(),
    ])];
    let (events, a) = expect_fallback(script, "stream_error").await;
    let s = sources(&events);
    assert_eq!(s.first(), Some(&Source::Cloud), "the cloud text shown stays shown");
    assert!(a.text.starts_with(&format!("{OPENER} simple")));
}

#[tokio::test]
async fn a_stream_cut_without_done_is_a_truncation() {
    if common::fixture("smollm2").is_none() {
        return;
    }
    expect_fallback(vec![Reply::Stream(vec![chunk(" simple")])], "truncated").await;
}

#[tokio::test]
async fn a_malformed_event_falls_back() {
    if common::fixture("smollm2").is_none() {
        return;
    }
    expect_fallback(vec![Reply::Stream(vec!["data: {not json\n\n".into()])], "malformed_event").await;
}

#[tokio::test]
async fn a_stall_before_the_first_byte_times_out_and_falls_back() {
    if common::fixture("smollm2").is_none() {
        return;
    }
    // Every attempt stalls; with retries the total stays bounded by the timeouts.
    expect_fallback(vec![Reply::Stall, Reply::Stall, Reply::Stall], "first_token_timeout").await;
}

#[tokio::test]
async fn a_stall_mid_stream_is_not_retried() {
    if common::fixture("smollm2").is_none() {
        return;
    }
    let (events, _) = expect_fallback(vec![Reply::StallAfter(vec![chunk(" simple")]), Reply::Stream(vec![chunk("x"), done()])], "stalled").await;
    assert_eq!(sources(&events).first(), Some(&Source::Cloud));
}

#[tokio::test]
async fn a_refused_connection_falls_back() {
    let Some(engine) = engine() else { return };
    // A socket bound but never listening: its port refuses connections, and stays ours for
    // the test, so no listener of a test running beside this one can take it.
    let bound = tokio::net::TcpSocket::new_v4().unwrap();
    bound.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = bound.local_addr().unwrap().port();
    let mut cfg = CloudConfig::new(&format!("http://127.0.0.1:{port}/v1"), "m");
    cfg.max_retries = 0;
    let (_, a) = ask(&engine, Some(Arc::new(CloudClient::new(cfg).unwrap())), RecoveryMode::Natural).await;
    assert_eq!(a.fallback.unwrap().reason, "connect");
    drop(bound);
}

#[tokio::test]
async fn without_a_cloud_the_answer_is_finished_locally_and_says_why() {
    let Some(engine) = engine() else { return };
    let (events, a) = ask(&engine, None, RecoveryMode::Natural).await;
    assert_eq!(a.fallback.unwrap().reason, "not_configured");
    assert!(sources(&events).iter().all(|s| *s == Source::Local));
    assert!(a.text.len() > OPENER.len() && mulmd_ends_sentence(&a.text), "{:?}", a.text);
}
