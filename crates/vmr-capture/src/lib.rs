//! vmr-capture: see ARCHITECTURE.md.
