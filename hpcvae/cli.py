"""Shared plumbing for the ``python -m hpcvae.<command>`` entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from hpcvae.errors import HpcvaeError

EXIT_COMPLETED = 0
EXIT_PREEMPTED = 3
"""A run stopped at a control point with its checkpoint written: the launcher requeues on this code."""
EXIT_BAD_INPUT = 2


def run_cli(main: Callable[[Sequence[str] | None], int | None], prog: str) -> None:
    """Run ``main`` and turn expected failures into one-line errors.

    Users hit bad input far more often than bugs; a traceback hides the one line
    that tells them which file, row or HDU is wrong.  Set ``HPCVAE_TRACEBACK=1``
    to see the full traceback anyway.
    """
    import os

    try:
        rc = main(None)
    except HpcvaeError as exc:
        if os.environ.get("HPCVAE_TRACEBACK"):
            raise
        # An error every rank raised alike is printed once, by rank 0, not once per rank.
        if not (getattr(exc, "collective", False) and _rank() != 0):
            print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc or 0))


def _rank() -> int:
    import os

    for name in ("RANK", "SLURM_PROCID"):
        v = os.environ.get(name, "")
        if v.isdigit():
            return int(v)
    return 0
