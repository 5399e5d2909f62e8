//! Small shared helpers of the agent: the clock and error chains.

/// Milliseconds since the Unix epoch.
pub use vmr_proto::clock::now_ms;

/// An error and its sources on one line, outermost first (the one formatter of every crate).
pub use vmr_transport::error_chain as chain;
