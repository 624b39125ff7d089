"""The command-line tools, one module each: ``main`` is a Hydra entry point
(``@hydra.main(config_path="pkg://ldm.conf", config_name=<tool>)``) over a body that takes
the composed config. What they share: bad input ends a run with one line naming the
culprit, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf.errors import MissingMandatoryValue

from ldm.io import WeightsFileError

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_PATH = "pkg://ldm.conf"  # the configs ship inside the package (ldm/conf -> conf/)
# What a user gave wrong rather than what went wrong in the code: reported, not traced.
USER_ERRORS: tuple[type[Exception], ...] = (WeightsFileError, FileNotFoundError)


def reported(*errors: type[Exception]) -> Callable[[F], F]:
    """Decorate a ``main``: a bad input file, a required setting left out (and ``errors``,
    what the tool raises for bad settings) end the run with ``error: <message>`` on stderr
    and exit status 2, without a traceback (SystemExit passes through ``hydra.main``)."""
    caught = USER_ERRORS + errors

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except MissingMandatoryValue as err:  # a ??? setting left out
                print(f"error: {err.full_key} is required: add {err.full_key}=...", file=sys.stderr)
                raise SystemExit(2) from None
            except caught as err:
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None

        return wrapper  # type: ignore[return-value]

    return decorate
