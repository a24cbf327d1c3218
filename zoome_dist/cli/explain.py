"""``zoome explain``: Grad-CAM, Zoom-SE cells and metadata effect of one or more images, as a PNG report."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from zoome_dist.cli.common import HelpFormatter, run_command
from zoome_dist.core.files import check_writable


def get_parser() -> argparse.ArgumentParser:
    from zoome_dist.core.rundir import SELECT
    from zoome_dist.pipeline import DEVICES, LOADERS

    p = argparse.ArgumentParser(prog="zoome explain", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model file, or a run folder (its --select model)")
    p.add_argument("--select", choices=SELECT, default="last", help="as zoome predict")
    p.add_argument("--image", action="append", default=[], help="image file; repeatable")
    p.add_argument("--meta", default="", help="for --image: age=55,sex=male,site=torso (missing = unknown)")
    p.add_argument("--csv", help="a batch: ISIC test CSV (with --images)")
    p.add_argument("--images", help="folder with <image_name>.jpg, for --csv")
    p.add_argument("--limit", type=int, default=8, help="at most this many CSV rows")
    p.add_argument("--zoom-blocks", type=int, default=2, help="last Zoom-SE blocks to show")
    p.add_argument("--out", required=True, help="PNG report")
    p.add_argument("--device", default="auto", choices=DEVICES, help="as zoome predict")
    p.add_argument("--loader", default=LOADERS[0], choices=LOADERS, help="image decoding, as zoome predict")
    p.add_argument("--threads", type=int, default=2, help="decoding threads")
    return p


def _parse_meta(spec: str) -> dict:
    from zoome_dist.data.tables import parse_age

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


def run(a: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from zoome_dist.data.sources import FolderImages
    from zoome_dist.infer.explain import explain, render
    from zoome_dist.infer.predict import (find_checkpoints, image_batches, load_member, read_test_csv, scorable_image,
                                          torch_device)

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
    return run_command("zoome explain", get_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
