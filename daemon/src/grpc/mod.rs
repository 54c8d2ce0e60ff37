//! The gRPC front: `mulm.v1.Answerer` over TCP or a Unix socket, with grpc.health.v1 and
//! server reflection (v1 and v1alpha) so grpcurl works untold. It only translates the answer
//! service's events; it never composes an answer itself.

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
use tonic_health::server::HealthReporter;

use crate::host::secrets::Tokens;

/// Why the gRPC front could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Serve(String),
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

/// The complete router: the Answerer service, health and reflection. The health reporter is
/// returned so the caller can flip it to NOT_SERVING before draining.
pub async fn router(service: AnswerService, tokens: Option<Arc<Tokens>>) -> Result<(Router, HealthReporter), GrpcError> {
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
    let router = tonic::transport::Server::builder()
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

/// Serves on a TCP listener until `shutdown` resolves, then stops accepting and lets open
/// calls finish.
///
/// Every accepted connection gets TCP_NODELAY. With Nagle's algorithm on, a word sent while
/// the response headers still awaited the client's (delayed) ACK sat in the kernel for ~30 ms:
/// bench/grpc_latency.py measured mulm-28m's first word reaching the client 30 ms after the
/// engine emitted it. tonic sets the option only on listeners it binds itself.
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

pub async fn serve_tcp(router: Router, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), GrpcError> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(|e| GrpcError::Serve(e.to_string()))
}

/// Serves on a Unix socket until `shutdown` resolves.
pub async fn serve_unix(router: Router, listener: tokio::net::UnixListener, shutdown: impl Future<Output = ()>) -> Result<(), GrpcError> {
    router
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| GrpcError::Serve(e.to_string()))
}
