"""``zoome predict``: score images with one or more checkpoints (ensemble), with test-time augmentation."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from zoome_dist.cli.common import HelpFormatter, run_command
from zoome_dist.core.files import check_writable, write_csv_atomic


def get_parser() -> argparse.ArgumentParser:
    from zoome_dist.core.rundir import SELECT
    from zoome_dist.infer.predict import ENSEMBLES
    from zoome_dist.pipeline import DEVICES, LOADERS

    p = argparse.ArgumentParser(prog="zoome predict", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a model file (model_last.pt / model_best.pt), a run folder, or a folder of runs (all are "
                        "averaged); repeatable")
    p.add_argument("--csv", help="ISIC test CSV: image_name, sex, age_approx, anatom_site_general_challenge "
                   "(labels not needed). Without it: every image of --images, with the metadata of an ISIC Archive "
                   "metadata.csv there, else metadata unknown")
    p.add_argument("--images", required=True, help="folder with <image_name>.jpg (.JPG/.jpeg/.png)")
    p.add_argument("--out", required=True, help="predictions CSV to write (unscorable images go to OUT.errors.csv)")
    p.add_argument("--tta", type=int, default=1, help="views averaged: 1, 2 (flip) or 8 (flips × transpose)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the models run: auto (GPU if DeepSpeed's accelerator is cuda), gpu or cpu")
    p.add_argument("--loader", default=LOADERS[0], choices=LOADERS, help="image decoding")
    p.add_argument("--threads", type=int, default=2, help="decoding threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--select", choices=SELECT, default="last",
                   help="each run's last epoch (model_last.pt) or its best-AUC epoch (model_best.pt), as zoome cv")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="mean",
                   help="average the members' probabilities, or their ranks over the scored images")
    p.add_argument("--calibrate", action="store_true",
                   help="apply each member's out-of-fold temperature (stored by zoome cv)")
    p.add_argument("--threshold", help="add a decision column: 'oof' (the out-of-fold threshold zoome cv stored, "
                                       "applied to the uncalibrated ensemble mean) or a probability compared with "
                                       "the written one, e.g. 0.5")
    p.add_argument("--format", choices=["kaggle", "isic"], default="kaggle",
                   help="kaggle: image_name,target (zoome score); isic: image,MEL (isic-challenge-scoring)")
    return p


def run(a: argparse.Namespace) -> int:
    from zoome_dist.infer.predict import find_checkpoints, load_member, predict, torch_device

    out = Path(a.out)
    check_writable(out)  # before the inference, not after it
    if a.threshold is not None and a.format == "isic":
        raise ValueError("--threshold adds a decision column, which the ISIC format (image,MEL) has no place for; "
                         "use --format kaggle")
    paths = find_checkpoints(a.checkpoint, a.select)
    inputs = {Path(p).resolve(): "a model file it loads" for p in paths}
    if a.csv:
        inputs[Path(a.csv).resolve()] = "its --csv"
    for side in (out, out.with_name(out.stem + ".errors.csv")):
        if side.resolve() in inputs:
            raise ValueError(f"--out {out}: {side} is {inputs[side.resolve()]}; writing there would destroy it. "
                             "Choose another --out")
    _, dev = torch_device(a.device)
    members = [load_member(p, dev) for p in paths]
    print(f"ensemble of {len(members)} checkpoint(s), TTA {a.tta} view(s)", file=sys.stderr)
    stored = {m.calibration.get("threshold") for m in members} - {None}
    if len(stored) == 1 and a.threshold is None:  # the operating point the CV chose, visible
        print(f"the models carry an out-of-fold threshold of {stored.pop():.4f} (--threshold oof adds a decision "
              "column at it)", file=sys.stderr)
    pred, problems = predict(members, a.csv, a.images, tta=a.tta, batch_size=a.batch_size, device=a.device,
                             loader=a.loader, threads=a.threads, progress=not a.no_progress, ensemble=a.ensemble,
                             calibrate=a.calibrate, threshold=a.threshold)
    if a.format == "isic":
        pred = pred.rename(columns={"image_name": "image", "prob": "MEL"})
    else:
        pred = pred.rename(columns={"prob": "target"})
    side = out.with_name(out.stem + ".errors.csv")
    if pred.empty:  # nothing to write: no empty predictions file that looks like a result
        if problems:
            write_csv_atomic(pd.DataFrame(problems), side)
        print(f"zoome predict: error: none of the {len(problems)} image(s) could be scored ({problems[0]['reason'] if problems else 'no images'}"
              f"{'; all reasons in ' + str(side) if problems else ''}); nothing written to {out}", file=sys.stderr)
        return 1
    write_csv_atomic(pred, out)
    if problems:
        write_csv_atomic(pd.DataFrame(problems), side)
        for pr in problems:
            print(f"not scored: {pr['image_name']}: {pr['reason']}", file=sys.stderr)
        print(f"{len(problems)} image(s) could not be scored; listed in {side}", file=sys.stderr)
    elif side.exists():
        side.unlink()
    print(f"wrote {len(pred)} prediction(s) to {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("zoome predict", get_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
