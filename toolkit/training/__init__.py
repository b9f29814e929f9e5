"""Training students: a small resumable loop (optimizer, schedule, checkpoints)."""
