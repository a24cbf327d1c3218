"""Duplicate images found at build time, and the groups that folds never split.

- **Exact** duplicates: the same bytes (SHA-256 of the file).
- **Near** duplicates: perceptual hashes (``imagehash.phash`` with ``hash_size=16``: 256 bits, of the
  image decoded at reduced scale) at most ``max_distance`` bits apart (default 12 of 256, about 5 %;
  ``--dup-distance``, -1 turns it off): the same photograph resized, re-encoded or re-saved as PNG,
  while distinct images are farther (the distances measured: docs/data.md, "Duplicates").
- **Keep rule**: in the order earliest ``--csv`` source, then smallest image name, a copy not yet dropped
  is kept and every copy *directly* paired with it is dropped and recorded (flagged ``label_conflict``
  when the two targets differ). So each dropped image is a duplicate of a kept one, and a chain
  A~B~C whose ends are not duplicates keeps A and C.
- **Groups**: rows sharing a patient id, a lesion id or a duplicate cluster form one group (connected
  components); folds are assigned per group, so duplicates and lesions of one patient land in one fold.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from zoome_dist.core.procs import die_with_parent
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


def digests(jobs: list[tuple], workers: int = 1, progress: bool = True) -> Iterator[tuple[str | None, str | None]]:
    """``digest`` of every ``(store, name)``, yielded in order as they come, on ``workers`` processes."""
    bar = dict(total=len(jobs), desc="hashing", unit="img", disable=not progress)
    if workers <= 1:
        yield from (digest(*j) for j in tqdm(jobs, **bar))
        return
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield from tqdm(pool.map(_digest_job, jobs, chunksize=64), **bar)
    finally:  # also when the caller stops early or is interrupted: pending chunks are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def _words(phashes: list[str]) -> np.ndarray:
    """Hex phashes → (n, 4) uint64."""
    out = np.array([np.frombuffer(bytes.fromhex(p), dtype=">u8") for p in phashes], dtype=np.uint64)
    return out.reshape(len(phashes), HASH_SIZE * HASH_SIZE // 64)


def _near_candidates(words: np.ndarray, max_distance: int) -> np.ndarray:
    """Row pairs (i < j) that may lie within ``max_distance`` bits: multi-index hashing. The bits are cut
    into ``max_distance + 1`` chunks; two hashes that close agree exactly on at least one chunk
    (pigeonhole), so only rows sharing a chunk value are compared: near-linear instead of all pairs."""
    bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for chunk in np.array_split(np.arange(bits.shape[1]), max_distance + 1):
        _, group = np.unique(np.packbits(bits[:, chunk], axis=1), axis=0, return_inverse=True)
        order = np.argsort(group.ravel(), kind="stable")
        starts = np.flatnonzero(np.diff(group.ravel()[order], prepend=-1))
        ends = np.append(starts[1:], len(order))
        for s, e in zip(starts, ends):
            if e - s > 1:
                idx = np.sort(order[s:e])
                a, b = np.triu_indices(len(idx), 1)
                found.append(np.stack([idx[a], idx[b]], 1))
    return np.unique(np.concatenate(found), axis=0)


def duplicate_pairs(shas: list[str | None], phashes: list[str | None], max_distance: int = DEFAULT_MAX_DISTANCE,
                    block: int = 128) -> list[tuple[int, int, str, int]]:
    """``(i, j, "exact"|"near", bits apart)`` for i < j: same bytes, or phashes within ``max_distance``
    (multi-index hashing up to 20 bits; beyond, an all-pairs scan in blocks of ``block`` rows)."""
    pairs: dict[tuple[int, int], tuple[str, int]] = {}
    by_sha: dict[str, list[int]] = {}
    for i, s in enumerate(shas):
        if s is not None:
            by_sha.setdefault(s, []).append(i)
    for idx in by_sha.values():
        for j in idx[1:]:
            pairs[(idx[0], j)] = ("exact", 0)
    have = np.array([i for i, p in enumerate(phashes) if p is not None], dtype=np.int64)
    if max_distance >= 0 and len(have) > 1:
        words = _words([phashes[i] for i in have])
        if max_distance <= 20:
            cand = _near_candidates(words, max_distance)
            dist = np.bitwise_count(words[cand[:, 0]] ^ words[cand[:, 1]]).sum(1, dtype=np.int64)
            near = [(int(have[a]), int(have[b]), int(d)) for (a, b), d in zip(cand, dist) if d <= max_distance]
        else:
            near = []
            for start in range(0, len(words), block):
                d = np.bitwise_count(words[start:start + block, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int64)
                near += [(int(have[start + a]), int(have[b]), int(d[a, b]))
                         for a, b in zip(*np.nonzero(d <= max_distance)) if start + a < b]
        for i, j, d in near:
            pairs.setdefault((i, j), ("near", d))
    return sorted((i, j, kind, dist) for (i, j), (kind, dist) in pairs.items())


def _components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    if not edges:
        return np.arange(n)
    a, b = np.array(edges, dtype=np.int64).T
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def resolve(table: pd.DataFrame, pairs: list[tuple[int, int, str, int]], source_rank: dict[str, int]
            ) -> tuple[np.ndarray, list[dict], list[dict], int]:
    """``(keep mask, pair records, dropped records, largest cluster)`` under the keep rule: in rule order
    (earliest source, smallest name) a copy not yet dropped is kept and its *direct* duplicates are
    dropped, so a chain A~B~C whose ends differ keeps A and C."""
    comp = _components(len(table), [(i, j) for i, j, _, _ in pairs])
    names, sources, targets = (table[c].to_numpy() for c in ("image_name", "source", "target"))
    neighbours: dict[int, set[int]] = {}
    for i, j, _, _ in pairs:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    keep = np.ones(len(table), dtype=bool)
    dropped, clusters = [], {}
    for k in neighbours:
        clusters.setdefault(int(comp[k]), []).append(k)
    for idx in clusters.values():
        idx = sorted(idx, key=lambda k: (source_rank[sources[k]], names[k]))
        rank = {k: r for r, k in enumerate(idx)}
        for k in idx:
            if not keep[k]:
                continue
            for d in sorted(neighbours[k], key=rank.get):  # its direct copies later in the rule's order
                if rank[d] > rank[k] and keep[d]:
                    keep[d] = False
                    dropped.append({"dropped": names[d], "dropped_source": sources[d], "kept": names[k],
                                    "kept_source": sources[k], "label_conflict": int(targets[d]) != int(targets[k])})
    records = [{"a": names[i], "b": names[j], "source_a": sources[i], "source_b": sources[j], "kind": kind,
                "distance": dist, "target_a": int(targets[i]), "target_b": int(targets[j])}
               for i, j, kind, dist in pairs]
    largest = max((len(v) for v in clusters.values()), default=0)
    return keep, records, sorted(dropped, key=lambda r: r["dropped"]), largest


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


def without_damaged(pairs: list[tuple], table: pd.DataFrame, stores: dict) -> list[tuple]:
    """The pairs whose two images both pass the shard writer's checks (``images.prepare_image``): a
    damaged copy is never kept in place of an intact one (it would be skipped when written, and the
    lesion lost). Groups still use every pair: the two copies remain one person's."""
    from zoome_dist.data.images import prepare_image

    bad = set()
    for i in sorted({i for p in pairs for i in p[:2]}):
        src, name = table["source"].iat[i], table["image_name"].iat[i]
        try:
            prepare_image(stores[src].read(name), name)
        except BadImage:
            bad.add(i)
    return [p for p in pairs if p[0] not in bad and p[1] not in bad]
