//! The `vmreplica` binary: command-line parsing, dispatch to the local agent over its control
//! socket (or to the agent library, `vmr-agent`, for `vmreplica agent`), and the demo. Exit codes are documented in README.md.

mod cli;
mod client;
mod demo;
mod output;
mod util;

use clap::Parser;

pub use vmr_agent::exit;

fn main() {
    let args = cli::Cli::parse();
    let code = match run(args) {
        Ok(()) => exit::OK,
        Err(err) => {
            let code = util::exit_code(&err);
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
        } => {
            println!(
                "{}",
                vmr_agent::config::create(&dir, &name, &listen, storage)?
            );
            Ok(())
        }
        cli::Command::Agent => Ok(vmr_agent::run_blocking(&dir)?),
        cli::Command::Demo(opts) => demo::run(opts),
        other => client::run(&dir, other, args.json),
    }
}
