"""Duplicate images found at build time, and the groups that folds never split.

- **Exact** duplicates: the same bytes (SHA-256 of the file).
- **Near** duplicates: perceptual hashes (``imagehash.phash`` with ``hash_size=16``: 256 bits, of the
  image decoded at reduced scale) at most ``max_distance`` bits apart (default 12 of 256, about 5 %;
  ``--dup-distance``, -1 turns it off): the same photograph resized, re-encoded or re-saved as PNG
  (measured: a 2/3-size quality-80 copy is 6 bits away, a PNG copy 0) while distinct images are
  farther (closest pair among 1,500 synthetic lesions: 18 bits; the 64-bit phash put distinct
  synthetic lesions 2 bits apart, hence the larger hash).
- **Keep rule**: duplicates form clusters (connected pairs); each cluster keeps one copy: the one from
  the earliest ``--csv`` source, and within a source the smallest image name. The others are dropped and
  recorded; a cluster whose copies carry different targets is flagged ``label_conflict``.
- **Groups**: rows sharing a patient id, a lesion id or a duplicate cluster form one group (connected
  components); folds are assigned per group, so duplicates and lesions of one patient land in one fold.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from zoome_dist.data.images import BadImage

DEFAULT_MAX_DISTANCE = 12
HASH_SIZE = 16  # phash side: HASH_SIZE² bits


def digest(store, name: str) -> tuple[str | None, str | None]:
    """``(sha256 hex, phash hex)`` of one image; None where it cannot be read / decoded (the shard
    writer then records why)."""
    import imagehash
    from PIL import Image

    try:
        raw = store.read(name)
    except BadImage:
        return None, None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as im:
                im.draft("RGB", (128, 128))  # JPEG: decode at 1/8 scale, enough for a 32×32 hash
                return sha, str(imagehash.phash(im, hash_size=HASH_SIZE))
    except Exception:  # noqa: BLE001 - any decoder failure: no perceptual hash
        return sha, None


def _digest_job(args: tuple) -> tuple[str | None, str | None]:
    return digest(*args)


def digests(jobs: list[tuple], workers: int = 1, progress: bool = True) -> list[tuple[str | None, str | None]]:
    """``digest`` of every ``(store, name)``, in order, on ``workers`` processes."""
    bar = dict(total=len(jobs), desc="hashing", unit="img", disable=not progress)
    if workers <= 1:
        return [digest(*j) for j in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_digest_job, jobs, chunksize=64), **bar))


def duplicate_pairs(shas: list[str | None], phashes: list[str | None], max_distance: int = DEFAULT_MAX_DISTANCE,
                    block: int = 128) -> list[tuple[int, int, str, int]]:
    """``(i, j, "exact"|"near", bits apart)`` for i < j: same bytes, or phashes within ``max_distance``."""
    pairs: dict[tuple[int, int], tuple[str, int]] = {}
    by_sha: dict[str, list[int]] = {}
    for i, s in enumerate(shas):
        if s is not None:
            by_sha.setdefault(s, []).append(i)
    for idx in by_sha.values():
        for j in idx[1:]:
            pairs[(idx[0], j)] = ("exact", 0)
    if max_distance >= 0:
        have = np.array([i for i, p in enumerate(phashes) if p is not None], dtype=np.int64)
        ph = np.array([np.frombuffer(bytes.fromhex(phashes[i]), dtype=">u8") for i in have],
                      dtype=np.uint64).reshape(len(have), -1)
        for start in range(0, len(ph), block):
            d = np.bitwise_count(ph[start:start + block, None, :] ^ ph[None, :, :]).sum(-1, dtype=np.int64)
            for a, b in zip(*np.nonzero(d <= max_distance)):
                i, j = int(have[start + a]), int(have[b])
                if i < j and (i, j) not in pairs:
                    pairs[(i, j)] = ("near", int(d[a, b]))
    return sorted((i, j, kind, dist) for (i, j), (kind, dist) in pairs.items())


def _components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    if not edges:
        return np.arange(n)
    a, b = np.array(edges, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def resolve(table: pd.DataFrame, pairs: list[tuple[int, int, str, int]], source_rank: dict[str, int]
            ) -> tuple[np.ndarray, list[dict], list[dict]]:
    """``(keep mask, pair records, dropped records)`` under the keep rule (module docstring)."""
    comp = _components(len(table), [(i, j) for i, j, _, _ in pairs])
    names, sources, targets = (table[c].to_numpy() for c in ("image_name", "source", "target"))
    keep = np.ones(len(table), dtype=bool)
    dropped = []
    members: dict[int, list[int]] = {}
    for i, j, _, _ in pairs:
        members.setdefault(int(comp[i]), []).extend((i, j))
    for idx in members.values():
        idx = sorted(set(idx), key=lambda k: (source_rank[sources[k]], names[k]))
        conflict = len({int(targets[k]) for k in idx}) > 1
        for k in idx[1:]:
            keep[k] = False
            dropped.append({"dropped": names[k], "dropped_source": sources[k], "kept": names[idx[0]],
                            "kept_source": sources[idx[0]], "label_conflict": conflict})
    records = [{"a": names[i], "b": names[j], "source_a": sources[i], "source_b": sources[j], "kind": kind,
                "distance": dist, "target_a": int(targets[i]), "target_b": int(targets[j])}
               for i, j, kind, dist in pairs]
    return keep, records, sorted(dropped, key=lambda r: r["dropped"])


def groups(table: pd.DataFrame, pairs: list[tuple[int, int, str, int]]) -> np.ndarray:
    """Per row a group label (the smallest patient id of its group): rows sharing a patient id, a lesion id
    or a duplicate pair are one group."""
    edges = [(i, j) for i, j, _, _ in pairs]
    for col in ("patient_id", "lesion_id"):
        values = table[col].astype(str).to_numpy()
        for _, idx in pd.Series(np.arange(len(table))).groupby(values):
            if len(idx) > 1 and values[idx.iloc[0]]:
                edges += list(zip(idx.to_numpy()[:-1], idx.to_numpy()[1:]))
    comp = _components(len(table), edges)
    label = pd.Series(table["patient_id"].astype(str).to_numpy()).groupby(comp).transform("min")
    return label.to_numpy()
