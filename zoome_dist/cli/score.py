"""``zoome score``: metrics of predictions against ground truth (ACC, SE, SP, AUC, ...)."""
from __future__ import annotations

import argparse
import json
import sys

from zoome_dist.cli.common import HelpFormatter, run_command


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome score", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--truth", required=True, help="CSV with image_name,target (or image,MEL)")
    p.add_argument("--pred", required=True, help="CSV with image_name,target probabilities (or image,MEL)")
    p.add_argument("--threshold", type=float,
                   help="also report ACC/SE/SP (acc_t, sens_t, spec_t) at this probability, e.g. the out-of-fold "
                        "threshold zoome predict prints; without it only the 0.5 figures")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(a: argparse.Namespace) -> int:
    from zoome_dist.eval.score import score

    m = score(a.truth, a.pred, a.threshold)
    if a.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:16s} {v:.4f}" if isinstance(v, float) else f"{k:16s} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("zoome score", get_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
