//! The opener as a user sees it: words, stops, determinism, events, cancellation, queueing.

mod common;

use std::sync::Arc;
use std::time::Instant;

use mulmd::engine::{
    write_opener, Engine, EngineConfig, Model, OpenerEvent, OpenerEvents, OpenerOptions, Prompt, RequestError, Sampling,
    Speaker, StopReason, Turn,
};
use tokio_util::sync::CancellationToken;

const SHOES: &str = "How do I remove odor from inside my shoes?";

fn opts(min: usize, max: usize) -> OpenerOptions {
    OpenerOptions { min_words: min, max_words: max, ..Default::default() }
}

fn run(model: &Arc<Model>, query: &str, o: &OpenerOptions) -> (Vec<String>, mulmd::engine::Opener) {
    let mut session = model.session().unwrap();
    let mut streamed = Vec::new();
    let opener = write_opener(model, &mut session, &Prompt::question(query), o, Instant::now(), &CancellationToken::new(), |w| {
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

fn write(model: &Arc<Model>, query: &str, o: &OpenerOptions) -> Result<mulmd::engine::Opener, RequestError> {
    let mut session = model.session().unwrap();
    write_opener(model, &mut session, &Prompt::question(query), o, Instant::now(), &CancellationToken::new(), |_| {})
}

#[test]
fn an_empty_query_is_refused_with_a_reason() {
    let Some(model) = common::load("tiny") else { return };
    assert_eq!(write(&model, "  \n", &opts(4, 8)).unwrap_err(), RequestError::EmptyQuery);
    let e = write(&model, "hi", &opts(5, 3)).unwrap_err();
    assert!(e.to_string().contains("min_words"), "{e}");
}

#[test]
fn an_over_long_prompt_is_refused() {
    let Some(model) = common::load("tiny") else { return };
    let long = "word ".repeat(model.context_length() * 2);
    let e = write(&model, &long, &opts(4, 8)).unwrap_err();
    assert!(matches!(e, RequestError::PromptTooLong { .. }), "{e}");
}

fn submit(engine: &Engine, query: &str, o: OpenerOptions, cancel: CancellationToken) -> OpenerEvents {
    engine.submit(&Prompt::question(query), o, Instant::now(), cancel).unwrap()
}

fn drain(mut events: OpenerEvents) -> Vec<OpenerEvent> {
    std::iter::from_fn(|| events.blocking_recv()).collect()
}

/// Long enough to still be decoding when the test acts: 64 words, no early stop.
fn long() -> OpenerOptions {
    OpenerOptions { max_tokens: 512, ..opts(64, 64) }
}

#[test]
fn every_request_ends_with_exactly_one_terminal_event() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig::default()).unwrap();
    let events = drain(submit(&engine, SHOES, opts(4, 8), CancellationToken::new()));
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
    let cancel = CancellationToken::new();
    let mut events = submit(&engine, SHOES, long(), cancel.clone());
    assert!(matches!(events.blocking_recv(), Some(OpenerEvent::Word(_))));
    cancel.cancel();
    let rest = drain(events);
    assert_eq!(rest.last(), Some(&OpenerEvent::Error(RequestError::Cancelled)), "{rest:?}");
    assert!(rest.len() < 16, "decoding went on long after the cancel: {} more words", rest.len() - 1);
}

#[test]
fn a_long_prompt_is_fed_in_chunks_that_a_cancel_stops() {
    let Some(model) = common::load("smollm2") else { return };
    let config = EngineConfig { prefill_chunk: 16, max_prompt_tokens: 2000, ..EngineConfig::default() };
    let engine = Engine::start(model, config).unwrap();
    let question = format!("{} What did I just say?", "The quick brown fox jumps over the lazy dog. ".repeat(30));
    // Whole, in chunks of 16: the same opener as fed at once (chunks change only rounding).
    let chunked = drain(submit(&engine, &question, opts(4, 8), CancellationToken::new()));
    let Some(OpenerEvent::Done(o)) = chunked.last() else { panic!("{chunked:?}") };
    assert!(o.prompt_tokens > 300, "{}", o.prompt_tokens);
    let whole = write(engine.model(), &question, &opts(4, 8)).unwrap();
    assert_eq!(o.text, whole.text);
    // Cancelled at once: stopped between chunks (or before it began), with no word written.
    let cancel = CancellationToken::new();
    let events = submit(&engine, &question, opts(4, 8), cancel.clone());
    cancel.cancel();
    assert_eq!(drain(events), [OpenerEvent::Error(RequestError::Cancelled)]);
}

/// Home Assistant's shape: a system prompt listing devices, then turns that resend it.
fn home(history: &[(Speaker, &str)], query: &str) -> Prompt {
    let devices: String = (0..20).map(|i| format!("- names: Lamp {i}\n  domain: light\n  state: 'off'\n  areas: Room {i}\n")).collect();
    Prompt {
        system: Some(format!("You are a voice assistant for Home Assistant.\nDevices:\n{devices}")),
        history: history.iter().map(|(speaker, text)| Turn { speaker: *speaker, text: text.to_string() }).collect(),
        query: query.into(),
        continue_from: None,
    }
}

fn done(engine: &Engine, prompt: &Prompt) -> mulmd::engine::Opener {
    let events = drain(engine.submit(prompt, opts(4, 8), Instant::now(), CancellationToken::new()).unwrap());
    match events.last() {
        Some(OpenerEvent::Done(o)) => o.clone(),
        other => panic!("no Done: {other:?}"),
    }
}

#[test]
fn repeats_and_follow_ups_feed_only_their_new_tokens_and_write_the_same_openers() {
    let Some(model) = common::load("smollm2") else { return };
    let config = EngineConfig { max_prompt_tokens: 4096, prefix_cache_bytes: 256 << 20, ..EngineConfig::default() };
    let engine = Engine::start(model.clone(), config).unwrap();
    let cold = Engine::start(model.clone(), EngineConfig { prefix_cache_bytes: 0, ..config }).unwrap();
    let first = done(&engine, &home(&[], "Turn on lamp 3."));
    assert!(first.prompt_tokens > 300, "{}", first.prompt_tokens);
    assert!(first.reused_tokens < 10, "only the template's own start can be reused: {}", first.reused_tokens);

    // Another question on the same system prompt: everything up to the question is reused.
    let repeat = home(&[], "Is lamp 7 on?");
    let again = done(&engine, &repeat);
    // Fed: the question and the template's closing markers, a dozen tokens or so.
    assert!(again.prompt_tokens - again.reused_tokens <= 16, "reused {} of {}", again.reused_tokens, again.prompt_tokens);

    // A follow-up resends the conversation: the whole earlier prompt is reused.
    let follow = home(&[(Speaker::User, "Is lamp 7 on?"), (Speaker::Assistant, &again.text)], "And lamp 8?");
    let next = done(&engine, &follow);
    assert!(next.reused_tokens >= again.prompt_tokens - 1, "reused {} of the {} before", next.reused_tokens, again.prompt_tokens);

    // What the listener hears does not depend on where the prompt's cache came from.
    assert_eq!(again.text, done(&cold, &repeat).text);
    assert_eq!(next.text, done(&cold, &follow).text);
}

#[test]
fn a_prompt_over_the_token_limit_is_refused_before_it_queues() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig { max_prompt_tokens: 64, ..EngineConfig::default() }).unwrap();
    // 200 CJK characters: well under any character limit, far over 64 tokens.
    let query = "日本語の文章".repeat(34);
    let e = engine.submit(&Prompt::question(query), opts(4, 8), Instant::now(), CancellationToken::new()).err().unwrap();
    let RequestError::PromptTooLong { tokens, limit: 64, setting } = &e else { panic!("{e:?}") };
    assert!(*tokens > 64 && setting.contains("max_prompt_tokens"), "{e}");
    assert!(e.to_string().contains("opener.max_prompt_tokens"), "{e}");
    assert_eq!(engine.queue_depth(), 0);
}

#[test]
fn with_a_request_running_a_full_queue_is_busy_and_a_cancelled_one_frees_its_place() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig { workers: 1, queue_depth: 1, ..EngineConfig::default() }).unwrap();
    // The first request holds the only worker for 64 words; the second waits in the queue.
    let mut first = submit(&engine, SHOES, long(), CancellationToken::new());
    assert!(matches!(first.blocking_recv(), Some(OpenerEvent::Word(_))), "the worker has it");
    let second_cancel = CancellationToken::new();
    let second = submit(&engine, "second, queued", opts(4, 8), second_cancel.clone());
    assert_eq!(engine.queue_depth(), 1);
    let e = engine.submit(&Prompt::question("third"), opts(4, 8), Instant::now(), CancellationToken::new()).err().unwrap();
    assert_eq!(e, RequestError::Busy { capacity: 1 });
    // The second's client goes away: its place is free for the next request at once.
    second_cancel.cancel();
    assert_eq!(engine.queue_depth(), 0);
    let fourth = submit(&engine, "fourth", opts(4, 8), CancellationToken::new());
    assert_eq!(drain(second), [OpenerEvent::Error(RequestError::Cancelled)]);
    for events in [first, fourth] {
        let last = drain(events).pop().unwrap();
        assert!(matches!(last, OpenerEvent::Done(_)), "queued work still completes: {last:?}");
    }
}

#[test]
fn stopping_the_engine_ends_queued_and_running_requests() {
    let Some(model) = common::load("smollm2") else { return };
    let engine = Engine::start(model, EngineConfig { workers: 1, queue_depth: 4, ..EngineConfig::default() }).unwrap();
    let mut running = submit(&engine, SHOES, long(), CancellationToken::new());
    assert!(matches!(running.blocking_recv(), Some(OpenerEvent::Word(_))));
    let queued = submit(&engine, "queued", opts(4, 8), CancellationToken::new());
    engine.shutdown();
    assert_eq!(drain(queued), [OpenerEvent::Error(RequestError::ShuttingDown)]);
    assert_eq!(drain(running).last(), Some(&OpenerEvent::Error(RequestError::ShuttingDown)));
}
