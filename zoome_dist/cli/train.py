"""Train ZooME on one cross-validation fold with DeepSpeed data parallelism.

The same program under every name: ``zoome train``, ``python -m zoome_dist.train``,
``deepspeed --module zoome_dist.train`` and the ``launchers/train.py`` shim.

Single GPU node (N GPUs, NCCL):
    deepspeed --num_gpus N --module zoome_dist.train --config launchers/configs/zoome.yaml \\
        --shards data/shards --fold 0 --out runs/zoome/fold-00
Several nodes (hostfile lines: "node1 slots=8"; shards on shared storage):
    deepspeed --hostfile hosts --master_addr node1 --module zoome_dist.train --config ... --fold 0 --out ...
CPU-only machine (2 ranks over gloo; DS_ACCELERATOR=cpu spares the launcher its accelerator warning):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module zoome_dist.train \\
        --config launchers/configs/demo-cpu.yaml --shards runs/demo/shards --fold 0 --out runs/demo/fold-00
One process, no launcher:
    zoome train --config launchers/configs/demo-cpu.yaml --shards ... --fold 0 --out ...

Overrides: --set optim.lr=3e-4 --set train.precision=fp32 (any key of zoome_dist/config.py).
Resume after a crash: the same command (an unfinished run in --out continues from its newest intact
checkpoint; a changed config is refused). Train a finished run longer: --resume --allow-config-change
--set train.epochs=N (only train.epochs and similar keys may differ).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, error
from zoome_dist.config import load_config, parse_set
from zoome_dist.core.logs import LEVELS, setup_logging
from zoome_dist.core.procs import end_with_launcher


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome train", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML/JSON config (default: built-in paper recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--shards", help="zoome-shards build folder (required)")
    p.add_argument("--fold", type=int, help="validation fold; the others train (required)")
    p.add_argument("--out", help="run folder (required)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config (file + --set) as YAML, and the DeepSpeed config "
                        "derived from it for WORLD_SIZE ranks (default 1); train nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue a finished run in --out (with --allow-config-change and a higher train.epochs); "
                        "an unfinished one is resumed without it")
    p.add_argument("--allow-config-change", action="store_true",
                   help="when resuming: accept a changed train.epochs, train.patience, train.log_every, "
                        "train.keep_checkpoints, train.checkpoint_every_steps, train.eval_batch_size, "
                        "train.cuda_graphs, data.num_threads, model.zoom_se_impl or monitor.* key")
    p.add_argument("--keep", choices=("all", "models"), default="all",
                   help="what the run folder keeps once training has finished: all (DeepSpeed checkpoints too: "
                        "the run can be continued with --resume) or models (model files, predictions, logs: a "
                        "fraction of the size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--log-level", default="info", choices=LEVELS,
                   help="rank 0's log level (other ranks: warnings and errors); debug also shows DeepSpeed's INFO")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_parser()
    a = p.parse_args(argv)
    if not a.print_config:
        missing = [f"--{k}" for k in ("shards", "fold", "out") if getattr(a, k) is None]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)}")
    from zoome_dist.launch.slurm import slurm_env
    from zoome_dist.train.engine import default_accelerator

    # this rank's DeepSpeed accelerator, as DeepSpeed would choose it, without its "unable to detect" warning
    os.environ.setdefault("DS_ACCELERATOR", default_accelerator())
    from zoome_dist.train.run import run  # imports DeepSpeed, which sets its logger up: configure after it

    try:  # an srun task: its rank first, so that logging and every error know it
        os.environ.update(slurm_env(os.environ))
    except ValueError as e:
        if not a.print_config:  # printing the config starts no process group
            return error("zoome train", e)
    setup_logging(a.log_level)
    if not a.print_config:
        end_with_launcher()  # a SIGTERM/SIGHUP that ends DeepSpeed's runner ends its ranks too

    try:
        cfg = load_config(a.config, parse_set(a.set))
        if a.print_config:
            return _print_config(cfg)
        run(cfg, a.shards, a.fold, a.out, resume=a.resume, progress=not a.no_progress,
            allow_changes=a.allow_config_change, keep=a.keep)
    except USER_ERRORS as e:
        rank = os.environ.get("RANK", "0")
        # every rank reports (a rank-local error, e.g. LOCAL_RANK beyond the GPUs, must not go unseen)
        if rank == "0" or not same_on_every_rank(e):
            where = f"[rank {rank} on {socket.gethostname()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            return error("zoome train", f"{where}{e}")
        return 2
    except RuntimeError as e:  # torch.distributed errors (DistBackendError) are RuntimeErrors
        if not lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        print(f"zoome train: error: rank {os.environ.get('RANK', '?')} on {socket.gethostname()}: a collective "
              f"failed ({first}): a peer rank or its node was lost, or the communication backend failed. If a "
              "node went away, bring every node back, then rerun the same command with --resume", file=sys.stderr)
        return 1
    return 0


def _print_config(cfg) -> int:
    import json

    import yaml

    from zoome_dist.config import validate
    from zoome_dist.train.engine import deepspeed_config

    validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# DeepSpeed config derived for {world} rank(s):")
    print("# " + json.dumps(deepspeed_config(cfg, world)))
    return 0


def same_on_every_rank(e: BaseException) -> bool:
    """Errors that every rank raises identically (config, inputs): printed once, by rank 0."""
    return isinstance(e, (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)) and \
        "LOCAL_RANK" not in str(e)


def lost_peer(e: BaseException) -> bool:
    """A communication failure: a peer rank died, its node went away, or a collective timed out (any
    torch.distributed error: NCCL's own failures are ``DistBackendError`` too, hence the message's "or")."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "Broken pipe", "connectFullMesh",
                            "Timed out", "timed out", "ncclRemoteError", "remote process exited",
                            "ProcessGroupGloo"))


if __name__ == "__main__":
    sys.exit(main())
