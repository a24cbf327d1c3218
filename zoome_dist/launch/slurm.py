"""Rank discovery under SLURM: ``srun`` starts one task per GPU and gives each task ``SLURM_*``
variables, not the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` that torch.distributed reads. This module
turns the first into the second, so that ``srun python -m zoome_dist.train ...`` needs no glue.

- Explicit variables win: a process started by ``torchrun``/``deepspeed`` (``RANK`` set) is left alone.
- ``MASTER_ADDR`` is the first host of the step's node list (``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``); ``MASTER_PORT`` derives from the job and step ids. Either may be exported
  to override it.
- A process in a SLURM job of several tasks that srun did not start (run by hand inside ``salloc`` or
  an ``sbatch`` script) would wait for peers that never come: a one-line error instead.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping

EXPLICIT = ("RANK", "TORCHELASTIC_RUN_ID")  # set by torchrun, deepspeed, zoome's own launchers
# MASTER_PORT range: above Ray's default worker ports (10002-19999) and tune.sbatch's (20000-28999), below
# Linux's ephemeral range (32768-60999)
PORT_BASE, PORT_SPAN = 29000, 3700


def _expand_item(item: str) -> list[str]:
    """One host expression without top-level commas: ``gpu[01-03,07]``, ``r[1-2]-n[1-2]``, ``n1``."""
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ValueError(f"unbalanced brackets in SLURM node list item {item!r}: export MASTER_ADDR (the first "
                             "node's address) to skip reading the node list")
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out: list[str] = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"bad range {part!r} in SLURM node list item {item!r}: export MASTER_ADDR (the first "
                             "node's address) to skip reading the node list")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{head}{n:0{width}d}{rest}" for rest in _expand_item(tail)]
    return out


def parse_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-04,07],login1``) as host names, in order."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [h for item in items if item.strip() for h in _expand_item(item.strip())]


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a node list: ``scontrol show hostnames`` where SLURM's tools are installed (it knows
    every form the site's SLURM accepts), else :func:`parse_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.split():
                return r.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_nodelist(nodelist)


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``: 2 on each of 3 nodes, then 1)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"unreadable SLURM tasks-per-node value {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID {node_id} but tasks per node {tasks_per_node!r} lists {len(counts)} node(s): "
                         "export LOCAL_WORLD_SIZE (this node's tasks) yourself")
    return counts[node_id]


def master_port(job_id: str, step_id: str = "0") -> int:
    """A port every task of one step computes alike; consecutive jobs, and the steps of one job, get
    different ones (it repeats only every PORT_SPAN job ids)."""
    return PORT_BASE + (int(job_id) + 997 * int(step_id or 0)) % PORT_SPAN


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a task of a SLURM step (empty when they are not SLURM's
    to give: explicit variables, or no SLURM job of several tasks)."""
    if any(k in env for k in EXPLICIT) or "SLURM_JOB_ID" not in env:
        return {}
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    ntasks = env.get("SLURM_STEP_NUM_TASKS") if in_step else env.get("SLURM_NTASKS")
    try:
        world = int(ntasks or "1")
    except ValueError:
        raise ValueError(f"SLURM task count {ntasks!r} is not a number: export RANK, WORLD_SIZE, LOCAL_RANK, "
                         "MASTER_ADDR and MASTER_PORT yourself") from None
    if world <= 1:
        return {}
    job = env["SLURM_JOB_ID"]
    if not in_step:
        raise ValueError(f"this process runs inside SLURM job {job} of {world} tasks but was not started by srun "
                         "(no SLURM_STEP_ID/SLURM_PROCID): it would train alone, not with the job's other tasks. "
                         "Start it as `srun python -m zoome_dist.train ...` (one task per GPU), or export RANK=0 "
                         "WORLD_SIZE=1 to train one process")
    rank, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID {rank} is outside the step's {world} tasks (SLURM_STEP_NUM_TASKS): export "
                         "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
    master = env.get("MASTER_ADDR")
    if not master:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = expand_nodelist(nodelist) if nodelist else []
        if not hosts:
            raise ValueError(f"SLURM step of {world} tasks without a node list (SLURM_STEP_NODELIST/"
                             "SLURM_JOB_NODELIST): export MASTER_ADDR, the first node's address")
        master = hosts[0]
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": master,
           "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job, env.get("SLURM_STEP_ID", "0")))}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        out["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))))
    return out
