//! The daemon's gRPC API with a tonic client: the whole server in-process on port 0.

mod common;

use std::time::Duration;

use mulmd::config::Config;
use mulmd::grpc::pb::answer_event::Event;
use mulmd::grpc::pb::answerer_client::AnswererClient;
use mulmd::grpc::pb::{AnswerRequest, OpenRequest, Options};
use tokio_util::sync::CancellationToken;
use tonic::Code;

struct Daemon {
    addr: String,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start(model: &str, tune: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = common::fixture(model)?;
        let mut config = Config::default();
        config.model.dir = dir;
        config.grpc.listen = "127.0.0.1:0".into();
        tune(&mut config);
        let prepared = tokio::task::spawn_blocking(move || mulmd::daemon::prepare(config)).await.unwrap().unwrap();
        let listeners = mulmd::daemon::bind(&prepared.config).await.unwrap();
        let addr = format!("http://{}", listeners.tcp.as_ref().unwrap().local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let done = tokio::spawn(async move { mulmd::daemon::run(prepared, listeners, s.cancelled_owned()).await.unwrap() });
        Some(Self { addr, stop, done })
    }

    async fn client(&self) -> AnswererClient<tonic::transport::Channel> {
        AnswererClient::connect(self.addr.clone()).await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.done).await.expect("the daemon stops within its grace period").unwrap();
    }
}

fn ask(query: &str) -> AnswerRequest {
    AnswerRequest { query: query.into(), options: None, ..Default::default() }
}

#[tokio::test]
async fn an_answer_streams_words_then_the_opener_then_the_rest_then_one_final() {
    let Some(d) = Daemon::start("smollm2", |_| {}).await else { return };
    let mut stream = d.client().await.answer(ask("How do I remove odor from inside my shoes?")).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.unwrap() {
        events.push(ev.event.unwrap());
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::Word(_) => "word",
            Event::OpenerDone(_) => "opener_done",
            Event::Delta(_) => "delta",
            Event::Correction(_) => "correction",
            Event::Final(_) => "final",
        })
        .collect();
    let opener_done = kinds.iter().position(|k| *k == "opener_done").unwrap();
    assert!(kinds[..opener_done].iter().all(|k| *k == "word") && opener_done == 8, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "final").count(), 1);
    assert_eq!(kinds.last(), Some(&"final"));
    let Some(Event::Final(f)) = events.last() else { unreachable!() };
    assert_eq!(f.opener, "Removing odor from inside your shoes is a");
    assert_eq!(f.fallback.as_ref().unwrap().reason, "not_configured");
    assert!(f.text.starts_with(&f.opener) && f.text.len() > f.opener.len());
    d.stop().await;
}

#[tokio::test]
async fn open_returns_only_the_opener() {
    let Some(d) = Daemon::start("smollm2", |_| {}).await else { return };
    let r = d.client().await.open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: None, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.opener, "Removing odor from inside your shoes is a");
    assert_eq!(r.words.len(), 8);
    assert_eq!(r.stop_reason, "word_budget");
    assert!(r.timings.unwrap().ttft_ms > 0.0);
    let r = d
        .client()
        .await
        .open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: Some(Options { max_words: Some(4), ..Default::default() }), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.opener, "Removing odor from inside");
    d.stop().await;
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_that_say_why() {
    let Some(d) = Daemon::start("tiny", |c| c.opener.max_query_chars = 50).await else { return };
    let mut c = d.client().await;
    let e = c.open(OpenRequest { query: "   ".into(), options: None, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"));
    let e = c.answer(ask(&"why ".repeat(30))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_query_chars"), "{}", e.message());
    let e = c.open(OpenRequest { query: "hi".into(), options: Some(Options { max_words: Some(40), ..Default::default() }), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_words_limit"));
    let e = c.open(OpenRequest { query: "hi".into(), options: Some(Options { temperature: Some(-2.0), ..Default::default() }), ..Default::default() }).await.unwrap_err();
    assert!(e.message().contains("temperature"));
    d.stop().await;
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted() {
    let Some(d) = Daemon::start("smollm2", |c| {
        c.engine.workers = 1;
        c.engine.queue_depth = 1;
    })
    .await
    else {
        return;
    };
    let q = "How do I remove odor from inside my shoes?";
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(d.client().await);
    }
    let calls = clients.into_iter().map(|mut c| async move {
        match c.answer(ask(q)).await {
            Err(e) => Err(e.code()),
            Ok(r) => {
                let mut s = r.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(e.code()),
                    }
                }
            }
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.contains(&Err(Code::ResourceExhausted)), "{results:?}");
    assert!(results.contains(&Ok(())), "the requests that got a place are answered: {results:?}");
    d.stop().await;
}

#[tokio::test]
async fn a_passed_deadline_ends_the_stream_and_the_daemon_keeps_serving() {
    let Some(d) = Daemon::start("smollm2", |_| {}).await else { return };
    let mut req = tonic::Request::new(ask("How do I remove odor from inside my shoes?"));
    req.set_timeout(Duration::from_millis(30));
    let mut c = d.client().await;
    let code = match c.answer(req).await {
        Err(e) => e.code(),
        Ok(r) => {
            let mut s = r.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("a 30 ms deadline cannot fit a SmolLM2 answer"),
                    Err(e) => break e.code(),
                }
            }
        }
    };
    assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
    let r = c.open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: None, ..Default::default() }).await.unwrap();
    assert_eq!(r.into_inner().opener, "Removing odor from inside your shoes is a");
    d.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_frees_the_worker() {
    let Some(d) = Daemon::start("smollm2", |c| {
        c.engine.workers = 1;
        c.engine.queue_depth = 1;
    })
    .await
    else {
        return;
    };
    let mut c = d.client().await;
    let mut s = c.answer(ask("How do I remove odor from inside my shoes?")).await.unwrap().into_inner();
    assert!(matches!(s.message().await.unwrap().unwrap().event, Some(Event::Word(_))));
    drop(s);
    // The cancelled answer stops between tokens; the next request gets the worker.
    let r = c.open(OpenRequest { query: "What is the capital of France?".into(), options: None, ..Default::default() }).await.unwrap();
    assert_eq!(r.into_inner().opener, "The capital of France is Paris.");
    d.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer_untold() {
    let Some(d) = Daemon::start("tiny", |_| {}).await else { return };
    let channel = tonic::transport::Channel::from_shared(d.addr.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "mulm.v1.Answerer".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("{resp:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"mulm.v1.Answerer".to_string()) && names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    d.stop().await;
}

/// The code a streaming call ends with: its status, or Ok after its last event.
async fn outcome(c: &mut AnswererClient<tonic::transport::Channel>, req: impl tonic::IntoRequest<AnswerRequest>) -> Result<Vec<Event>, tonic::Status> {
    let mut s = c.answer(req).await?.into_inner();
    let mut events = Vec::new();
    while let Some(ev) = s.message().await? {
        events.extend(ev.event);
    }
    Ok(events)
}

#[tokio::test]
async fn a_query_within_the_character_limit_but_too_many_tokens_is_refused_naming_the_limit() {
    let Some(d) = Daemon::start("smollm2", |_| {}).await else { return };
    let mut c = d.client().await;
    // 1,500 CJK characters: within opener.max_query_chars (2,000), far past 1,024 tokens.
    let e = outcome(&mut c, ask(&"日本語の長い質問".repeat(188))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("opener.max_prompt_tokens"), "{}", e.message());
    // Refused before it took a worker: the next question is answered at once.
    let r = c.open(OpenRequest { query: "What is the capital of France?".into(), options: None, ..Default::default() }).await.unwrap();
    assert_eq!(r.into_inner().opener, "The capital of France is Paris.");
    d.stop().await;
}

#[tokio::test]
async fn requests_whose_deadline_passed_while_queued_give_their_place_back() {
    let Some(d) = Daemon::start("smollm2", |c| {
        c.engine.workers = 1;
        c.engine.queue_depth = 1;
        c.opener.max_words_limit = 64;
    })
    .await
    else {
        return;
    };
    // One long answer holds the only worker (64 words, no early stop).
    let long = AnswerRequest {
        query: "How do I remove odor from inside my shoes?".into(),
        options: Some(Options { min_words: Some(64), max_words: Some(64), cloud: Some(false), ..Default::default() }),
        ..Default::default()
    };
    let mut holder = d.client().await.answer(long).await.unwrap().into_inner();
    assert!(matches!(holder.message().await.unwrap().unwrap().event, Some(Event::Word(_))), "the worker has it");
    // Five callers in turn take the only queue place and give up after 50 ms.
    let mut c = d.client().await;
    for _ in 0..5 {
        let mut req = tonic::Request::new(ask("What is the capital of France?"));
        req.set_timeout(Duration::from_millis(50));
        let code = outcome(&mut c, req).await.unwrap_err().code();
        assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
    }
    // Their places are free again: the next caller waits its turn instead of being refused.
    let events = outcome(&mut c, ask("What is the capital of France?")).await.expect("not refused as busy");
    assert!(matches!(events.last(), Some(Event::Final(_))));
    while holder.message().await.unwrap().is_some() {}
    d.stop().await;
}

/// A raw HTTP/2 call of `Answer` with the given `grpc-timeout`, as no well-behaved client
/// would send it; returns the response's status code and gRPC status.
async fn raw_answer(addr: &str, grpc_timeout: &str) -> (u16, Option<String>) {
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    let stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let msg = AnswerRequest { query: "What is the capital of France?".into(), options: Some(Options { cloud: Some(false), ..Default::default() }), ..Default::default() }.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = hyper::Request::post(format!("{addr}/mulm.v1.Answerer/Answer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(Full::new(bytes::Bytes::from(framed)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let header_status = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    let collected = resp.into_body().collect().await.unwrap();
    let trailer_status = collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap().to_string());
    (status, trailer_status.or(header_status))
}

#[tokio::test]
async fn grpc_timeouts_no_client_would_send_never_panic_the_handler() {
    let Some(d) = Daemon::start("smollm2", |_| {}).await else { return };
    for v in ["123456789S", "18446744073709551615H", "99999999H", "-5S", "5x", ""] {
        let (http, grpc) = raw_answer(&d.addr, v).await;
        assert_eq!(http, 200, "{v:?}");
        // Answered in full (the header ignored, or a deadline far away): status OK.
        assert_eq!(grpc.as_deref(), Some("0"), "grpc-timeout {v:?}");
    }
    d.stop().await;
}

/// Two questions of one conversation, the second asked with only its conversation id: the
/// cloud hears the first question and the answer it got before the second.
#[tokio::test]
async fn a_follow_up_with_a_conversation_id_carries_the_earlier_turns() {
    use common::fake_cloud::{chunk, done, fake_cloud, finish, Reply};
    let cloud = fake_cloud(vec![
        Reply::Stream(vec![chunk(" and it is Paris."), finish(), done()]),
        Reply::Stream(vec![chunk(" about two million people."), finish(), done()]),
        Reply::Stream(vec![chunk(" yes."), finish(), done()]),
    ])
    .await;
    let url = cloud.url.clone();
    let Some(d) = Daemon::start("smollm2", move |c| {
        c.cloud.enabled = true;
        c.cloud.base_url = url;
        c.cloud.max_retries = 0;
    })
    .await
    else {
        return;
    };
    let mut c = d.client().await;
    let first = AnswerRequest { query: "What is the capital of France?".into(), conversation_id: "trip-1".into(), ..Default::default() };
    let Some(Event::Final(f1)) = outcome(&mut c, first).await.unwrap().pop() else { panic!("no final") };
    let second = AnswerRequest { query: "And its population?".into(), conversation_id: "trip-1".into(), ..Default::default() };
    let Some(Event::Final(f2)) = outcome(&mut c, second).await.unwrap().pop() else { panic!("no final") };
    assert!(f2.text.ends_with("about two million people."));
    let sent = cloud.bodies.lock().unwrap()[1]["messages"].clone();
    let texts: Vec<&str> = sent.as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    assert!(texts.contains(&"What is the capital of France?"), "{texts:?}");
    assert!(texts.contains(&f1.text.as_str()), "the first answer, as shown, is the assistant's turn: {texts:?}");
    let last_user = sent.as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap();
    assert_eq!(last_user["content"], "And its population?");
    // The same context sent as history instead, with a system prompt.
    let third = AnswerRequest {
        query: "Is it sunny there?".into(),
        system: "Answer in one short sentence.".into(),
        history: vec![
            mulmd::grpc::pb::Turn { speaker: mulmd::grpc::pb::Speaker::User as i32, text: "I am in Paris.".into() },
            mulmd::grpc::pb::Turn { speaker: mulmd::grpc::pb::Speaker::Assistant as i32, text: "Lovely city.".into() },
        ],
        ..Default::default()
    };
    outcome(&mut c, third).await.unwrap();
    let sent = cloud.bodies.lock().unwrap()[2]["messages"].clone();
    assert!(sent[0]["content"].as_str().unwrap().starts_with("Answer in one short sentence."));
    assert_eq!((sent[1]["content"].as_str(), sent[2]["content"].as_str()), (Some("I am in Paris."), Some("Lovely city.")));
    d.stop().await;
}
