//! mDNS / DNS-SD: a companion app finds the board as `_mulmd._tcp` without the user typing an
//! address. Advertised only while a gRPC or HTTP listener is reachable beyond loopback (a
//! loopback-only daemon has nothing to offer the LAN), withdrawn at stop with a goodbye so
//! browsers drop it at once.
//!
//! TXT records: `api` (the gRPC API's package), `grpc` and `http` (ports, empty when that
//! listener is off or on loopback), `tls` (0|1), `auth` (bearer|none), `model`, and `fp`, the
//! first 16 hex digits of the certificate's SHA-256 (enough for an app to tell which of the
//! certificates it pinned to expect, not a substitute for checking the whole fingerprint).

use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceInfo};

use crate::config::DiscoverySection;

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_mulmd._tcp.local.";
/// How long the stop waits for the goodbye packets to go out.
const GOODBYE: Duration = Duration::from_secs(1);

/// What is advertised.
pub struct Offer<'a> {
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub tls_fingerprint: Option<&'a str>,
    pub tokens: bool,
    pub model: &'a str,
}

/// A registered service; [`Advert::withdraw`] takes it back.
pub struct Advert {
    mdns: ServiceDaemon,
    fullname: String,
}

/// Advertises the offer as `[discovery]` says: None when it is off, when no listener is
/// beyond loopback, or when mDNS fails (logged: the daemon serves on, and apps need the
/// address).
pub fn announce(cfg: &DiscoverySection, offer: &Offer) -> Option<Advert> {
    if !cfg.mdns {
        return None;
    }
    let instance = match cfg.instance.as_str() {
        "" => format!("mulmd on {}", crate::host::sys::host_name().unwrap_or_else(|| "this board".into())),
        name => name.to_string(),
    };
    advertise(&instance, offer).unwrap_or_else(|e| {
        tracing::warn!("{e}; apps will need the address");
        None
    })
}

/// Registers the offer under `instance` when one of its listeners is reachable beyond
/// loopback; None when neither is.
fn advertise(instance: &str, offer: &Offer) -> Result<Option<Advert>, String> {
    let lan = |a: &Option<SocketAddr>| a.filter(|a| !a.ip().is_loopback());
    let (grpc, http) = (lan(&offer.grpc), lan(&offer.http));
    let Some(main) = grpc.or(http) else { return Ok(None) };
    let port_of = |a: Option<SocketAddr>| a.map(|a| a.port().to_string()).unwrap_or_default();
    let fp: String = offer.tls_fingerprint.map(|f| f.trim_start_matches("SHA256:").replace(':', "").chars().take(16).collect()).unwrap_or_default();
    let txt = [
        ("api", "mulm.v1".to_string()),
        ("grpc", port_of(grpc)),
        ("http", port_of(http)),
        ("tls", if offer.tls_fingerprint.is_some() { "1" } else { "0" }.to_string()),
        ("auth", if offer.tokens { "bearer" } else { "none" }.to_string()),
        ("model", offer.model.to_string()),
        ("fp", fp),
    ];
    let host = crate::host::sys::host_name().unwrap_or_else(|| "mulmd".into());
    let ip = if main.ip().is_unspecified() { String::new() } else { main.ip().to_string() };
    let mut info = ServiceInfo::new(SERVICE_TYPE, instance, &format!("{host}.local."), ip.as_str(), main.port(), &txt[..])
        .map_err(|e| format!("mDNS: {e}"))?;
    if main.ip().is_unspecified() {
        // Bound to every interface: advertise every address the interfaces have, kept current.
        info = info.enable_addr_auto();
    }
    let fullname = info.get_fullname().to_string();
    let mdns = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    mdns.register(info).map_err(|e| format!("mDNS: registering {fullname}: {e}"))?;
    Ok(Some(Advert { mdns, fullname }))
}

impl Advert {
    pub fn name(&self) -> &str {
        &self.fullname
    }

    /// Sends the goodbye (waiting up to a second for it) and stops the responder.
    pub fn withdraw(self) {
        if let Ok(done) = self.mdns.unregister(&self.fullname) {
            let _ = done.recv_timeout(GOODBYE);
        }
        let _ = self.mdns.shutdown();
    }
}
