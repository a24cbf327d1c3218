"""Shard build throughput (1 vs 2 workers) against the 2-process image-work ceiling.

The ceiling runs exactly the per-image work a build cannot avoid (``prepare_image``: decode, resize,
re-encode) in a pool of the same size, without tar writing, indexing, hashing or the manifest. The
duplicate search's hashing pass (SHA-256 + perceptual hash at 1/8 scale) is timed on its own
(``dedup_hash_img_s``): a build with duplicate search costs both.
"""
from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from benchmarks import PeakRSS, timed
from zoome_dist.data.dedup import digests
from zoome_dist.data.images import prepare_image
from zoome_dist.data.sources import FolderImages
from zoome_dist.data.synth import sample_table, synthesize
from zoome_dist.data.writer import BuildOptions, build

DISTINCT = 32  # rendered images per size; the N rows reuse their bytes (rendering 1024² is slow)


def _prepare(args: tuple[Path, int]) -> int:
    return len(prepare_image(args[0].read_bytes(), args[0].name, args[1])[0])


def reused_dataset(root: Path, n: int, size: int, workers: int) -> Path:
    """`n` rows of a synthetic table whose images reuse `DISTINCT` rendered JPEGs; returns the image folder.
    The copies are exact duplicates: build them with ``BuildOptions(dedup=False)``."""
    synthesize(root / "distinct", DISTINCT, seed=0, size=size, workers=workers, progress=False)
    imgs = root / "jpeg"
    imgs.mkdir()
    table = sample_table(n, seed=0)
    for i, name in enumerate(table["image_name"]):
        shutil.copyfile(root / "distinct" / "jpeg" / "train" / f"SYN_{i % DISTINCT:07d}.jpg", imgs / f"{name}.jpg")
    table.to_csv(root / "train.csv", index=False)
    return imgs


def bench_shards(n: int = 1536, sizes: tuple[int, ...] = (600, 1024), max_side: int = 512,
                 workers: int = 2, samples_per_shard: int = 64) -> dict:
    """Per source size: build img/s with 1 and ``workers`` workers, the ceiling, peak PSS at N and 2N."""
    results: dict = {"n": n, "max_side": max_side, "workers": workers,
                     "samples_per_shard": samples_per_shard, "sizes": {}}
    opts = BuildOptions(folds=2, max_side=max_side, samples_per_shard=samples_per_shard, dedup=False)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            root = Path(tmp) / f"src{size}"
            imgs = reused_dataset(root, 2 * n, size, workers)
            pd.read_csv(root / "train.csv").iloc[:n].to_csv(root / "n.csv", index=False)
            jobs = [(imgs / f"{name}.jpg", max_side) for name in pd.read_csv(root / "n.csv")["image_name"]]
            row: dict = {}
            for rep in range(2):  # alternate the three measurements; keep each one's best
                for w in (1, workers):
                    out = root / f"out-{w}-{rep}"
                    t = timed(lambda: build(root / "n.csv", imgs, out, opts, workers=w, progress=False))
                    row[f"build_img_s_{w}w"] = max(row.get(f"build_img_s_{w}w", 0), n / t)
                    shutil.rmtree(out)
                with ProcessPoolExecutor(workers) as pool:
                    list(pool.map(_prepare, jobs[:workers]))  # workers up before timing
                    t = timed(lambda: list(pool.map(_prepare, jobs, chunksize=8)))
                row["ceiling_img_s"] = max(row.get("ceiling_img_s", 0), n / t)
                # the duplicate search's hashing pass (builds above: dedup off, their images are copies)
                store = FolderImages(imgs)
                names = pd.read_csv(root / "n.csv")["image_name"].tolist()
                t = timed(lambda: list(digests([(store, name) for name in names], workers, progress=False)))
                row[f"dedup_hash_img_s_{workers}w"] = max(row.get(f"dedup_hash_img_s_{workers}w", 0), n / t)
            # Memory in separate, untimed builds: sampling /proc/*/smaps costs CPU.
            for key, csv in (("peak_rss_mb", "n.csv"), ("peak_rss_mb_2n", "train.csv")):
                with PeakRSS() as mem:
                    build(root / csv, imgs, root / f"out-{key}", opts, workers=workers, progress=False)
                row[key] = mem.peak
            row["build_vs_ceiling"] = row[f"build_img_s_{workers}w"] / row["ceiling_img_s"]
            results["sizes"][str(size)] = {k: round(v, 3) for k, v in row.items()}
            shutil.rmtree(root)
    results.update(results["sizes"][str(max(sizes))])  # headline keys: the largest source size
    return results
