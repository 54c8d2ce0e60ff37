//! The answer service against a cloud that misbehaves on purpose: endless streams, floods,
//! huge events, nonsense retry hints, keys quoted back, and a source that panics. Whatever
//! happens, every answer ends with exactly one terminal event, what it holds stays bounded,
//! and the service goes on answering. The opener comes from a scripted source (no model):
//! these tests are about the cloud side.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_cloud::{chunk, done, fake_cloud, finish, finish_with, Reply};
use mulmd::answer::{Admission, Answer, AnswerEvent, AnswerRequest, Answerer, Front, OpenerSource, ScriptedOpener, Source};
use mulmd::cloud::{CloudClient, CloudConfig, Repair};
use mulmd::config::{Config, RecoveryMode};
use mulmd::engine::{OpenerEvents, OpenerOptions, Prompt, RequestError};
use tokio_util::sync::CancellationToken;

const OPENER: &str = "Baking soda absorbs the smell";
const FINISH: &str = "overnight.";
const KEY: &str = "sk-RELTESTkey-0123456789abcdef";

fn client(url: &str, tune: impl FnOnce(&mut CloudConfig)) -> Arc<CloudClient> {
    let mut cfg = CloudConfig::new(url, "fake-model");
    cfg.first_token_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.total_timeout = Duration::from_secs(20);
    cfg.max_retries = 1;
    tune(&mut cfg);
    Arc::new(CloudClient::new(cfg).unwrap())
}

fn keyed(url: &str) -> Arc<CloudClient> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("key");
    std::fs::write(&f, KEY).unwrap();
    client(url, |c| {
        c.api_key = mulmd::cloud::load_api_key(Some(&f)).unwrap();
        c.max_retries = 0;
    })
}

fn service(source: Arc<dyn OpenerSource>, cloud: Option<Arc<CloudClient>>) -> Answerer {
    Answerer::new(source, cloud, Admission::from_config(&Config::default()))
}

fn scripted() -> Arc<ScriptedOpener> {
    Arc::new(ScriptedOpener::new(OPENER, FINISH))
}

fn request() -> AnswerRequest {
    AnswerRequest { recovery: RecoveryMode::Natural, ..AnswerRequest::question("f", Front::Cli, "How do I get rid of a smell in my fridge?", OpenerOptions::default()) }
}

/// All events of one answer (bounded in number: a runaway stream fails the test, not the
/// machine), checked for the shape every client relies on.
async fn run(answerer: &Answerer) -> (Vec<AnswerEvent>, AnswerEvent) {
    let mut stream = answerer.answer(request());
    let mut events = Vec::new();
    let collect = async {
        while let Some(ev) = stream.next().await {
            events.push(ev);
            assert!(events.len() < 10_000, "an answer of more than 10,000 events");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect).await.expect("the answer ended within a minute");
    let terminal = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminal, 1, "exactly one terminal event: {:?}", events.iter().map(kind).collect::<Vec<_>>());
    let last = events.last().unwrap().clone();
    assert!(last.is_terminal(), "the terminal event comes last");
    (events, last)
}

fn kind(e: &AnswerEvent) -> &'static str {
    match e {
        AnswerEvent::Word(_) => "word",
        AnswerEvent::OpenerDone { .. } => "opener_done",
        AnswerEvent::Delta { .. } => "delta",
        AnswerEvent::Correction => "correction",
        AnswerEvent::ToolCalls(_) => "tool_calls",
        AnswerEvent::Done(_) => "done",
        AnswerEvent::Error(_) => "error",
    }
}

/// The `Done` of an answer, checked to be what was streamed.
async fn answered(answerer: &Answerer) -> (Vec<AnswerEvent>, Answer) {
    let (events, last) = run(answerer).await;
    let AnswerEvent::Done(a) = last else { panic!("not Done: {last:?}") };
    let streamed: String = events
        .iter()
        .map(|e| match e {
            AnswerEvent::Word(w) => format!("{}{}", w.leading, w.text),
            AnswerEvent::Delta { text, .. } => text.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(streamed, a.text, "what was streamed is what Done reports");
    assert_eq!(a.opener, OPENER);
    (events, *a)
}

/// What the cloud's deltas hold (the device's own finish left out).
fn from_cloud(events: &[AnswerEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            AnswerEvent::Delta { text, source: Source::Cloud } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// A continuation cut at a cap ends with the device's finish of its sentence, marked.
fn finished_by_the_device(a: &Answer, cloud: &str) {
    assert_eq!(a.continuation, format!("{cloud} {FINISH}"), "the device finishes the cut sentence");
    assert_eq!(a.repairs, [Repair::Finished]);
}

/// The service still answers after a fault (its fake cloud's script is spent by then, so
/// the device finishes).
async fn still_serves(answerer: &Answerer) {
    let (_, a) = answered(answerer).await;
    assert!(a.text.ends_with(FINISH), "{a:?}");
}

#[tokio::test]
async fn an_endless_stream_of_small_chunks_ends_at_the_chunk_cap_and_is_dropped() {
    let cloud = fake_cloud(vec![Reply::Endless(chunk(" spam"))]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |_| {})));
    let (events, a) = answered(&answerer).await;
    assert_eq!(a.finish_reason, "output_cap");
    assert!(a.finish_detail.as_deref().unwrap().contains("cloud.max_output_chunks"), "{:?}", a.finish_detail);
    assert!(a.fallback.is_none(), "a cap is not a fault");
    let cloud_text = from_cloud(&events);
    assert_eq!(cloud_text.len(), 1600 * " spam".len(), "exactly the 1600 chunks the cap allows");
    finished_by_the_device(&a, &cloud_text);
    // The stream was dropped: the server's writes stop failing only when nobody reads.
    wait_until(|| cloud.written.load(Ordering::Relaxed) > 0 && cloud_closed(&cloud)).await;
    still_serves(&answerer).await;
}

fn cloud_closed(cloud: &common::fake_cloud::FakeCloud) -> bool {
    cloud.closed.load(Ordering::Relaxed) == 1
}

/// Waits (at most 10 s) for `cond`.
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "the condition did not come true within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_endless_stream_of_big_chunks_ends_at_the_byte_cap() {
    let cloud = fake_cloud(vec![Reply::Endless(chunk(&format!(" {}", "y".repeat(999))))]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |c| c.max_output_bytes = 5000)));
    let (events, a) = answered(&answerer).await;
    let cloud_text = from_cloud(&events);
    assert_eq!((a.finish_reason.as_str(), cloud_text.len()), ("output_cap", 5000));
    finished_by_the_device(&a, &cloud_text);
    assert!(a.finish_detail.unwrap().contains("cloud.max_output_bytes"));
}

#[tokio::test]
async fn one_delta_bigger_than_the_byte_cap_is_cut_at_a_character() {
    let huge = format!(" {}", "é".repeat(10_000));
    let cloud = fake_cloud(vec![Reply::Stream(vec![chunk(&huge), finish(), done()])]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |c| c.max_output_bytes = 1001)));
    let (events, a) = answered(&answerer).await;
    assert_eq!(a.finish_reason, "output_cap");
    assert_eq!(from_cloud(&events), format!(" {}", "é".repeat(500)), "cut at the last whole character within 1001 bytes");
    finished_by_the_device(&a, &from_cloud(&events));
}

#[tokio::test]
async fn an_event_larger_than_64_kib_is_refused_and_the_device_finishes() {
    let cloud = fake_cloud(vec![Reply::Stream(vec![chunk(&"z".repeat(200_000)), finish(), done()])]).await;
    let source = scripted();
    let answerer = service(source.clone(), Some(client(&cloud.url, |_| {})));
    let (events, a) = answered(&answerer).await;
    let f = a.fallback.expect("a fault");
    assert_eq!(f.reason, "oversize", "{f:?}");
    assert!(f.message.contains("64 KiB"), "{f:?}");
    assert!(events.iter().any(|e| matches!(e, AnswerEvent::Delta { source: Source::Local, .. })), "the device finished");
    assert!(a.text.ends_with(FINISH));
}

#[tokio::test]
async fn a_flood_then_a_stall_falls_back_and_the_finish_reads_only_a_bounded_tail() {
    let flood: Vec<String> = (0..300).map(|i| chunk(&format!(" word{i:04} of a long answer"))).collect();
    let cloud = fake_cloud(vec![Reply::StallAfter(flood)]).await;
    let source = scripted();
    let answerer = service(source.clone(), Some(client(&cloud.url, |_| {})));
    let (_, a) = answered(&answerer).await;
    assert_eq!(a.fallback.as_ref().unwrap().reason, "stalled");
    assert!(a.continuation.len() > 7000, "the flood was shown: {}", a.continuation.len());
    let finish_prompt = source.prompts().into_iter().find(|p| p.continue_from.is_some()).expect("a local finish");
    let tail = finish_prompt.continue_from.unwrap();
    assert!(tail.len() <= 1024 && a.text.contains(&tail), "the finish read {} bytes", tail.len());
    assert!(a.text.ends_with(FINISH));
}

#[tokio::test]
async fn a_stream_of_empty_events_is_cut_at_the_raw_size_limit() {
    let cloud = fake_cloud(vec![Reply::Endless(": keep-alive comment padding the stream with nothing to show\n\n".into())]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |c| c.first_token_timeout = Duration::from_secs(20))));
    let (_, a) = answered(&answerer).await;
    assert_eq!(a.fallback.unwrap().reason, "oversize");
}

#[tokio::test]
async fn retry_hints_that_are_not_numbers_never_panic_the_answer() {
    for value in ["NaN", "-1", "inf", "1e300", "99999999999999999999", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        for header in ["retry-after", "retry-after-ms"] {
            let limited = Reply::Status(429, vec![(header.into(), value.into())], r#"{"error":{"message":"slow down"}}"#.into());
            let cloud = fake_cloud(vec![limited, Reply::Stream(vec![chunk(" overnight."), finish(), done()])]).await;
            let answerer = service(scripted(), Some(client(&cloud.url, |_| {})));
            let (_, a) = answered(&answerer).await;
            // Retried after a backoff when the hint is unusable, given up when it asks too much.
            match &a.fallback {
                None => assert!(a.text.ends_with(" overnight."), "{header}: {value}: {a:?}"),
                Some(f) => assert_eq!(f.reason, "rate_limited", "{header}: {value}"),
            }
        }
    }
}

/// Every place a key can sit relative to the 300-character cap on a provider's text, as raw
/// text and inside a JSON error, and at either end.
#[tokio::test]
async fn no_six_characters_of_the_key_reach_any_event_wherever_the_provider_cuts() {
    let mut bodies = Vec::new();
    for at in 270..=305 {
        bodies.push(format!("{} {KEY} rejected", "p".repeat(at)));
        bodies.push(format!(r#"{{"error": {{"message": "{} invalid key {KEY}", "code": "invalid_api_key"}}}}"#, "q".repeat(at)));
    }
    bodies.push(format!("{KEY} at the start"));
    bodies.push(format!("at the end {KEY}"));
    let script = bodies.iter().map(|b| Reply::Status(401, vec![], b.clone())).collect();
    let cloud = fake_cloud(script).await;
    let answerer = service(scripted(), Some(keyed(&cloud.url)));
    for body in &bodies {
        let (events, a) = answered(&answerer).await;
        let f = a.fallback.as_ref().expect("a fault");
        assert_eq!(f.reason, "http_error");
        assert!(f.message.chars().count() < 400, "a provider's text is capped: {} chars", f.message.chars().count());
        let seen = format!("{events:?}");
        for n in 6..=KEY.len() {
            assert!(!seen.contains(&KEY[..n]), "{:?} reached an event (body of {} bytes)", &KEY[..n], body.len());
        }
    }
}

#[tokio::test]
async fn a_five_megabyte_error_body_becomes_a_short_message() {
    let cloud = fake_cloud(vec![Reply::Status(500, vec![], "E".repeat(5 << 20))]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |c| c.max_retries = 0)));
    let (_, a) = answered(&answerer).await;
    let f = a.fallback.unwrap();
    assert_eq!(f.reason, "http_error");
    assert!(f.message.len() < 400, "{} bytes", f.message.len());
}

/// A source that panics when asked: the client still gets its one end.
struct Panicking;

impl OpenerSource for Panicking {
    fn submit(&self, _: &Prompt, _: OpenerOptions, _: Instant, _: CancellationToken) -> Result<OpenerEvents, RequestError> {
        panic!("a bug in an opener source");
    }
    fn queue_depth(&self) -> usize {
        0
    }
    fn model_name(&self) -> String {
        "panicking".into()
    }
}

#[tokio::test]
async fn a_panic_while_composing_still_ends_the_answer_with_one_error() {
    let answerer = service(Arc::new(Panicking), None);
    let (events, last) = run(&answerer).await;
    assert_eq!(events.len(), 1);
    let AnswerEvent::Error(RequestError::Inference(why)) = last else { panic!("{last:?}") };
    assert!(why.contains("internal error"), "{why}");
}

#[tokio::test]
async fn stopping_the_service_ends_a_stalled_answer_with_shutting_down() {
    let cloud = fake_cloud(vec![Reply::Stall]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |c| c.first_token_timeout = Duration::from_secs(20))));
    let mut stream = answerer.answer(request());
    // The opener arrives, then the cloud says nothing; the daemon stops.
    while let Some(ev) = stream.next().await {
        if matches!(ev, AnswerEvent::OpenerDone { .. }) {
            break;
        }
    }
    answerer.stop_all();
    let rest: Vec<AnswerEvent> = tokio::time::timeout(Duration::from_secs(5), async {
        let mut v = Vec::new();
        while let Some(ev) = stream.next().await {
            v.push(ev);
        }
        v
    })
    .await
    .expect("the stop ends the answer at once");
    assert_eq!(rest, [AnswerEvent::Error(RequestError::ShuttingDown)]);
}

#[tokio::test]
async fn a_continuation_cut_by_its_length_or_stopped_on_a_colon_is_finished_by_the_device() {
    for ending in [finish_with("length"), finish()] {
        let cloud = fake_cloud(vec![Reply::Stream(vec![chunk(" if you follow these steps:"), ending, done()])]).await;
        let answerer = service(scripted(), Some(client(&cloud.url, |_| {})));
        let (_, a) = answered(&answerer).await;
        assert_eq!(a.text, format!("{OPENER} if you follow these steps: {FINISH}"), "the answer ends its sentence");
        assert_eq!(a.repairs, [Repair::Finished]);
    }
}

#[tokio::test]
async fn a_new_sentence_after_an_opener_cut_mid_clause_waits_for_the_device_to_finish_the_clause() {
    let cloud = fake_cloud(vec![Reply::Stream(vec![chunk("The fridge"), chunk(" also needs airing."), finish(), done()])]).await;
    let answerer = service(scripted(), Some(client(&cloud.url, |_| {})));
    let (events, a) = answered(&answerer).await;
    assert_eq!(a.text, format!("{OPENER} {FINISH} The fridge also needs airing."));
    assert_eq!(a.repairs, [Repair::Restart]);
    let sources: Vec<Source> = events.iter().filter_map(|e| if let AnswerEvent::Delta { source, .. } = e { Some(*source) } else { None }).collect();
    assert_eq!(sources.first(), Some(&Source::Local), "the device's words come first: {sources:?}");
    assert_eq!(sources.last(), Some(&Source::Cloud));
}

#[tokio::test]
async fn a_finish_that_runs_out_of_words_inside_its_sentence_still_ends_one() {
    // The device's finish is bounded; a list heading or a loop of words can outlast it.
    for (finish, close) in [("and a list heading", "."), ("involuntary, involuntary,", "…")] {
        let cloud = fake_cloud(vec![Reply::Stream(vec![chunk(" in a bowl"), finish_with("length"), done()])]).await;
        let answerer = service(Arc::new(ScriptedOpener::new(OPENER, finish)), Some(client(&cloud.url, |_| {})));
        let (events, a) = answered(&answerer).await;
        assert_eq!(a.text, format!("{OPENER} in a bowl {finish}{close}"), "a stop ends what is heard");
        assert_eq!(a.repairs, [Repair::Finished]);
        let last = events.iter().rev().find_map(|e| if let AnswerEvent::Delta { text, source } = e { Some((text.clone(), *source)) } else { None });
        assert_eq!(last, Some((close.to_string(), Source::Local)));
    }
}
