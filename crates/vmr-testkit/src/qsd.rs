//! qemu-storage-daemon stand-in VMs for tests: disks, QMP socket, a live NBD export for a writer. Owned by the capture work.
