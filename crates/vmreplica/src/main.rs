//! The `vmreplica` binary: CLI, agent and demo.

fn main() {}
