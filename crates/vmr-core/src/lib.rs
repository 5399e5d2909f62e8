//! vmr-core: see ARCHITECTURE.md.
