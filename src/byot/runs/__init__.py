"""What keeps runs apart and safe: run directories and their locks, atomic writes, signals, child processes
and the fault points the reliability tests use. Nothing here knows about models or training."""
