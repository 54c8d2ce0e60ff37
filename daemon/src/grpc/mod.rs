//! The gRPC front: `mulm.v1.Answerer` over TCP or a Unix socket, with grpc.health.v1 and
//! server reflection (v1 and v1alpha) so grpcurl works untold. It only translates the
//! pipeline's events; it never reimplements the pipeline.

mod convert;
mod service;

pub mod pb {
    tonic::include_proto!("mulm.v1");
    /// The encoded descriptor set of proto/mulm/v1, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mulm_v1_descriptor.bin"));
}

pub use crate::limits::Limits;
pub use service::AnswerService;

use std::future::Future;

use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;

/// The complete router: the Answerer service, health and reflection. The health reporter is
/// returned so the caller can flip it to NOT_SERVING before draining.
pub async fn router(service: AnswerService) -> Result<(Router, HealthReporter), String> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<pb::answerer_server::AnswererServer<AnswerService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::answerer_server::AnswererServer::new(service));
    Ok((router, health))
}

/// Serves on a TCP listener until `shutdown` resolves, then stops accepting and lets open
/// calls finish.
///
/// Every accepted connection gets TCP_NODELAY. With Nagle's algorithm on, a word sent while
/// the response headers still awaited the client's (delayed) ACK sat in the kernel for ~30 ms:
/// bench/grpc_latency.py measured mulm-28m's first word reaching the client 30 ms after the
/// engine emitted it. tonic sets the option only on listeners it binds itself.
pub async fn serve_tcp(router: Router, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("gRPC server: {e}"))
}

/// Serves on a Unix socket until `shutdown` resolves.
pub async fn serve_unix(router: Router, listener: tokio::net::UnixListener, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    router
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| format!("gRPC server: {e}"))
}
