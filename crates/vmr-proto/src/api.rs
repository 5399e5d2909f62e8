//! Types of the local control API between the CLI and the agent, and of agent-to-agent control requests.
