//! `mulmd print-config` and `mulmd check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{report_config_problems, EXIT_CONFIG};
use crate::config;

#[derive(Args)]
pub struct CheckArgs {
    #[arg(default_value = config::DEFAULT_PATH)]
    file: PathBuf,
}

pub fn print() -> ExitCode {
    print!("{}", config::TEMPLATE);
    ExitCode::SUCCESS
}

/// Every problem with its key and fix (exit 78), else "ok" and any warnings (exit 0).
pub fn check(a: CheckArgs) -> ExitCode {
    match config::load(&a.file) {
        Ok(c) => {
            for w in config::warnings(&c) {
                eprintln!("  warning: {w}");
            }
            println!("{}: ok", a.file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            report_config_problems(&a.file, &problems);
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
