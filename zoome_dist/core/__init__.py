"""What every part shares: the run folder, logging, folder locks, atomic files, child processes, storage checks."""
