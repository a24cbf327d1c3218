"""``zoome export``: one model or a fold ensemble → TorchScript / ONNX (image + metadata in, probability out)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoome_dist.cli.common import HelpFormatter, run_command
from zoome_dist.core.files import check_writable


def get_parser() -> argparse.ArgumentParser:
    from zoome_dist.core.rundir import SELECT

    p = argparse.ArgumentParser(prog="zoome export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="model file, run folder or folder of runs (all become one ensemble); repeatable")
    p.add_argument("--format", choices=["torchscript", "onnx"], required=True,
                   help="torchscript (one .pt file) or onnx (one .onnx file, weights inside up to 1 GiB)")
    p.add_argument("--out", required=True, help="the file to write (FILE.json describes its inputs)")
    p.add_argument("--select", choices=SELECT, default="last", help="as zoome predict")
    p.add_argument("--calibrate", action="store_true", help="bake in each member's out-of-fold temperature")
    return p


def run(a: argparse.Namespace) -> int:
    import torch

    from zoome_dist.eval.model_card import export_card
    from zoome_dist.infer.export import export
    from zoome_dist.infer.predict import find_checkpoints, load_member

    out = Path(a.out)
    check_writable(out)
    members = [load_member(p, torch.device("cpu")) for p in find_checkpoints(a.checkpoint, a.select)]
    info = export(members, a.format, out, calibrate=a.calibrate)
    card = out.with_name(out.name + ".card.md")
    card.write_text(export_card(info, [m.path for m in members]))
    extra = [f for f in info["files"] if f != out.name]
    print(f"wrote {out} ({a.format}, {len(members)} member(s), {info['image_size']} px; outputs within "
          f"{info['max_abs_diff_vs_pytorch']:.1e} of PyTorch), {out.name}.json and the model card {card.name}"
          + (f"; its weights are in {', '.join(extra)}: keep the files together" if extra else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("zoome export", get_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
