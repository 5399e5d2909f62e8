//! Types of the replica store's on-disk catalog (owned by vmr-store's format; see docs/replica-store.md).
