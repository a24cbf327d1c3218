"""Which shard files make up a split (a list of folds), checked against the manifest."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from zoome_dist.data.manifest import load_manifest
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.wds_index import read_index


@dataclass(frozen=True)
class Selection:
    tars: list[str]
    indexes: list[str]
    samples: int
    folds: list[int]
    encoding: MetadataEncoding

    def shuffled(self, seed: int, epoch: int) -> "Selection":
        """The same shards in an order drawn from ``(seed, epoch)``: identical on every rank."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.tars))
        return replace(self, tars=[self.tars[i] for i in order], indexes=[self.indexes[i] for i in order])


def select_folds(shards: str | Path, folds: list[int]) -> Selection:
    """Shard and index paths of ``folds`` (in fold order); errors name the bad fold or file."""
    shards = Path(shards)
    manifest = load_manifest(shards)
    by_fold = {f["fold"]: f for f in manifest["folds"]}
    if not folds:
        raise ValueError("no folds selected")
    bad = [k for k in folds if k not in by_fold]
    if bad:
        raise ValueError(f"fold(s) {bad} do not exist in {shards}; valid folds: {sorted(by_fold)}")
    dim = MetadataEncoding.from_dict(manifest["metadata_encoding"]).dim
    fixed = {"meta": 4 * dim, "label": 4, "sid": 8}
    tars, indexes, samples = [], [], 0
    for k in folds:
        entry = by_fold[k]
        if not entry["shards"] or entry["samples"] == 0:
            raise ValueError(f"fold {k} in {shards} is empty (0 samples)")
        for s in entry["shards"]:
            tar, idx = shards / s["path"], shards / s["index"]
            if not tar.is_file():
                raise FileNotFoundError(f"shard missing: {tar}")
            if not idx.is_file():
                raise FileNotFoundError(f"DALI index missing: {idx} (recreate it with `wds2idx {tar} {idx}`)")
            # every entry checked against its tar before DALI (or our reader) trusts it
            listed = len(read_index(idx, tar.stat().st_size, fixed))
            if listed != s["samples"]:
                raise ValueError(f"{idx}: lists {listed} samples, the manifest says {s['samples']}")
            tars.append(str(tar))
            indexes.append(str(idx))
        samples += entry["samples"]
    return Selection(tars, indexes, samples, list(folds),
                     MetadataEncoding.from_dict(manifest["metadata_encoding"]))
