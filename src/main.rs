//! The `raftkv` command-line tool.

use clap::{Parser, Subcommand};

/// raftkv: replicated durable state and MapReduce.
#[derive(Parser, Debug)]
#[command(name = "raftkv", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version of the on-disk format this build reads and writes.
    FormatVersion,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::FormatVersion => {
            println!("raftkv {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
    }
}
