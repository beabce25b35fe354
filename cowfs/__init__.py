"""cowfs: a copy-on-write layered filesystem in userspace."""
