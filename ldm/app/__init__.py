"""The bodies of the command-line tools, and what they share: bad input files end a run
with one line naming the file, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ldm.io import WeightsFileError

F = TypeVar("F", bound=Callable[..., Any])

# What a user gave wrong rather than what went wrong in the code: reported, not traced.
USER_ERRORS = (WeightsFileError, FileNotFoundError)


def reported(main: F) -> F:
    """``main`` with a bad input file reported as ``error: <message>`` on stderr and exit
    status 2, without a traceback (under ``hydra.main`` too: SystemExit passes through it)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
