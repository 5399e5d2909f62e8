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
