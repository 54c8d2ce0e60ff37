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
    AnswerRequest { query: query.into(), options: None }
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
    let r = d.client().await.open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: None }).await.unwrap().into_inner();
    assert_eq!(r.opener, "Removing odor from inside your shoes is a");
    assert_eq!(r.words.len(), 8);
    assert_eq!(r.stop_reason, "word_budget");
    assert!(r.timings.unwrap().ttft_ms > 0.0);
    let r = d
        .client()
        .await
        .open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: Some(Options { max_words: Some(4), ..Default::default() }) })
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
    let e = c.open(OpenRequest { query: "   ".into(), options: None }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"));
    let e = c.answer(ask(&"why ".repeat(30))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_query_chars"), "{}", e.message());
    let e = c.open(OpenRequest { query: "hi".into(), options: Some(Options { max_words: Some(40), ..Default::default() }) }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_words_limit"));
    let e = c.open(OpenRequest { query: "hi".into(), options: Some(Options { temperature: Some(-2.0), ..Default::default() }) }).await.unwrap_err();
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
    let r = c.open(OpenRequest { query: "How do I remove odor from inside my shoes?".into(), options: None }).await.unwrap();
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
    let r = c.open(OpenRequest { query: "What is the capital of France?".into(), options: None }).await.unwrap();
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
