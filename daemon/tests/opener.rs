//! The opener as a user sees it: words, stops, determinism, events, cancellation, queueing.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mulmd::engine::{
    write_opener, CancelToken, Engine, EngineConfig, Job, Model, OpenerEvent, OpenerOptions, RequestError, Sampling,
    StopReason,
};

const SHOES: &str = "How do I remove odor from inside my shoes?";

fn opts(min: usize, max: usize) -> OpenerOptions {
    OpenerOptions { min_words: min, max_words: max, ..Default::default() }
}

fn run(model: &Arc<Model>, query: &str, o: &OpenerOptions) -> (Vec<String>, mulmd::engine::Opener) {
    let mut session = model.session().unwrap();
    let mut streamed = Vec::new();
    let opener = write_opener(model, &mut session, query, o, Instant::now(), &CancelToken::default(), |w| {
        streamed.push(w.text)
    })
    .unwrap();
    (streamed, opener)
}

#[test]
fn smollm2_writes_the_reference_opener_word_by_word() {
    let Some(model) = common::load("smollm2") else { return };
    let (streamed, opener) = run(&model, SHOES, &opts(4, 8));
    // onnxruntime and llama.cpp both decode this answer greedily (bench/README numbers).
    assert_eq!(opener.text, "Removing odor from inside your shoes is a");
    assert_eq!(streamed, opener.words.iter().map(|w| w.text.clone()).collect::<Vec<_>>());
    assert_eq!(opener.stop, StopReason::WordBudget);
    assert_eq!(opener.words.len(), 8);
    assert!(opener.prompt_tokens > 10 && opener.generated_tokens >= 8);
}

#[test]
fn the_word_budget_is_respected() {
    let Some(model) = common::load("smollm2") else { return };
    let (_, opener) = run(&model, SHOES, &opts(2, 4));
    assert_eq!(opener.text, "Removing odor from inside");
    let (_, opener) = run(&model, SHOES, &opts(1, 1));
    assert_eq!(opener.text, "Removing");
}

#[test]
fn greedy_decoding_is_deterministic() {
    let Some(model) = common::load("smollm2") else { return };
    let a = run(&model, "Tell me about the moon.", &opts(4, 8)).1;
    let b = run(&model, "Tell me about the moon.", &opts(4, 8)).1;
    assert_eq!(a.text, b.text);
    assert_eq!(a.generated_tokens, b.generated_tokens);
}

#[test]
fn a_seed_reproduces_a_sampled_opener() {
    let Some(model) = common::load("smollm2") else { return };
    let sampled = |seed| OpenerOptions {
        sampling: Sampling { temperature: 1.2, top_k: 50, top_p: 0.95, seed: Some(seed) },
        ..opts(4, 8)
    };
    let a = run(&model, "Suggest a name for a cat.", &sampled(11)).1;
    let b = run(&model, "Suggest a name for a cat.", &sampled(11)).1;
    assert_eq!(a.text, b.text);
    let differs = (12..20).any(|s| run(&model, "Suggest a name for a cat.", &sampled(s)).1.text != a.text);
    assert!(differs, "eight other seeds all reproduced the same sampled opener");
}

#[test]
fn random_tokens_never_surface_broken_utf8_or_special_tokens() {
    // The tiny model's random weights make it emit arbitrary tokens, byte fragments included.
    let Some(model) = common::load("tiny") else { return };
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    for seed in 0..40 {
        let o = OpenerOptions {
            sampling: Sampling { temperature: 3.0, seed: Some(seed), ..Default::default() },
            max_tokens: 40,
            ..opts(4, 8)
        };
        let (_, opener) = run(&model, "Grüße, 日本語 and emoji 🎉?", &o);
        for w in &opener.words {
            assert!(!w.text.contains('\u{FFFD}'), "seed {seed}: word {:?} carries a broken character", w.text);
            assert!(!w.text.is_empty() && !w.text.contains(char::is_whitespace));
            assert!(!specials.iter().any(|s| w.text.contains(s)), "seed {seed}: special token in {:?}", w.text);
        }
        assert!(opener.words.len() <= 8);
    }
}

#[test]
fn an_empty_query_is_refused_with_a_reason() {
    let Some(model) = common::load("tiny") else { return };
    let mut session = model.session().unwrap();
    let e = write_opener(&model, &mut session, "  \n", &opts(4, 8), Instant::now(), &CancelToken::default(), |_| {}).unwrap_err();
    assert_eq!(e, RequestError::EmptyQuery);
    let bad = opts(5, 3);
    let e = write_opener(&model, &mut session, "hi", &bad, Instant::now(), &CancelToken::default(), |_| {}).unwrap_err();
    assert!(e.to_string().contains("min_words"), "{e}");
}

#[test]
fn an_over_long_prompt_is_refused() {
    let Some(model) = common::load("tiny") else { return };
    let mut session = model.session().unwrap();
    let long = "word ".repeat(model.context_length() * 2);
    let e = write_opener(&model, &mut session, &long, &opts(4, 8), Instant::now(), &CancelToken::default(), |_| {}).unwrap_err();
    assert!(matches!(e, RequestError::PromptTooLong { .. }), "{e}");
}

fn collect(engine: &Engine, query: &str, cancel: CancelToken, after_first: impl Fn() + Send + 'static) -> mpsc::Receiver<OpenerEvent> {
    let (tx, rx) = mpsc::channel();
    let mut first = true;
    engine
        .submit(Job {
            query: query.into(),
            options: opts(4, 8),
            arrived: Instant::now(),
            cancel,
            sink: Box::new(move |ev| {
                let _ = tx.send(ev);
                if first {
                    first = false;
                    after_first();
                }
            }),
        })
        .map_err(|(e, _)| e)
        .unwrap();
    rx
}

#[test]
fn every_request_ends_with_exactly_one_terminal_event() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig::default()).unwrap();
    let rx = collect(&engine, SHOES, CancelToken::default(), || {});
    let events: Vec<OpenerEvent> = rx.iter().collect();
    let terminal = events.iter().filter(|e| matches!(e, OpenerEvent::Done(_) | OpenerEvent::Error(_))).count();
    assert_eq!(terminal, 1);
    let OpenerEvent::Done(done) = events.last().unwrap() else { panic!("last event is not Done: {events:?}") };
    let words: Vec<_> = events.iter().filter_map(|e| if let OpenerEvent::Word(w) = e { Some(w.clone()) } else { None }).collect();
    assert_eq!(words, done.words, "each word is streamed once, in order, before Done");
    assert!(words.iter().enumerate().all(|(i, w)| w.index == i));
}

#[test]
fn cancelling_stops_decoding_between_tokens() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig::default()).unwrap();
    let cancel = CancelToken::default();
    let c = cancel.clone();
    let rx = collect(&engine, SHOES, cancel, move || c.cancel());
    let events: Vec<OpenerEvent> = rx.iter().collect();
    assert!(matches!(events[0], OpenerEvent::Word(_)));
    assert_eq!(events.last(), Some(&OpenerEvent::Error(RequestError::Cancelled)));
    assert!(events.len() <= 3, "decoding went on after the cancel: {events:?}");
}

#[test]
fn a_full_queue_answers_busy_at_once() {
    let Some(model) = common::load("tiny") else { return };
    let engine = Engine::start(model, EngineConfig { workers: 1, queue_depth: 1 }).unwrap();
    // The first job holds the only worker inside its sink until released.
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let rx1 = collect(&engine, "first", CancelToken::default(), move || {
        started_tx.send(()).unwrap();
        let _ = release_rx.lock().unwrap().recv_timeout(Duration::from_secs(60));
    });
    started_rx.recv().unwrap();
    let rx2 = collect(&engine, "second, queued", CancelToken::default(), || {});
    let (e, _) = engine
        .submit(Job {
            query: "third".into(),
            options: opts(4, 8),
            arrived: Instant::now(),
            cancel: CancelToken::default(),
            sink: Box::new(|_| panic!("a refused job's sink must never be called")),
        })
        .unwrap_err();
    assert_eq!(e, RequestError::Busy { capacity: 1 });
    release_tx.send(()).unwrap();
    for rx in [rx1, rx2] {
        let last = rx.iter().last().unwrap();
        assert!(matches!(last, OpenerEvent::Done(_)), "queued work still completes: {last:?}");
    }
}
