"""``python -m zoome_dist.train`` (and ``deepspeed --module zoome_dist.train``): see ``zoome_dist/cli/train.py``."""
import sys

from zoome_dist.cli.train import main

sys.exit(main())
