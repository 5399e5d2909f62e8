//! The `vmreplica` binary: command-line parsing, dispatch to the local agent over its control
//! socket (or to the agent library, `vmr-agent`, for `vmreplica agent`), and the demo. Exit codes are documented in README.md.

mod cli;
mod client;
mod demo;
mod follow;
mod gendocs;
mod monitor;
mod output;
mod util;
mod watch;

use clap::Parser;

pub use vmr_agent::exit;

fn main() {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        // With --json, a bad command line is a JSON error too (help and version print as
        // usual).
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--json") => {
            let msg = e.kind().to_string();
            let detail = e.to_string();
            let line = detail
                .lines()
                .find(|l| l.starts_with("error:"))
                .map_or(msg, |l| l.trim_start_matches("error:").trim().to_owned());
            eprintln!(
                "{}",
                output::json_error(&anyhow::anyhow!(line), e.exit_code())
            );
            std::process::exit(e.exit_code());
        }
        Err(e) => e.exit(),
    };
    let json = args.json;
    let code = match run(args) {
        Ok(()) => exit::OK,
        Err(err) => {
            let code = util::exit_code(&err);
            if json {
                eprintln!("{}", output::json_error(&err, code));
            } else {
                eprintln!("error: {err}");
                for cause in err.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
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
            advertise,
            storage,
            metrics,
            metrics_token,
        } => {
            // A host name is resolved: config.toml records (and the agent binds) the address.
            let resolved = vmr_agent::config::resolve_listen(&listen)?.to_string();
            let fingerprint = vmr_agent::config::create(
                &dir,
                &name,
                &resolved,
                advertise.as_deref(),
                storage,
                metrics
                    .as_deref()
                    .map(|listen| vmr_agent::config::MetricsInit {
                        listen,
                        token: metrics_token,
                    }),
            )?;
            if resolved != listen && !args.json {
                eprintln!("--listen {listen}: listening on {resolved}");
            }
            let listen = resolved;
            if args.json {
                let dir = std::path::absolute(&dir).unwrap_or(dir);
                let v = serde_json::json!({
                    "name": name,
                    "listen": listen,
                    "advertise": advertise,
                    "dir": dir.display().to_string(),
                    "fingerprint": fingerprint,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{fingerprint}");
            }
            Ok(())
        }
        cli::Command::Agent => Ok(vmr_agent::run_blocking(&dir)?),
        cli::Command::FenceWatchdog { qmp, power_off } => {
            Ok(vmr_agent::run_fence_watchdog(&qmp, power_off)?)
        }
        cli::Command::Check {
            name,
            warn_lag,
            crit_lag,
        } => std::process::exit(monitor::check(&dir, name, warn_lag, crit_lag)),
        cli::Command::Status { name, format, .. } if format != monitor::Format::Table => {
            monitor::status(&dir, name, format)
        }
        cli::Command::Demo(opts) => demo::run(opts),
        cli::Command::GenerateDocs { out } => {
            for path in gendocs::generate(&out)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        cli::Command::Status {
            name,
            watch: true,
            interval,
            ..
        } => watch::run(&dir, name, interval, args.json),
        other => {
            // A long operation is followed once the agent accepted it: a bar on a terminal,
            // plain lines with --wait.
            let follow = follow::Plan::of(&other);
            let bar = util::terminal() && !args.json;
            match &other {
                // `import` answers when the copy is loaded; its progress is shown meanwhile.
                cli::Command::Import { name, .. } => {
                    let name = name.clone();
                    follow::while_importing(&dir, &name, bar, || {
                        client::run(&dir, other, args.json)
                    })?
                }
                _ => client::run(&dir, other, args.json)?,
            }
            match follow {
                Some(plan) if bar || plan.wait => follow::run(&dir, &plan, bar, args.json),
                _ => Ok(()),
            }
        }
    }
}
