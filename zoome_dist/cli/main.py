"""``zoome train | cv | tune | predict | explain | export | score``.

    zoome train   --config launchers/configs/zoome.yaml --shards data/shards --fold 0 --out runs/f0
    zoome cv      --config launchers/configs/zoome.yaml --shards data/shards --folds 0-9 --out runs/cv
    zoome tune    --config launchers/configs/zoome.yaml --shards data/shards --folds 0,1,2 --out runs/tune

    zoome predict --checkpoint runs/cv/zoome --csv test.csv --images jpeg/test --out pred.csv --tta 8
    zoome predict --checkpoint runs/cv/zoome --images new-images/ --out pred.csv    # a folder, no CSV
    zoome explain --checkpoint runs/cv/zoome/fold-00 --image lesion.jpg --meta age=55,sex=male,site=torso --out why.png
    zoome export  --checkpoint runs/cv/zoome --format onnx --out zoome.onnx     # the fold ensemble, one file
    zoome score   --truth truth.csv --pred pred.csv
"""
from __future__ import annotations

import argparse
import importlib
import sys

from zoome_dist.cli.common import HelpFormatter

# command → its help line; each command is the module zoome_dist.cli.<command> (get_parser() and main(argv)),
# imported only when it runs, so that `zoome --help` answers without loading torch
COMMANDS = {
    "train": "train one fold (DeepSpeed); `zoome train --help` for its options",
    "cv": "cross-validation: folds × variants, Table-I report; `zoome cv --help`",
    "tune": "Ray Tune search across folds; `zoome tune --help`",
    "predict": "score images with one or more checkpoints (ensemble), with TTA",
    "export": "one model or a fold ensemble → TorchScript / ONNX (image + metadata in, probability out)",
    "explain": "Grad-CAM, Zoom-SE cells and metadata effect as a PNG report",
    "score": "score predictions against ground truth",
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_line in COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(f"zoome_dist.cli.{argv[0]}").main(argv[1:])
    get_parser().parse_args(argv)  # --help, or an error naming the valid commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
