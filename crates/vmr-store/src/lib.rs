//! vmr-store: see ARCHITECTURE.md.
