"""``zoome-shards build | verify | synth``.

    zoome-shards synth  --out data/synth --n 600 --seed 0
    zoome-shards build  --csv data/synth/train.csv --images data/synth/jpeg/train --out data/shards
    zoome-shards build  --csv isic-download/ --out data/shards            # an `isic image download` folder
    zoome-shards build  --csv isic2020/train.csv --images isic2020/jpeg/train \
                        --csv isic2019/ISIC_2019_Training_GroundTruth.csv --images isic2019/images \
                        --exclude isic2020/ISIC_2020_Training_Duplicates.csv --out data/shards
    zoome-shards verify data/shards

Layouts (detected from the CSV header): ISIC 2020 train.csv; ISIC 2019 ground truth (+ metadata CSV
beside it); ISIC 2024 train-metadata.csv (images: train-image.hdf5 or train-image/image/ beside it, or
--images); ISIC Archive metadata.csv (`isic image download`; images beside it). docs/data.md maps
every layout's columns.
"""
from __future__ import annotations

import argparse
import os
import sys

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, error
from zoome_dist.data.isic import ISIC2019_META_NAME
from zoome_dist.data.synth import LABEL_FROM
from zoome_dist.data.writer import BuildOptions, StrictError, build, summary_lines

DEFAULTS = BuildOptions()


def _build(a: argparse.Namespace) -> int:
    if a.folds_deprecated is not None:  # the old name of --num-folds
        print("zoome-shards build: warning: --folds N is now --num-folds N", file=sys.stderr)
        a.folds = a.folds_deprecated
    opts = BuildOptions(folds=a.folds, seed=a.seed, max_side=a.max_side,
                        samples_per_shard=a.samples_per_shard, jpeg_quality=a.jpeg_quality,
                        strict=a.strict, dup_distance=a.dup_distance,
                        dedup=not a.no_dedup)
    manifest = build(a.csv, a.images, a.out, opts, metadata_csv=a.metadata_csv, workers=a.workers,
                     resume=a.resume, progress=not a.quiet, exclude=a.exclude)
    print("\n".join(summary_lines(manifest)))
    print(f"wrote {a.out}/manifest.json")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from zoome_dist.data.manifest import verify

    problems = verify(a.shards, progress=not a.quiet)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        print(f"{a.shards}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{a.shards}: OK")
    return 0


def _synth(a: argparse.Namespace) -> int:
    from zoome_dist.data.synth import synthesize

    csv = synthesize(a.out, a.n, seed=a.seed, prevalence=a.prevalence, size=a.size,
                     workers=a.workers, progress=not a.quiet, label_from=a.label_from)
    print(f"wrote {csv} and {a.n} images under {os.path.join(a.out, 'jpeg', 'train')}")
    return 0


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome-shards", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", formatter_class=HelpFormatter, help="CSV + images → fold-partitioned WebDataset shards")
    b.add_argument("--csv", required=True, action="append",
                   help="a source: ISIC 2020 train.csv, ISIC 2019 ground truth, ISIC 2024 train-metadata.csv, or an "
                        "ISIC Archive metadata.csv / download folder; repeat for several sources in one build")
    b.add_argument("--metadata-csv", help=f"ISIC 2019 metadata CSV (default: {ISIC2019_META_NAME} beside its --csv)")
    b.add_argument("--images", action="append",
                   help="images of a source: a folder of <image_name>.jpg/.JPG/.jpeg/.png or an .hdf5 file; one per "
                        "--csv in the same order, or none where the layout has them beside the CSV (Archive, 2024)")
    b.add_argument("--exclude", help="file of image names to leave out (one per line, or a CSV with image_name / "
                                     "isic_id; ISIC's duplicate list image_name_1,image_name_2 drops the second)")
    b.add_argument("--dup-distance", type=int, default=DEFAULTS.dup_distance,
                   help="near duplicates: perceptual-hash bits apart (of 256) at most; -1 finds exact copies only")
    b.add_argument("--no-dedup", action="store_true",
                   help="skip the duplicate search: keep every row (folds grouped by patient and lesion only)")
    b.add_argument("--out", required=True, help="shard folder to write (empty, or an interrupted build with --resume)")
    b.add_argument("--num-folds", type=int, default=DEFAULTS.folds, dest="folds",
                   help="how many folds to partition into (elsewhere --folds selects existing folds)")
    b.add_argument("--folds", type=int, dest="folds_deprecated", help=argparse.SUPPRESS)
    b.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the fold assignment")
    b.add_argument("--max-side", type=int, default=DEFAULTS.max_side,
                   help="bound the longer side in px, 0 keeps originals")
    b.add_argument("--samples-per-shard", type=int, default=DEFAULTS.samples_per_shard, help="images per .tar shard")
    b.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality,
                   help="quality of re-encoded JPEGs")
    b.add_argument("--workers", type=int, default=1, help="processes writing shards")
    b.add_argument("--strict", action="store_true",
                   help="fail on the first row or image that would be skipped or converted")
    b.add_argument("--resume", action="store_true", help="finish an interrupted build in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)
    v = sub.add_parser("verify", formatter_class=HelpFormatter, help="re-hash and re-check a shard build against its manifest")
    v.add_argument("shards")
    v.add_argument("--quiet", action="store_true", help="print only errors")
    v.set_defaults(func=_verify)
    s = sub.add_parser("synth", formatter_class=HelpFormatter, help="write a synthetic ISIC-2020-layout dataset")
    s.add_argument("--out", required=True, help="folder for train.csv and jpeg/train/")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    s.add_argument("--prevalence", type=float, default=0.1, help="expected melanoma fraction")
    s.add_argument("--size", type=int, default=256, help="image side in px")
    s.add_argument("--workers", type=int, default=1, help="processes drawing images")
    s.add_argument("--label-from", choices=LABEL_FROM, default=LABEL_FROM[0],
                   help="metadata: labels from age/sex/site only, images carry no label signal (a metadata-path test)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_parser().parse_args(argv)
    try:
        return a.func(a)
    except (StrictError, *USER_ERRORS) as e:
        return error(f"zoome-shards {a.cmd}", e)
    except KeyboardInterrupt:  # Ctrl-C: one line; a build keeps what it wrote (--resume continues it)
        print(f"zoome-shards {a.cmd}: interrupted" + ("; rerun with --resume to continue the build"
                                                      if a.cmd == "build" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
