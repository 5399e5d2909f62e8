//! Exit codes of the `vmreplica` command (see README.md, "Exit codes"). The agent attaches
//! them to its errors so that the CLI exits with the code the control API answered.

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
/// Another agent already serves this agent directory (`vmreplica agent`).
pub const AGENT_RUNNING: i32 = 6;
/// `vmreplica verify`: the replica differs from the primary (or, with `--local`, a layer or
/// index failed its check).
pub const MISMATCH: i32 = 7;

/// The name of an exit code, as `--json` errors carry it (`kind`): `ok`, `failure`, `usage`,
/// `no-agent`, `not-found`, `invalid-state`, `agent-running`, `mismatch` (`failure` for any
/// other code).
pub fn name(code: i32) -> &'static str {
    match code {
        OK => "ok",
        USAGE => "usage",
        NO_AGENT => "no-agent",
        NOT_FOUND => "not-found",
        INVALID_STATE => "invalid-state",
        AGENT_RUNNING => "agent-running",
        MISMATCH => "mismatch",
        _ => "failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_name() {
        let codes = [
            OK,
            FAILURE,
            USAGE,
            NO_AGENT,
            NOT_FOUND,
            INVALID_STATE,
            AGENT_RUNNING,
            MISMATCH,
        ];
        let mut names: Vec<&str> = codes.iter().map(|c| name(*c)).collect();
        assert_eq!(name(USAGE), "usage");
        assert_eq!(name(42), "failure");
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), codes.len());
    }
}
