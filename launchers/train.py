"""Shim for ``deepspeed launchers/train.py ...``: the program is ``zoome_dist.train`` (``zoome train``,
``python -m zoome_dist.train``, ``deepspeed --module zoome_dist.train``); see its ``--help``."""
import sys

from zoome_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
