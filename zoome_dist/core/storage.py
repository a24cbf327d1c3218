"""The storage contract of a run that spans nodes, checked before any work instead of assumed.

Every rank (``check_ranks``) and every node of a Ray cluster (``check_ray_nodes``) must see the run
folder the launching side writes into, and read the same shard build. A marker with a fresh random
name is written into ``--out`` and each participant looks for it (a new name, so no cached negative
lookup on NFS can hide it); the shards' ``manifest.json`` digest is compared too, so shards copied to
node-local disks at one path are allowed but must be the same build. A participant that fails stops
everything at once, with one line naming its node, the path and what to do.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

from zoome_dist.core.files import write_text_atomic

MARKER = ".zoome-storage-"
WAIT_S = 10.0  # how long a participant looks for the marker (slow NFS attribute caches)
SHARED = ("must be on storage every node mounts at the same path (NFS, Lustre, GPFS, a cluster file system)")


def manifest_digest(shards: str | Path) -> str:
    """SHA-256 of the shard build's ``manifest.json`` (its counts, checksums and vocabulary)."""
    try:
        return hashlib.sha256((Path(shards) / "manifest.json").read_bytes()).hexdigest()
    except OSError as e:
        return f"unreadable ({e.strerror})"


def write_marker(out: Path, digest: str) -> Path:
    """A new marker in ``out``, holding the writer's node and the shards' digest."""
    path = Path(out) / f"{MARKER}{secrets.token_hex(8)}"
    write_text_atomic(path, json.dumps({"node": socket.gethostname(), "digest": digest}))
    return path


def probe(marker: str, shards: str, wait_s: float = WAIT_S) -> dict:
    """What this node sees: the marker (waiting up to ``wait_s``) and the shards' digest."""
    deadline = time.monotonic() + wait_s
    seen = None
    while seen is None:
        try:
            seen = json.loads(Path(marker).read_text())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return {"node": socket.gethostname(), "sees_out": seen is not None, "digest": manifest_digest(shards)}


def problems(reports: list[dict], writer: str, digest: str, out: Path, shards: str | Path, who: str) -> list[str]:
    """One line per participant that breaks the contract (``who`` names it: "rank 1", "Ray node")."""
    lines = []
    for r in reports:
        where = f"{r.get('who', who)} on {r['node']}"
        if not r["sees_out"]:
            lines.append(f"{where} does not see the run folder {out} that {writer} wrote into: the folder (--out) "
                         f"{SHARED}")
        elif r["digest"].startswith("unreadable"):
            lines.append(f"{where} cannot read {Path(shards) / 'manifest.json'}: {r['digest']}; the shards must be "
                         "at the same path on every node (shared storage, or the same build copied to each node)")
        elif r["digest"] != digest:
            lines.append(f"{where} reads another shard build at {shards} (manifest digest {r['digest'][:12]}, "
                         f"{writer} reads {digest[:12]}): copy the same build to every node, or put the shards on "
                         "shared storage")
    return lines


def check_ranks(out: Path, shards: str | Path) -> None:
    """Every rank of the process group sees ``out`` as rank 0 wrote it, and the same shards (collective)."""
    import torch.distributed as dist

    if dist.get_world_size() < 2:
        return
    digest = manifest_digest(shards)
    marker: list = [None]
    if dist.get_rank() == 0:
        try:
            marker = [str(write_marker(out, digest))]
        except OSError as e:  # a full or read-only --out: every rank stops with rank 0's reason
            marker = [e]
    dist.broadcast_object_list(marker, src=0)
    if isinstance(marker[0], BaseException):
        raise marker[0]
    mine = {**probe(marker[0], str(shards)), "who": f"rank {dist.get_rank()}"}
    reports: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    if dist.get_rank() == 0:
        Path(marker[0]).unlink(missing_ok=True)
    bad = problems(reports, f"rank 0 on {reports[0]['node']}", reports[0]["digest"], out, shards, "rank")
    if bad:
        raise ValueError(bad[0] + (f" (and {len(bad) - 1} more rank(s))" if len(bad) > 1 else ""))


def check_ray_nodes(out: Path, shards: str | Path, need_out: bool = True) -> None:
    """Every alive node of the connected Ray cluster sees ``out`` (unless not ``need_out``: its work goes to
    object storage) and the same shards (one small task per node, pinned to it); raises ``ValueError``
    naming the first node that does not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    shards = Path(shards).resolve()  # the tasks run in other folders
    digest = manifest_digest(shards)
    marker = write_marker(out, digest)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(num_cpus=0, max_retries=0)(probe)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(marker), str(shards), WAIT_S if need_out else 0) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60 + WAIT_S)
        reports, silent = [], []
        for ref, n in zip(refs, nodes):
            who = f"Ray node {n['NodeManagerAddress']}"
            try:
                r = ray.get(ref, timeout=0) if ref in ready else None
            except Exception as e:  # noqa: BLE001 - the probe failed there: name the node
                raise ValueError(f"{who}: the storage check failed there: {str(e).strip().splitlines()[-1][:300]}")
            if r is None:
                silent.append(who)
            else:
                reports.append({**r, "who": who, "sees_out": r["sees_out"] or not need_out})
        if silent:
            raise ValueError(f"{', '.join(silent)} did not run the storage check within {60 + WAIT_S:.0f} s (no free "
                             "worker there, or the node is unreachable): check `ray status`")
    finally:
        marker.unlink(missing_ok=True)
    bad = problems(reports, f"the driver on {socket.gethostname()}", digest, out, shards, "Ray node")
    if bad:
        raise ValueError(bad[0] + (f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""))


def open_storage(uri: str) -> tuple["pyarrow.fs.FileSystem", str]:
    """``--storage``: an object store URI (``s3://BUCKET/PREFIX``, with ``?endpoint_override=HOST:PORT&scheme=http``
    for an S3-compatible server; ``gs://...``) or a folder every node mounts, as a pyarrow filesystem (what
    Ray Tune uses) and the path in it. Proven reachable and writable now, not after the first trial."""
    import pyarrow.fs as pafs

    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            fs, path = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        fs.create_dir(path, recursive=True)
        probe_path = f"{path.rstrip('/')}/.zoome-storage-{secrets.token_hex(8)}"
        with fs.open_output_stream(probe_path) as f:
            f.write(b"zoome_dist storage probe")
        fs.delete_file(probe_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--storage {uri}: cannot write there ({first}). Expected s3://BUCKET/PREFIX (an existing "
                         "bucket; credentials from the usual AWS variables or files; for an S3-compatible server add "
                         "?endpoint_override=HOST:PORT&scheme=http), gs://BUCKET/PREFIX, or a folder") from None
    return fs, path


def snapshot_runs(src: Path, dst: Path) -> None:
    """Copy run folders (``src`` itself or the runs under it) to ``dst`` with only each run's newest
    *committed* checkpoint (every rank's files written; DeepSpeed's ``latest`` comes earlier), for a
    Tune checkpoint or the object store. Files that training replaces meanwhile are taken as they are
    or skipped; the kept checkpoint is copied whole or the copy fails."""
    from zoome_dist.core.rundir import RunDir

    kept: dict[Path, str] = {}

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        skip = {n for n in names if n in (".lock", ".rendezvous") or n.endswith(".tmp")}
        if here.name == "checkpoints":
            tag = RunDir(here.parent).committed_tag()
            if tag:
                kept[here] = tag
            skip |= set(names)  # the kept checkpoint is copied below, on its own
        return skip

    try:
        shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    except shutil.Error as e:  # a file renamed or pruned while copying (not the checkpoint: copied next)
        if any(Path(source).exists() for source, _, _ in e.args[0]):
            raise
    for here, tag in kept.items():
        to = dst / here.relative_to(src)
        shutil.copytree(here / tag, to / tag, dirs_exist_ok=True)
        for marker in ("latest", "committed"):
            (to / marker).write_text(tag)


def upload_run(fs: "pyarrow.fs.FileSystem", remote: str, local: Path) -> None:
    """Store run folder ``local`` at ``remote`` with its newest committed checkpoint only. Its markers
    (``latest``, ``committed``) go last, so a copy cut short (the node died) still names a checkpoint
    that is there whole; the older checkpoints are removed after that (never none in between)."""
    import pyarrow.fs as pafs

    from zoome_dist.core.rundir import RunDir

    if not Path(local).is_dir():
        return
    with tempfile.TemporaryDirectory() as tmp:
        snapshot_runs(Path(local), Path(tmp) / "run")
        keep = RunDir(Path(tmp) / "run").committed_tag()
        markers = [Path(tmp) / "run" / "checkpoints" / m for m in ("latest", "committed")]
        for m in markers:
            m.unlink(missing_ok=True)  # written last, below: a copy cut short names no checkpoint it lacks
        pafs.copy_files(str(Path(tmp) / "run"), remote, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    run = RunDir(Path(local))
    if not keep and run.summary.is_file() and not run.checkpoints.exists():  # finished, pruned (--keep models)
        if fs.get_file_info(f"{remote}/checkpoints").type == pafs.FileType.Directory:
            fs.delete_dir(f"{remote}/checkpoints")
    if keep:
        for m in ("latest", "committed"):
            with fs.open_output_stream(f"{remote}/checkpoints/{m}") as f:
                f.write(keep.encode())
        stored = fs.get_file_info(pafs.FileSelector(f"{remote}/checkpoints", allow_not_found=True))
        for info in stored:
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if info.type == pafs.FileType.Directory and re.fullmatch(r"step\d{7}", name) and name != keep:
                fs.delete_dir(info.path)


def download_run(fs: "pyarrow.fs.FileSystem", remote: str, local: Path) -> bool:
    """Replace run folder ``local`` with the one stored at ``remote``; False (``local`` untouched) when
    nothing is stored there."""
    import pyarrow.fs as pafs

    if fs.get_file_info(remote).type != pafs.FileType.Directory:
        return False
    shutil.rmtree(local, ignore_errors=True)
    Path(local).mkdir(parents=True)
    pafs.copy_files(remote, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def stored_file(fs: "pyarrow.fs.FileSystem", path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File
