"""What every ``zoome`` / ``zoome-shards`` command line shares: help that shows each default, one set of
user errors answered by one ``PROG: error: ...`` line and exit status 2, and one meaning of ``--folds``
(a selection of existing folds: ``0-9`` or ``0,3,5``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and ``(default: X)`` once after an option's help where there is a default to
    show: not for flags, nor for options without a default (None), nor where the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, [], "") or default is argparse.SUPPRESS or "default" in text
                or action.option_strings == [] or isinstance(action, argparse._StoreConstAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


# Bad values, missing/unreadable/unwritable files and full disks, training that went non-finite.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def error(prog: str, e: BaseException | str) -> int:
    """Report a user error as one line; returns the exit status (2)."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def parse_folds(spec: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` (or both: ``"0-2,5"``) → list of ints."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                out += list(range(lo, hi + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--folds {spec!r}: expected fold numbers like 0-9 or 0,3,5") from None
    if not out:
        raise ValueError(f"--folds {spec!r} selects no fold")
    return list(dict.fromkeys(out))  # each fold once, in the order given


def check_folds(folds: list[int], shards: str | Path) -> None:
    """Every selected fold exists in the shard build ``shards``."""
    from zoome_dist.data.manifest import load_manifest

    valid = [f["fold"] for f in load_manifest(shards)["folds"]]
    bad = [k for k in folds if k not in valid]
    if bad:
        raise ValueError(f"fold(s) {bad} do not exist in {shards}; valid folds: {valid}")


def run_command(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                argv: list[str] | None) -> int:
    """Parse ``argv`` and ``run`` the command; a user error is one ``PROG: error: ...`` line and exit 2."""
    a = parser.parse_args(argv)
    try:
        return run(a)
    except USER_ERRORS as e:
        return error(prog, e)
