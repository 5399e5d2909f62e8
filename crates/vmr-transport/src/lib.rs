//! vmr-transport: see ARCHITECTURE.md.
