//! `mulmd serve`: the daemon. Reads the configuration (exit 78 with every problem listed when
//! it is wrong), sets up logging as it says, then runs `daemon` until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{init_logging, report_config_problems, runtime, EXIT_CONFIG};
use crate::config::{self, Config, LogFormat};
use crate::daemon;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (default /etc/mulmd/mulmd.toml when it exists, else defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: ServeArgs, log: Option<String>) -> ExitCode {
    let path = args.config.or_else(|| Some(PathBuf::from(config::DEFAULT_PATH)).filter(|p| p.exists()));
    let config = match &path {
        Some(p) => match config::load(p) {
            Ok(c) => c,
            Err(problems) => {
                init_logging("warn", false);
                report_config_problems(p, &problems);
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::default(),
    };
    init_logging(log.as_deref().unwrap_or(&config.log.level), config.log.format == LogFormat::Json);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async move {
        let shutdown = daemon::signals()?;
        let prepared = tokio::task::spawn_blocking(move || daemon::prepare(config))
            .await
            .map_err(|e| daemon::StartError::Runtime(e.to_string()))??;
        // Where it listens is in the "serving ..." log line (and systemd's STATUS).
        let listeners = daemon::bind(&prepared.config).await?;
        daemon::run(prepared, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mulmd: {e}");
            ExitCode::from(if e.is_config() { EXIT_CONFIG } else { 1 })
        }
    }
}
