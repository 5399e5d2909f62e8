//! Types carried between agents by the transport (acks, typed remote errors; see docs/protocol.md).
