//! The `mulmd` command: parse the command line, set up logging, run one subcommand
//! (`mulmd::cli` holds them, one file each).

use std::process::ExitCode;

use clap::Parser;
use mulmd::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.command.logs_itself() {
        cli::init_logging(cli.log.as_deref().unwrap_or("warn"), false);
    }
    cli::run(cli)
}
