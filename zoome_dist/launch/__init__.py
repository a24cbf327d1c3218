"""Starting work: the launch command of a fold, CV jobs, SLURM rank discovery, the Ray Tune trial."""
