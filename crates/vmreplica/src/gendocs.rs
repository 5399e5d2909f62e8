//! Man pages and shell completions generated from the command-line grammar itself
//! ([`crate::cli::Cli`]: one grammar, never a copy), for packaging: the hidden
//! `vmreplica generate-docs --out DIR` writes them and `scripts/package.sh` installs them.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::exit;

/// The shells completions are written for, with the Debian directory each belongs in (relative
/// to `/usr/share`).
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions"),
    (Shell::Zsh, "zsh/vendor-completions"),
    (Shell::Fish, "fish/vendor_completions.d"),
];

/// The exit status section of `vmreplica(1)` (the codes of [`crate::exit`]; README.md's table
/// gives examples).
fn exit_status() -> Vec<(i32, &'static str)> {
    vec![
        (exit::OK, "success"),
        (
            exit::FAILURE,
            "the operation failed (the error chain is printed on stderr), or a confirmation question was not answered y",
        ),
        (
            exit::USAGE,
            "bad command line or argument; a command that asks for confirmation run without a terminal and without --yes",
        ),
        (
            exit::NO_AGENT,
            "the local agent is not running or not reachable",
        ),
        (
            exit::NOT_FOUND,
            "unknown VM, entry, test copy or recovery point",
        ),
        (
            exit::INVALID_STATE,
            "not allowed in the current state (e.g. pausing a paused VM)",
        ),
        (
            exit::AGENT_RUNNING,
            "vmreplica agent: another agent already serves this directory",
        ),
    ]
}

/// `text` as roff: a backslash and a hyphen-minus (options, file names) are escaped; no line
/// starts with a control character.
fn roff(text: &str) -> String {
    text.replace('\\', "\\e")
        .replace('-', "\\-")
        .lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The FILES section of `vmreplica(1)`: what the package installs and the agent keeps.
const FILES: [(&str, &str); 3] = [
    (
        "/var/lib/vmreplica",
        "The default agent directory (--dir, VMREPLICA_DIR; mode 0700): config.toml, agent.crt, \
         agent.key and state.db (mode 0600), the control socket agent.sock, per-VM work and \
         failover directories, and replicas/, the default store of replica VMs.",
    ),
    (
        "/lib/systemd/system/vmreplica.service",
        "The agent's unit (vmreplica agent on /var/lib/vmreplica); it starts only once \
         config.toml exists, i.e. after vmreplica init.",
    ),
    (
        "/usr/share/doc/vmreplica/README.md.gz",
        "Deployment on two hosts, configuration, states, exit codes, JSON output.",
    ),
];

/// Sections appended to the top-level page: exit status, files, see also.
fn top_page_extra(subpages: &[String]) -> String {
    let mut s = String::from(".SH \"EXIT STATUS\"\n");
    for (code, what) in exit_status() {
        s.push_str(&format!(".TP\n{code}\n{}\n", roff(what)));
    }
    s.push_str(".SH FILES\n");
    for (path, what) in FILES {
        s.push_str(&format!(".TP\n{}\n{}\n", roff(path), roff(what)));
    }
    // Left-adjusted: a justified list of long names is mostly blanks.
    s.push_str(".SH \"SEE ALSO\"\n.ad l\n");
    let refs: Vec<String> = subpages
        .iter()
        .map(|p| format!("\\fB\\%{}\\fR(1)", roff(p)))
        .collect();
    s.push_str(&refs.join(",\n"));
    s.push('\n');
    s
}

/// Write one man page per (visible) command into `dir`; returns the page names (without the
/// section), the top-level page first.
fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<String>> {
    fn collect(cmd: &clap::Command, out: &mut Vec<clap::Command>) {
        out.push(cmd.clone());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            collect(sub, out);
        }
    }
    let mut top = crate::cli::Cli::command().disable_help_subcommand(true);
    top.build();
    let mut cmds = Vec::new();
    collect(&top, &mut cmds);
    let names: Vec<String> = cmds
        .iter()
        .map(|c| {
            c.get_display_name()
                .unwrap_or_else(|| c.get_name())
                .to_owned()
        })
        .collect();
    for (i, cmd) in cmds.into_iter().enumerate() {
        let man = clap_mangen::Man::new(cmd)
            .manual("vmreplica manual")
            .source(format!("vmreplica {}", env!("CARGO_PKG_VERSION")));
        let path = dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page)
            .with_context(|| format!("rendering {}", path.display()))?;
        if i == 0 {
            page.extend_from_slice(top_page_extra(&names[1..]).as_bytes());
        } else {
            writeln!(page, ".SH \"SEE ALSO\"\n\\fBvmreplica\\fR(1)")?;
        }
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(names)
}

/// Write `DIR/man/*.1` and `DIR/completions/<share-relative dir>/<file>` for every shell of
/// [`SHELLS`]; returns the files written.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let mut written: Vec<PathBuf> = write_man_pages(&man_dir)?
        .iter()
        .map(|n| man_dir.join(format!("{n}.1")))
        .collect();
    for (shell, rel) in SHELLS {
        let dir = out.join("completions").join(rel);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cmd = crate::cli::Cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, "vmreplica", &dir)
            .with_context(|| format!("writing the {shell} completions into {}", dir.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_the_grammar() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let files = generate(tmp.path()).expect("generate");
        let man = |n: &str| std::fs::read_to_string(tmp.path().join("man").join(n)).expect(n);
        // One page per visible command, none for the hidden generator or `help`.
        let top = man("vmreplica.1");
        assert!(top.contains("EXIT STATUS"), "{top}");
        assert!(top.contains("vmreplica\\-server\\-allow"), "{top}");
        assert!(top.contains("\\-\\-dir"), "{top}");
        assert!(man("vmreplica-failover-start.1").contains("\\-\\-force"));
        assert!(man("vmreplica-enable.1").contains("\\-\\-replica\\-fingerprint"));
        let names: Vec<String> = files
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate-docs") || n.contains("help")),
            "{names:?}"
        );
        for want in ["vmreplica.bash", "_vmreplica", "vmreplica.fish"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        let bash = std::fs::read_to_string(
            tmp.path()
                .join("completions/bash-completion/completions/vmreplica.bash"),
        )
        .expect("bash");
        assert!(bash.contains("start-initial"), "{bash}");
    }
}
