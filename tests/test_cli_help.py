"""Every command line's --help: each option has help, a default is shown once and only where there is
one (no "(default: None)"), and the parsers are the ones the commands run (each module's get_parser())."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

COMMANDS = ["main", "train", "cv", "tune", "predict", "explain", "export", "score", "shards"]


def _parsers():
    for name in COMMANDS:
        parser = importlib.import_module(f"zoome_dist.cli.{name}").get_parser()
        yield parser.prog, parser
        if name == "shards":  # zoome-shards build | verify | synth
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    yield from ((sub.prog, sub) for sub in action.choices.values())


@pytest.mark.parametrize("prog,parser", list(_parsers()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_has_help_and_its_default_once(prog, parser):
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        assert action.help, f"{prog} {action.option_strings[0]} has no help"
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    for block in re.split(r"\n  (?=-)", text):  # one option's help per block
        assert block.count("(default:") <= 1, block


def test_a_default_is_shown_where_there_is_one():
    text = importlib.import_module("zoome_dist.cli.predict").get_parser().format_help()
    assert re.search(r"--tta TTA\s+views averaged.*\(default: 1\)", text, re.S)
    assert "--no-progress" in text and "no progress bar (default" not in text  # a flag: no default shown


@pytest.mark.slow
def test_no_accelerator_warning_where_ds_accelerator_is_unset():
    """Without DS_ACCELERATOR, `zoome train` settles it as DeepSpeed would (here: no GPU, cpu) before DeepSpeed
    loads, so DeepSpeed does not warn that it 'was unable to detect' a GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", "--print-config"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "train_batch_size" in r.stdout, r.stderr[-2000:]
    assert "unable to detect" not in r.stderr and "WARNING" not in r.stderr, r.stderr[-2000:]
