//! vmr-nbd: see ARCHITECTURE.md.
