//! Image helpers for tests (qemu-img create/compare/convert, content hashes). Owned by the replica-store work.
