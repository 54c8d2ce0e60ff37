//! Serving an axum router on a listener the daemon bound: plain or TLS, with the timeouts a
//! LAN-facing listener needs, until shutdown. The HTTP APIs and /metrics both run on it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

/// A client must send its request head within this after connecting (or after its TLS
/// handshake): a connection that sends nothing cannot hold a socket for long.
const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// And each later request head within this (HTTP/1.1 keep-alive).
const HEADER_READ: Duration = Duration::from_secs(10);
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections; a peer that does not answer one in time is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` (TLS when `tls` is set) until `shutdown` resolves, then stops
/// accepting and lets open requests finish (the daemon bounds that with its grace period).
pub async fn serve(
    router: Router,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::<std::net::SocketAddr>::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(None);
    });
    let app = router.into_make_service();
    let mut server = axum_server::Server::from_listener(listener).handle(handle).first_request_timeout(FIRST_REQUEST);
    let builder = server.http_builder();
    builder.http1().header_read_timeout(HEADER_READ);
    builder.http2().keep_alive_interval(KEEPALIVE_INTERVAL).keep_alive_timeout(KEEPALIVE_TIMEOUT);
    match tls {
        None => server.serve(app).await,
        Some(config) => {
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(axum_server::tls_rustls::RustlsConfig::from_config(config)).handshake_timeout(HANDSHAKE);
            server.acceptor(acceptor).serve(app).await
        }
    }
}
