//! The gRPC front: `mulm.v1.Answerer` over TCP or a Unix socket, with grpc.health.v1 and
//! server reflection (v1 and v1alpha) so grpcurl works untold. On TCP, [`Access`] adds what a
//! LAN listener needs: bearer tokens, TLS, gRPC-Web for browsers behind a CORS allow-list. It
//! only translates the answer service's events; it never composes an answer itself.

mod convert;
mod service;

pub mod pb {
    tonic::include_proto!("mulm.v1");
    /// The encoded descriptor set of proto/mulm/v1, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mulm_v1_descriptor.bin"));
}

pub use service::AnswerService;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;
use tonic::transport::ServerTlsConfig;
use tonic_web::GrpcWebLayer;
use tower::layer::util::{Identity, Stack};
use tower::util::Either;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tonic_health::server::HealthReporter;

use crate::host::secrets::Tokens;

/// Why the gRPC front could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("gRPC TLS: {0}")]
    Tls(String),
}

/// HTTP/2 PINGs on idle connections, so a peer that vanished (a phone that left the Wi-Fi) is
/// noticed and its streams dropped instead of held.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a call may take before its response starts: reading the request and, for
/// `Open`, the whole opener. A stream that opens and never sends its request is dropped after
/// this instead of held. An `Answer`'s events flow after its response starts, so the bound is
/// not theirs (the cloud's own timeouts bound those).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Streams one connection may have open at once.
const MAX_STREAMS: u32 = 64;

/// Who may call a listener's services, and how: tokens (None: no token asked for), TLS,
/// gRPC-Web, the browser origins allowed (CORS).
#[derive(Default)]
pub struct Access {
    pub tokens: Option<Arc<Tokens>>,
    pub tls: Option<ServerTlsConfig>,
    pub web: bool,
    pub cors_origins: Vec<String>,
}

/// The router with its layers (CORS, then gRPC-Web when on).
pub type GrpcRouter = Router<Stack<Either<GrpcWebLayer, Identity>, Stack<CorsLayer, Identity>>>;

/// CORS for browser pages of the allowed origins: the headers gRPC-Web requests carry (the
/// token's included) and the ones their responses must expose. No origin listed: no CORS
/// headers, so a browser lets no other origin's page read a response.
fn cors(origins: &[String]) -> CorsLayer {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let names = |list: &[&'static str]| list.iter().map(|n| HeaderName::from_static(n)).collect::<Vec<_>>();
    let mut request_headers = names(&["x-grpc-web", "x-user-agent", "grpc-timeout", "x-request-id"]);
    request_headers.extend([header::CONTENT_TYPE, header::AUTHORIZATION]);
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::POST])
        .allow_headers(request_headers)
        .expose_headers(names(&["grpc-status", "grpc-message", "grpc-status-details-bin"]))
        .max_age(Duration::from_secs(3600))
}

/// The complete router: the Answerer service, health and reflection. The health reporter is
/// returned so the caller can flip it to NOT_SERVING before draining.
pub async fn router(service: AnswerService, access: Access) -> Result<(GrpcRouter, HealthReporter), GrpcError> {
    let Access { tokens, tls, web, cors_origins } = access;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::answerer_server::AnswererServer<AnswerService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| GrpcError::Reflection(e.to_string()))?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| GrpcError::Tls(e.to_string()))?;
    }
    let router = builder
        // Browsers speak gRPC-Web over HTTP/1.1 as well as HTTP/2.
        .accept_http1(web)
        .layer(cors(&cors_origins))
        .layer(tower::util::option_layer(web.then(tonic_web::GrpcWebLayer::new)))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        .timeout(CALL_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, authorize(tokens.clone())))
        .add_service(InterceptedService::new(reflection_v1alpha, authorize(tokens.clone())))
        .add_service(pb::answerer_server::AnswererServer::with_interceptor(service, authorize(tokens)));
    Ok((router, health))
}

/// The check in front of every service but health (which says only whether the daemon
/// serves): with tokens configured, a call needs `authorization: Bearer <token>` metadata,
/// else it ends UNAUTHENTICATED saying what is missing. The token's name is logged, never
/// the token.
fn authorize(tokens: Option<Arc<Tokens>>) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let Some(tokens) = &tokens else { return Ok(req) };
        match tokens.authorize(req.metadata().get("authorization").and_then(|v| v.to_str().ok())) {
            Ok(name) => {
                tracing::debug!(token = name, "authorized");
                Ok(req)
            }
            Err(why) => Err(tonic::Status::unauthenticated(why)),
        }
    }
}

/// Serves on a TCP listener until `shutdown` resolves, then stops accepting and lets open
/// calls finish.
///
/// Every accepted connection gets TCP_NODELAY. With Nagle's algorithm on, a word sent while
/// the response headers still awaited the client's (delayed) ACK sat in the kernel for ~30 ms:
/// bench/grpc_latency.py measured mulm-28m's first word reaching the client 30 ms after the
/// engine emitted it. tonic sets the option only on listeners it binds itself.
pub async fn serve_tcp(router: GrpcRouter, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), GrpcError> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(|e| GrpcError::Serve(e.to_string()))
}

/// Serves on a Unix socket until `shutdown` resolves.
pub async fn serve_unix(router: GrpcRouter, listener: tokio::net::UnixListener, shutdown: impl Future<Output = ()>) -> Result<(), GrpcError> {
    router
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| GrpcError::Serve(e.to_string()))
}
