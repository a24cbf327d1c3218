"""Train ZooME on one cross-validation fold with DeepSpeed data parallelism.

Single GPU node (N GPUs, NCCL):
    deepspeed --num_gpus N launchers/train.py --config launchers/configs/zoome.yaml \\
        --shards data/shards --fold 0 --out runs/zoome/fold-00
Several nodes (hostfile lines: "node1 slots=8"; shards on shared storage):
    deepspeed --hostfile hosts --master_addr node1 launchers/train.py --config ... --fold 0 --out ...
CPU-only machine (2 ranks over gloo; DS_ACCELERATOR=cpu silences the accelerator warning):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launchers/train.py \\
        --config launchers/configs/demo-cpu.yaml --shards runs/demo/shards --fold 0 --out runs/demo/fold-00
One process, no launcher:
    python launchers/train.py --config launchers/configs/demo-cpu.yaml --shards ... --fold 0 --out ...

Overrides: --set optim.lr=3e-4 --set train.precision=fp32 (any key of zoome_dist/config.py).
Resume after a crash: the same command with --resume (continues from the newest intact checkpoint;
a changed config is refused unless --allow-config-change and only train.epochs and similar differ).
"""
from __future__ import annotations

import argparse
import os
import sys

from zoome_dist.config import load_config, parse_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML/JSON config (default: built-in paper recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--shards", required=True, help="zoome-shards build folder")
    p.add_argument("--fold", type=int, required=True, help="validation fold; the others train")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a changed train.epochs, train.log_every, train.keep_checkpoints, "
                        "train.checkpoint_every_steps, train.eval_batch_size or data.num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from zoome_dist.train.run import run

    try:
        cfg = load_config(a.config, parse_set(a.set))
        run(cfg, a.shards, a.fold, a.out, resume=a.resume, progress=not a.no_progress,
            allow_changes=a.allow_config_change)
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: unwritable/full --out, unreadable input
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
