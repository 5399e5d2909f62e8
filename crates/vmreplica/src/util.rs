//! Helpers of the CLI: an error carrying its exit code, the confirmation of a command,
//! formatting and parsing of times and sizes, and whether progress is drawn.

use std::time::UNIX_EPOCH;

use vmr_agent::exit;

/// An error of the CLI carrying the exit code to use (a usage error, an unreachable agent, or
/// an error the agent answered with its code).
#[derive(Debug)]
pub struct Coded {
    /// Exit code.
    pub code: i32,
    /// Message.
    pub message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// Build an error with an exit code.
pub fn coded(code: i32, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Coded {
        code,
        message: message.into(),
    })
}

/// The exit code of an error of the CLI: its [`Coded`] code, the code of an agent error it
/// carries (`init`, `agent`), or 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(c) = err.downcast_ref::<Coded>() {
        return c.code;
    }
    err.downcast_ref::<vmr_agent::AgentError>()
        .map_or(exit::FAILURE, vmr_agent::AgentError::exit_code)
}

/// Format ms-since-epoch as RFC 3339 UTC (second precision).
pub fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Parse RFC 3339 into ms since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<u64> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| coded(exit::USAGE, format!("bad time {s:?}: {e}")))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

/// Human size.
pub fn fmt_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Whether progress is drawn: stdout and stderr are both a terminal.
pub fn terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// Confirm `what` (what the command is about to do): at once with `yes`; refused without a
/// terminal (exit 2: a script must say `--yes`); otherwise asked on `out`, and only `y` or
/// `yes` read from `input` goes on (anything else cancels, exit 1, nothing changed).
pub fn confirm(
    what: &str,
    yes: bool,
    terminal: bool,
    input: &mut impl std::io::BufRead,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !terminal {
        return Err(coded(
            exit::USAGE,
            format!("about to {what}: no terminal to confirm on; pass --yes to go on"),
        ));
    }
    write!(out, "About to {what}.\nContinue? [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(coded(exit::FAILURE, "cancelled; nothing changed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(yes: bool, terminal: bool, typed: &str) -> (anyhow::Result<()>, String) {
        let mut out = Vec::new();
        let r = confirm(
            "remove VM x",
            yes,
            terminal,
            &mut typed.as_bytes(),
            &mut out,
        );
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn confirmation() {
        // --yes: no question, with or without a terminal.
        for terminal in [false, true] {
            let (r, out) = ask(true, terminal, "");
            assert!(r.is_ok());
            assert!(out.is_empty());
        }
        // No terminal, no --yes: refused with the usage code, nothing asked.
        let (r, out) = ask(false, false, "y\n");
        let e = r.expect_err("refused");
        assert_eq!(exit_code(&e), exit::USAGE);
        assert!(e.to_string().contains("--yes"), "{e}");
        assert!(out.is_empty());
        // On a terminal: asked; y/yes go on, anything else (or end of input) cancels.
        for typed in ["y\n", "YES\n", " yes \n"] {
            let (r, out) = ask(false, true, typed);
            assert!(r.is_ok(), "{typed:?}");
            assert!(out.contains("About to remove VM x"), "{out}");
        }
        for typed in ["\n", "n\n", "no\n", "", "yess\n"] {
            let (r, _) = ask(false, true, typed);
            assert_eq!(exit_code(&r.expect_err(typed)), exit::FAILURE, "{typed:?}");
        }
    }
}
