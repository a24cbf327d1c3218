"""Independent training jobs (one per (variant, fold) of a cross-validation) run concurrently: on this
node (``run_local``: N at a time, each with its own GPUs) or across a Ray cluster (``run_ray``: each job
a Ray task holding its GPUs/CPUs, placed wherever they are free). Either way a job is the one training
command of ``zoome_dist.launch.command`` (possibly data parallel on its node), resumes from its own checkpoint
when it is started again, and is retried up to ``retries`` times after a failure (a lost node too).

Why jobs and not more ranks: a 10-fold CV of 7 variants is 70 jobs; at the paper's global batch 64,
data parallelism over many GPUs is launch-bound and leaves tiny per-GPU batches for BatchNorm, while
independent 1-GPU jobs keep every GPU busy (docs/clusters.md, "Cross-validation on a cluster").
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from zoome_dist.core.procs import die_with_parent, exit_description, log_tail
from zoome_dist.core.rundir import RunDir
from zoome_dist.core.storage import check_ray_nodes, download_run, open_storage, stored_file, upload_run
from zoome_dist.launch.command import Launch, job_env, train_command, visible_devices


@dataclass(frozen=True)
class Job:
    """One training run: ``train_args`` (without ``--resume``) writing the run folder ``run``."""

    name: str
    run: RunDir
    train_args: tuple[str, ...]

    @property
    def done(self) -> bool:
        return self.run.finished

    def command(self, launch: Launch, env: dict[str, str] | None = None) -> list[str]:
        return train_command([*self.train_args, *self.run.resume_args()], launch, env)


@dataclass(frozen=True)
class Resources:
    """What each job gets: ``ranks`` data-parallel ranks (one GPU each where there are GPUs) and
    ``cpus`` cores (its ranks' threads; 0: not limited), on this node or a ``hostfile``'s nodes."""

    ranks: int = 1
    cpus: int = 0
    hostfile: str | None = None     # a multi-node job (one at a time): DeepSpeed hostfile
    master_addr: str | None = None

    @property
    def launch(self) -> Launch:
        return Launch(ranks=self.ranks, hostfile=self.hostfile, master_addr=self.master_addr)

    def env(self, gpu: bool) -> dict[str, str]:
        return job_env(gpu, max(1, self.cpus // self.ranks) if self.cpus else 0)


_RUNNING: set[subprocess.Popen] = set()  # this process's training jobs (their process groups)
_STOP = threading.Event()                # set on Ctrl-C: no retries, no new jobs


def _kill_group(p: subprocess.Popen) -> None:
    """End a job's whole process group (a DeepSpeed launcher and its ranks)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _attempt(job: Job, res: Resources, gpu: bool, extra_env: dict[str, str], stream: bool, where: str = "") -> int:
    """Run ``job`` once on this node; its output goes to ``run_dir/job.log`` (or the console). The job is
    its own process group, ended as a whole when this attempt ends (its launcher and ranks too)."""
    job.run.path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **res.env(gpu), **extra_env}
    if res.ranks == 1 and not res.hostfile:  # one process: a world of 1, also inside a multi-task SLURM job
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cmd = job.command(res.launch, env)
    with (contextlib.nullcontext() if stream else open(job.run.job_log, "a")) as log:
        if not stream:
            log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {where}{' '.join(cmd)}\n")
            log.flush()
        out = None if stream else log
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=None if stream else subprocess.STDOUT,
                             start_new_session=True, preexec_fn=die_with_parent)
        _RUNNING.add(p)
        try:
            return p.wait()
        finally:
            _kill_group(p)  # also what outlives a failed launcher (a rank, its loader workers) before a retry
            _RUNNING.discard(p)


class _Progress:
    """How far a CV is: jobs finished, and the time left at the mean job's pace, ``concurrent`` at a time."""

    def __init__(self, total: int, concurrent: int):
        self.total, self.concurrent, self.durations, self.lock = total, concurrent, [], threading.Lock()

    def finished(self, seconds: float) -> str:
        with self.lock:
            self.durations.append(seconds)
            done, mean = len(self.durations), sum(self.durations) / len(self.durations)
        left = math.ceil((self.total - done) / self.concurrent) * mean / 60
        return f"{done} of {self.total} job(s) finished" + (f", about {left:.0f} min left" if done < self.total else "")


@contextlib.contextmanager
def _epoch_watch(job: Job, enabled: bool, every_s: float = 5.0):
    """While the job runs, one line per finished epoch (its validation AUC), from the run's metrics.jsonl."""
    stop = threading.Event()

    def watch() -> None:
        seen, stopped = len(job.run.read_metrics()), False
        while not stopped:  # a last look once the job has ended: its final epochs too
            stopped = stop.wait(every_s)
            records = job.run.read_metrics()
            for r in records[seen:]:
                auc = r.get("val_auc", float("nan"))
                print(f"== {job.name}: epoch {r['epoch']} done (val AUC {auc:.4f})", flush=True)
            seen = max(seen, len(records))

    thread = threading.Thread(target=watch, daemon=True) if enabled else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def run_local(jobs: list[Job], res: Resources, concurrent: int = 1, retries: int = 0,
              gpu: bool = False) -> dict[str, str]:
    """Run ``jobs`` here, ``concurrent`` at a time; returns ``{name: error}`` of the jobs that failed.
    On a GPU node each concurrent job gets its own ``res.ranks`` of the visible devices."""
    todo = [j for j in jobs if not j.done]
    slots: list[dict[str, str]] = [{} for _ in range(concurrent)]
    if gpu and not res.hostfile:  # a hostfile job's GPUs are its hostfile's slots
        import torch

        devices = visible_devices() or [str(i) for i in range(torch.cuda.device_count())]
        if concurrent * res.ranks > len(devices):
            raise ValueError(f"--jobs {concurrent} × {res.ranks} GPU(s) per job needs {concurrent * res.ranks} GPUs; "
                             f"this node shows {len(devices)} ({','.join(devices) or 'none'})")
        slots = [{"CUDA_VISIBLE_DEVICES": ",".join(devices[k * res.ranks:(k + 1) * res.ranks])}
                 for k in range(concurrent)]
    free, lock, failed = list(range(concurrent)), threading.Lock(), {}
    stream = concurrent == 1
    progress = _Progress(len(todo), concurrent)

    def one(job: Job) -> None:
        if _STOP.is_set():
            return
        with lock:
            slot = free.pop()
        try:
            for attempt in range(retries + 1):
                if _STOP.is_set():
                    return
                print(f"== {job.name}: {'started' if attempt == 0 else f'retry {attempt}'} → {job.run.path}",
                      flush=True)
                started = time.monotonic()
                with _epoch_watch(job, enabled=not stream):  # concurrent jobs' output is in their job.log
                    rc = _attempt(job, res, gpu, slots[slot], stream)
                if rc == 0:
                    took = time.monotonic() - started
                    print(f"== {job.name}: done in {took / 60:.1f} min; " + progress.finished(took), flush=True)
                    return
                print(f"== {job.name}: {exit_description(rc)}" + ("" if stream else f"; see {job.run.job_log}"),
                      file=sys.stderr, flush=True)
            failed[job.name] = f"{exit_description(rc)} after {retries + 1} attempt(s)"
        finally:
            with lock:
                free.append(slot)

    pool = ThreadPoolExecutor(concurrent)
    try:
        list(pool.map(one, todo))
    except KeyboardInterrupt:  # Ctrl-C: stop every job now (each resumes from its checkpoint on a re-run)
        _STOP.set()
        for p in list(_RUNNING):
            _kill_group(p)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


def _ray_job(job: Job, res: Resources, gpu: bool, remote: str | None = None, storage: str | None = None) -> str:
    """A Ray task: one attempt of ``job`` on the node Ray placed it on; raises on failure (so that Ray
    retries it, resuming). Returns the node's IP. With ``storage`` the run folder lives on this node's
    disk: it starts from the copy stored at ``remote`` (a retry on another node resumes from it), and
    is stored back whenever a new checkpoint appears and when the attempt ends."""
    import ray

    node = ray.util.get_node_ip_address()
    if storage is None:
        rc = _attempt(job, res, gpu, {}, stream=False, where=f"[node {node}] ")
    else:
        fs, _ = open_storage(storage)
        download_run(fs, remote, job.run.path)
        stop = threading.Event()
        keeper = threading.Thread(target=_keep_storing, args=(fs, remote, job.run, stop), daemon=True)
        keeper.start()
        try:
            rc = _attempt(job, res, gpu, {}, stream=False, where=f"[node {node}] ")
        finally:
            stop.set()
            keeper.join()
            upload_run(fs, remote, job.run.path)
    if rc != 0:
        raise RuntimeError(f"{job.name}: training {exit_description(rc)} on {node}; the end of {job.run.job_log}:\n"
                           f"{log_tail(job.run.job_log)}")
    return node


def _keep_storing(fs, remote: str, run: RunDir, stop: threading.Event, every_s: float = 5.0) -> None:
    """Store ``run`` at ``remote`` each time its newest checkpoint changes, until ``stop``."""
    stored = None
    while not stop.wait(every_s):
        try:
            tag = run.latest.read_text().strip()
        except OSError:
            continue
        if tag != stored:
            upload_run(fs, remote, run.path)
            stored = tag


def run_ray(jobs: list[Job], res: Resources, address: str, retries: int, out: Path, shards: str,
            storage: str | None = None) -> dict[str, str]:
    """Run ``jobs`` as Ray tasks on the cluster at ``address``, as many at once as its free resources
    allow; returns ``{name: error}`` of the jobs that failed every attempt. A job holds ``res.ranks``
    GPUs when the cluster has GPUs, else ``res.ranks`` CPU ranks; and ``res.cpus`` cores (at least one
    per rank). The run folders (under ``out``) must be on storage every node mounts at the same path, and
    every node must read the same ``shards``: checked on every node before any job starts. With
    ``storage`` (an object store URI) the jobs train on their node's disk and keep their run folders
    at ``storage``/<variant>/fold-XX, from where they are copied into ``out`` when all have ended."""
    import ray

    fs, root = open_storage(storage) if storage else (None, "")
    remote = {j.name: f"{root}/{j.run.path.relative_to(out).as_posix()}" for j in jobs}
    done = (lambda j: stored_file(fs, f"{remote[j.name]}/summary.json")) if storage else (lambda j: j.done)
    todo = [j for j in jobs if not done(j)]
    if not todo:
        _fetch(fs, jobs, remote)
        return {}
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        check_ray_nodes(out, shards, need_out=not storage)  # every node sees the run folders and shards
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gpu = any(n.get("GPU", 0) > 0 for n in nodes)
        need = {"CPU": max(res.cpus, res.ranks), "GPU": res.ranks if gpu else 0}
        if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            raise ValueError(f"no node of the Ray cluster has {need['GPU']} GPU(s) and {need['CPU']} CPU(s) for one job "
                             f"(its nodes: {[{k: n.get(k, 0) for k in need} for n in nodes]}); lower "
                             "--gpus-per-job / --cpus-per-job")
        task = ray.remote(_ray_job).options(num_cpus=need["CPU"], num_gpus=need["GPU"], max_retries=retries,
                                            retry_exceptions=True)
        refs = {task.remote(j, res, gpu, remote[j.name] if storage else None, storage): j for j in todo}
        print(f"== {len(refs)} job(s) submitted to the Ray cluster at {address}, each with {need['GPU']} GPU(s) "
              f"and {need['CPU']} CPU(s){'' if gpu else ' (the cluster shows no GPU: CPU ranks)'}", flush=True)
        failed, pending = {}, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            job = refs[ready[0]]
            try:
                node = ray.get(ready[0])
                print(f"== {job.name}: done on {node}", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported per job
                failed[job.name] = str(e).strip().splitlines()[-1][:300]
                print(f"== {job.name}: failed: {failed[job.name]}", file=sys.stderr, flush=True)
        _fetch(fs, jobs, remote)
        return failed
    finally:
        ray.shutdown()


def _fetch(fs, jobs: list[Job], remote: dict[str, str]) -> None:
    """The stored run folders into ``out`` (where the report reads them); nothing without storage."""
    if fs is not None:
        for j in jobs:
            download_run(fs, remote[j.name], j.run.path)
