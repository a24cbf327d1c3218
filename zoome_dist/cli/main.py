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
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, error
from zoome_dist.eval.metrics import binary_metrics


def _read(path: str, role: str) -> pd.DataFrame:
    from zoome_dist.data.isic import read_csv_text

    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} CSV not found: {path}")
    df = read_csv_text(Path(path), dtype=str, keep_default_na=False)
    key = "image_name" if "image_name" in df.columns else "image" if "image" in df.columns else None
    col = "target" if "target" in df.columns else "MEL" if "MEL" in df.columns else None
    if key is None or col is None:
        raise ValueError(f"{path}: {role} CSV needs image_name,target (or image,MEL); found {list(df.columns)}")
    dup = df[key][df[key].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicate image(s) {dup[:10]}")
    return df.rename(columns={key: "image_name", col: "value"})[["image_name", "value"]]


def score(truth_csv: str, pred_csv: str) -> dict:
    """Metrics of an ISIC-format prediction CSV against a ground-truth CSV (rows matched by image)."""
    truth, pred = _read(truth_csv, "truth"), _read(pred_csv, "prediction")
    missing = sorted(set(truth["image_name"]) - set(pred["image_name"]))
    extra = sorted(set(pred["image_name"]) - set(truth["image_name"]))
    if missing or extra:
        raise ValueError(f"rows do not match: {len(missing)} image(s) without a prediction {missing[:10]}, "
                         f"{len(extra)} prediction(s) for unknown images {extra[:10]}")
    from zoome_dist.data.isic import parse_target

    merged = truth.merge(pred, on="image_name", suffixes=("_truth", "_pred"))
    y = merged["value_truth"].map(parse_target)
    bad = merged["image_name"][y.isna()].tolist()
    if bad:
        shown = [f"{n}={v!r}" for n, v in zip(bad[:10], merged["value_truth"][y.isna()][:10])]
        raise ValueError(f"{truth_csv}: ground truth must be 0 or 1; {len(bad)} row(s) are not: {shown}")
    p = pd.to_numeric(merged["value_pred"], errors="coerce")
    bad_p = ~(p.between(0, 1))  # NaN, inf, text and out-of-range alike
    if bad_p.any():
        shown = [f"{n}={v!r}" for n, v in zip(merged["image_name"][bad_p][:10], merged["value_pred"][bad_p][:10])]
        raise ValueError(f"{pred_csv}: predictions must be probabilities in [0, 1]; {int(bad_p.sum())} row(s) "
                         f"are not: {shown}")
    return binary_metrics(y.astype(int).to_numpy(), p.to_numpy())


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written: a folder, a missing or read-only parent."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"--out {out}: not writable")


def write_csv_atomic(df: pd.DataFrame, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, out)


def _predict(a: argparse.Namespace) -> int:
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


def _export(a: argparse.Namespace) -> int:
    import torch

    from zoome_dist.infer.export import export
    from zoome_dist.infer.predict import find_checkpoints, load_member

    out = Path(a.out)
    check_writable(out)
    members = [load_member(p, torch.device("cpu")) for p in find_checkpoints(a.checkpoint, a.select)]
    info = export(members, a.format, out, calibrate=a.calibrate)
    extra = [f for f in info["files"] if f != out.name]
    print(f"wrote {out} ({a.format}, {len(members)} member(s), {info['image_size']} px; outputs within "
          f"{info['max_abs_diff_vs_pytorch']:.1e} of PyTorch) and {out.name}.json"
          + (f"; its weights are in {', '.join(extra)}: keep the files together" if extra else ""), file=sys.stderr)
    return 0


def _parse_meta(spec: str) -> dict:
    from zoome_dist.data.isic import parse_age

    out = {"age": None, "sex": None, "site": None}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"--meta key {key!r}; valid keys: {list(out)}")
        if key == "age":
            age = parse_age(value)
            if age is None:
                raise ValueError(f"--meta age {value!r}: a number in 0..120 (or leave it out)")
            out[key] = None if age != age else age
        else:
            out[key] = value
    return out


def _explain(a: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from zoome_dist.infer.explain import explain, render
    from zoome_dist.data.sources import FolderImages
    from zoome_dist.infer.predict import find_checkpoints, image_batches, load_member, read_test_csv, scorable_image, torch_device

    paths = find_checkpoints([a.checkpoint], a.select)
    if len(paths) != 1:
        raise ValueError(f"explain takes one checkpoint; {a.checkpoint} holds {len(paths)}")
    _, dev = torch_device(a.device)
    member = load_member(paths[0], dev)
    # the decision threshold: the out-of-fold one a CV stored, else the epoch's training-set Youden threshold
    threshold = member.calibration.get("threshold", member.metrics.get("threshold", 0.5))
    enc, size = member.encoding, member.cfg.data.image_size
    check_writable(Path(a.out))
    if a.csv:
        if not a.images:
            raise ValueError("--csv needs --images (the folder with <image_name>.jpg)")
        df, metas, problems = read_test_csv(a.csv, enc)
        for pr in problems:  # unsafe names are never followed
            print(f"not explained: {pr['image_name']}: {pr['reason']}", file=sys.stderr)
        store = FolderImages(Path(a.images))  # the image under any extension predict accepts
        jobs = [(n, store.find(n) or Path(a.images) / f"{n}.jpg", m) for n, m in zip(df["image_name"], metas)][: a.limit]
    else:
        m = _parse_meta(a.meta)
        vec = enc.encode(m["age"], m["sex"], m["site"])
        jobs = [(Path(p).stem, Path(p), vec) for p in a.image]
    if not jobs:
        raise ValueError("nothing to explain: give --image PATH (repeatable) or --csv CSV --images DIR")
    items = []
    scratch = tempfile.TemporaryDirectory(prefix="zoome-explain-")
    for i, (name, path, meta) in enumerate(jobs):
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        path, why = scorable_image(path, Path(scratch.name), str(i))  # predict's (and the builder's) rules
        if why:
            print(f"not explained: {name}: {why}", file=sys.stderr)
            continue
        _, x = next(image_batches([str(path)], size, 1, a.device, a.loader, a.threads))  # predict's decode
        e = explain(member.model, x.to(dev), torch.from_numpy(np.asarray(meta))[None].to(dev), enc, a.zoom_blocks,
                    threshold)
        raw = decode_image(str(path), mode=ImageReadMode.RGB)  # what the report shows
        rgb = torch.nn.functional.interpolate(raw[None].float(), size=(size, size), mode="bilinear",
                                              antialias=True)[0].permute(1, 2, 0).clamp(0, 255).byte().numpy()
        items.append((name, rgb, e))
        delta = "" if e.meta_logit_delta is None else f", metadata logit {e.meta_logit_delta:+.3f}"
        print(f"{name}: P(melanoma) {e.prob:.4f}{delta}", file=sys.stderr)
    scratch.cleanup()
    if not items:
        raise ValueError("no image could be explained (see the reasons above)")
    render(items, a.out)
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the training program has its own parser (also `python -m zoome_dist.train`)
        from zoome_dist.cli.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["cv"]:
        from zoome_dist.launch.cv import main as cv_main

        return cv_main(argv[1:])
    if argv[:1] == ["tune"]:
        from zoome_dist.cli.tune import main as tune_main

        return tune_main(argv[1:])
    from zoome_dist.pipeline import DEVICES, LOADERS
    from zoome_dist.infer.predict import ENSEMBLES
    from zoome_dist.core.rundir import SELECT

    p = argparse.ArgumentParser(prog="zoome", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train one fold (DeepSpeed); `zoome train --help` for its options",
                   add_help=False)
    sub.add_parser("cv", help="cross-validation: folds × variants, Table-I report; `zoome cv --help`",
                   add_help=False)
    sub.add_parser("tune", help="Ray Tune search across folds; `zoome tune --help`", add_help=False)
    pr = sub.add_parser("predict", help="score images with one or more checkpoints (ensemble), with TTA",
                        formatter_class=HelpFormatter)
    pr.add_argument("--checkpoint", action="append", required=True,
                    help="a model file (model_last.pt / model_best.pt), a run folder, or a folder of runs (all are "
                         "averaged); repeatable")
    pr.add_argument("--csv", help="ISIC test CSV: image_name, sex, age_approx, anatom_site_general_challenge "
                    "(labels not needed). Without it: every image of --images, with the metadata of an ISIC Archive "
                    "metadata.csv there, else metadata unknown")
    pr.add_argument("--images", required=True, help="folder with <image_name>.jpg (.JPG/.jpeg/.png)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--tta", type=int, default=1, help="views averaged: 1, 2 (flip) or 8 (flips × transpose)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="auto", choices=DEVICES)
    pr.add_argument("--loader", default=LOADERS[0], choices=LOADERS, help="image decoding")
    pr.add_argument("--threads", type=int, default=2)
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--select", choices=SELECT, default="last",
                    help="each run's last epoch (model_last.pt) or its best-AUC epoch (model_best.pt), as zoome cv")
    pr.add_argument("--ensemble", choices=ENSEMBLES, default="mean",
                    help="average the members' probabilities, or their ranks over the scored images")
    pr.add_argument("--calibrate", action="store_true",
                    help="apply each member's out-of-fold temperature (stored by zoome cv)")
    pr.add_argument("--threshold", help="add a decision column: 'oof' (the out-of-fold threshold zoome cv stored, "
                                        "applied to the uncalibrated ensemble mean) or a probability compared with "
                                        "the written one, e.g. 0.5")
    pr.add_argument("--format", choices=["kaggle", "isic"], default="kaggle",
                    help="kaggle: image_name,target (zoome score); isic: image,MEL (isic-challenge-scoring)")
    xp = sub.add_parser("export", help="one model or a fold ensemble → TorchScript / ONNX (image + metadata in, "
                                       "probability out)", formatter_class=HelpFormatter)
    xp.add_argument("--checkpoint", action="append", required=True,
                    help="model file, run folder or folder of runs (all become one ensemble); repeatable")
    xp.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    xp.add_argument("--out", required=True, help="the file to write (FILE.json describes its inputs)")
    xp.add_argument("--select", choices=SELECT, default="last", help="as zoome predict")
    xp.add_argument("--calibrate", action="store_true", help="bake in each member's out-of-fold temperature")
    ex = sub.add_parser("explain", help="Grad-CAM, Zoom-SE cells and metadata effect as a PNG report",
                        formatter_class=HelpFormatter)
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--select", choices=SELECT, default="last", help="as zoome predict")
    ex.add_argument("--image", action="append", default=[], help="image file; repeatable")
    ex.add_argument("--meta", default="", help="for --image: age=55,sex=male,site=torso (missing = unknown)")
    ex.add_argument("--csv", help="a batch: ISIC test CSV (with --images)")
    ex.add_argument("--images", help="folder with <image_name>.jpg, for --csv")
    ex.add_argument("--limit", type=int, default=8, help="at most this many CSV rows")
    ex.add_argument("--zoom-blocks", type=int, default=2, help="last Zoom-SE blocks to show")
    ex.add_argument("--out", required=True, help="PNG report")
    ex.add_argument("--device", default="auto", choices=DEVICES, help="as zoome predict")
    ex.add_argument("--loader", default=LOADERS[0], choices=LOADERS, help="image decoding, as zoome predict")
    ex.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("score", help="score predictions against ground truth", formatter_class=HelpFormatter)
    s.add_argument("--truth", required=True, help="CSV with image_name,target (or image,MEL)")
    s.add_argument("--pred", required=True, help="CSV with image_name,target probabilities (or image,MEL)")
    s.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.cmd == "predict":
            return _predict(a)
        if a.cmd == "explain":
            return _explain(a)
        if a.cmd == "export":
            return _export(a)
        m = score(a.truth, a.pred)
    except USER_ERRORS as e:
        return error(f"zoome {a.cmd}", e)
    if a.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:16s} {v:.4f}" if isinstance(v, float) else f"{k:16s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
