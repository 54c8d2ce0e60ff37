//! `mulmd health`: asks a running daemon's gRPC health service whether it is serving.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::runtime;
use crate::config;

#[derive(Args)]
pub struct HealthArgs {
    /// Address of the daemon's gRPC API (default: grpc.listen of /etc/mulmd/mulmd.toml
    /// when it exists, else 127.0.0.1:50051).
    #[arg(long)]
    addr: Option<String>,
    /// Seconds to keep trying while the daemon starts.
    #[arg(long, default_value_t = 0.0)]
    wait: f64,
    /// The name the daemon's certificate is checked against when its config turns TLS on.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
}

pub fn run(a: HealthArgs) -> ExitCode {
    let (addr, wait) = (a.addr.clone(), a.wait);
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let installed = std::fs::read_to_string(config::DEFAULT_PATH).ok().and_then(|text| config::parse(&text).ok());
    let addr = addr.unwrap_or_else(|| installed.as_ref().map(|c| c.grpc.listen.clone()).filter(|l| !l.is_empty()).unwrap_or_else(|| "127.0.0.1:50051".into()));
    // With TLS on, trust exactly the daemon's own certificate, under the name `tls init`
    // always includes.
    let tls = match installed.as_ref().filter(|c| c.tls.enabled()).map(|c| std::fs::read(&c.tls.cert_file)) {
        Some(Ok(pem)) => Some(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem)).domain_name(a.tls_name.clone())),
        Some(Err(e)) => {
            eprintln!("mulmd health: tls.cert_file: {e}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if addr.contains("://") { addr.clone() } else { format!("{scheme}://{addr}") };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let until = Instant::now() + Duration::from_secs_f64(if wait.is_finite() { wait.clamp(0.0, 86_400.0) } else { 0.0 });
    rt.block_on(async move {
        loop {
            let result = async {
                let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| format!("{addr} is not an address: {e}"))?;
                if let Some(tls) = tls.clone() {
                    endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
                }
                let channel = endpoint
                    .connect()
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let mut client = HealthClient::new(channel);
                let r = client
                    .check(HealthCheckRequest { service: "mulm.v1.Answerer".into() })
                    .await
                    .map_err(|s| format!("{addr}: {}", s.message()))?;
                Ok::<_, String>(r.into_inner().status())
            }
            .await;
            match result {
                Ok(ServingStatus::Serving) => {
                    println!("{addr}: SERVING");
                    return ExitCode::SUCCESS;
                }
                Ok(other) if Instant::now() >= until => {
                    println!("{addr}: {}", other.as_str_name());
                    return ExitCode::FAILURE;
                }
                Err(e) if Instant::now() >= until => {
                    eprintln!("mulmd: {e}; is the service running? (systemctl status mulmd)");
                    return ExitCode::FAILURE;
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    })
}
