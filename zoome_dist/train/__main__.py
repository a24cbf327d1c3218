"""``python -m zoome_dist.train`` (and ``deepspeed --module zoome_dist.train``): see ``cli.py``."""
import sys

from zoome_dist.train.cli import main

sys.exit(main())
