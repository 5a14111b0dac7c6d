"""The one exception type for mistakes a user can fix, and how the entry points report it.

A `UserError` carries one line that names what to change. Entry points turn it into that
line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the config, data, checkpoint or launch environment."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or the list of choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; choose one of: {', '.join(choices)}"


def _rank_prefix() -> str:
    # Every rank reports: an error may be one rank's alone (data missing on one node).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '?')}/{world_size}] " if world_size > 1 else ""


def run_reporting_errors(fn: Callable[[], int | None], debug: bool) -> int:
    """Run `fn`; a UserError becomes one line on stderr and exit code 2 (plus its traceback in debug)."""
    try:
        return fn() or 0
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"gan-dist: error: {_rank_prefix()}{err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
