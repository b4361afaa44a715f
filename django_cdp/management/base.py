"""What django-cdp's management commands share: ``--database`` and checked argument types.

A bad argument must be answered with a message that names it, never with a
traceback from deep inside (``timedelta(seconds=nan)``, ``bind()`` on port
99999, a purge cutoff before year 1). Each type function here raises
``argparse.ArgumentTypeError`` naming the value; argparse turns that into
``error: argument --port: expected ..., got '99999'`` and exit code 2 on the
command line, and Django's parser into a ``CommandError`` under
``call_command()``. ``nan`` and ``inf`` parse as floats, so every float type
rejects them explicitly.

The types check values given as strings (the command line, ``call_command``
with string arguments); keyword options of ``call_command`` bypass argparse.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any, TypeVar

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import DEFAULT_DB_ALIAS
from django.utils import timezone

T = TypeVar("T")


def _checked(text: str, convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> T:
    """``convert(text)`` when it succeeds and passes ``ok``; else an error naming ``text``."""
    try:
        value = convert(text)
    except (ValueError, OverflowError):
        pass
    else:
        if ok(value):
            return value
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive_int(text: str) -> int:
    """A count such as ``--batch-size``: a whole number of at least 1."""
    return _checked(text, int, lambda v: v >= 1, "a whole number of at least 1")


def positive_float(text: str) -> float:
    """Seconds to wait or to spend (``--interval``, ``--time-budget``): finite and above 0.

    0 would make a polling loop spin; ``nan`` compares false with everything, so a
    deadline computed from it is never reached.
    """
    return _checked(
        text, float, lambda v: math.isfinite(v) and v > 0, "a finite number of seconds above 0"
    )


def seconds(text: str) -> timedelta:
    """An age threshold in seconds, as a ``timedelta``: finite, 0 or more, not absurdly large."""
    return _checked(
        text,
        lambda t: timedelta(seconds=float(t)),  # nan: ValueError; inf or huge: OverflowError
        lambda v: v >= timedelta(0),
        "a finite number of seconds, 0 or more",
    )


def fraction(text: str) -> float:
    """A share such as ``--max-failure-rate``: from 0 to 1 (``nan`` fails both comparisons)."""
    return _checked(text, float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def days(text: str) -> int:
    """An age in whole days, 0 or more, whose cutoff (now minus the age) is still a date."""
    reachable = (timezone.now() - datetime.min.replace(tzinfo=dt_timezone.utc)).days
    return _checked(
        text,
        int,
        lambda v: 0 <= v < reachable,
        f"a whole number of days, 0 or more (< {reachable})",
    )


def port(text: str) -> int:
    """A TCP port: 1 to 65535, or 0 for any free port."""
    return _checked(text, int, lambda v: 0 <= v <= 65535, "a port from 0 (any free port) to 65535")


def database_alias(text: str) -> str:
    """An alias of ``settings.DATABASES``: an unknown one would fail later with a traceback."""
    if text in settings.DATABASES:
        return text
    known = ", ".join(sorted(settings.DATABASES))
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a database alias in settings.DATABASES (known: {known})"
    )


class CdpCommand(BaseCommand):
    """Base of django-cdp's commands: adds ``--database``, checked by :func:`database_alias`.

    A command that uses no database sets :attr:`database_help` to None.
    """

    #: The help text of ``--database``; None: the command has no ``--database``.
    database_help: str | None = "Database alias of the outbox (default: default)."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if self.database_help is not None:
            parser.add_argument(
                "--database",
                type=database_alias,
                default=DEFAULT_DB_ALIAS,
                help=self.database_help,
            )
        return parser
