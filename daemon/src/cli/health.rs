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
}

pub fn run(a: HealthArgs) -> ExitCode {
    let (addr, wait) = (a.addr, a.wait);
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let addr = addr.unwrap_or_else(|| {
        std::fs::read_to_string(config::DEFAULT_PATH)
            .ok()
            .and_then(|text| config::parse(&text).ok())
            .map(|c| c.grpc.listen)
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "127.0.0.1:50051".into())
    });
    let url = if addr.starts_with("http://") { addr.clone() } else { format!("http://{addr}") };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let until = Instant::now() + Duration::from_secs_f64(if wait.is_finite() { wait.clamp(0.0, 86_400.0) } else { 0.0 });
    rt.block_on(async move {
        loop {
            let result = async {
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("{addr} is not an address: {e}"))?
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
