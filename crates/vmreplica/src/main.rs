//! The `vmreplica` binary: command-line parsing, dispatch to the local agent over its control
//! socket, the agent daemon itself, and the demo. Exit codes are documented in README.md.

mod agent;
mod cli;
mod client;
mod demo;
mod init;
mod launch;
mod output;
mod util;

use clap::Parser;

/// Exit codes (see README.md, "Exit codes").
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed.
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: i32 = 2;
    /// The local agent is not running or not reachable.
    pub const NO_AGENT: i32 = 3;
    /// The named VM (or entry) does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// The operation is not allowed in the current state.
    pub const INVALID_STATE: i32 = 5;
}

fn main() {
    let args = cli::Cli::parse();
    let code = match run(args) {
        Ok(()) => exit::OK,
        Err(err) => {
            let code = err
                .downcast_ref::<util::Coded>()
                .map_or(exit::FAILURE, |c| c.code);
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            code
        }
    };
    std::process::exit(code);
}

fn run(args: cli::Cli) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    match args.command {
        cli::Command::Init {
            name,
            listen,
            storage,
        } => init::run(&dir, &name, &listen, storage),
        cli::Command::Agent => agent::run_blocking(&dir),
        cli::Command::Demo(opts) => demo::run(opts),
        other => client::run(&dir, other, args.json),
    }
}
