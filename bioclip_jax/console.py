"""The commands' console: what the library logs, as plain lines, with -q and -v to choose how much.

Library modules only log, through `logging.getLogger(__name__)`: what a user reads on a normal run
at INFO, skips and degraded paths at WARNING, detail at DEBUG. The commands show the `bioclip_jax`
records with `configure`: INFO and below on stdout, where a command's results have always been
(scripts read them there), warnings and errors on stderr. A program that uses the library without
the commands gets Python's defaults: warnings on stderr, nothing at INFO until it sets up logging.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

LOGGER = "bioclip_jax"


class _ConsoleHandler(logging.Handler):
    """Writes each record as its message alone. The stream is looked up per record, so one replaced
    after `configure` (a redirect, a test's capture) receives it; a failed write raises, as print's
    would, so a reader that left (`| head`) ends the command as cli.main expects."""

    info_on_stderr = False  # set while a command's results go to stdout

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING and not self.info_on_stderr else sys.stderr
        stream.write(self.format(record) + "\n")
        stream.flush()


_HANDLER = _ConsoleHandler()


def configure(level: int = logging.INFO) -> None:
    """Shows the `bioclip_jax` records from `level` up; calling it again only changes the level."""
    logger = logging.getLogger(LOGGER)
    _HANDLER.info_on_stderr = False
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(level)
    logger.propagate = False  # absl gives the root logger a handler of its own: each line would show twice


def duration(seconds: float) -> str:
    """A time span as the commands print it: "2m05s", "1h02m", "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def keep_stdout_for_results() -> None:
    """Sends every record to stderr: the command writes its results (CSV rows, say) to stdout, and a
    note among them would corrupt what a script reads."""
    _HANDLER.info_on_stderr = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """-q/--quiet and -v/--verbose, which every command takes."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="show only warnings and errors, without progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="show detail (debug lines) too")


def apply(args: argparse.Namespace) -> None:
    """Sets the console's level from -q/-v; -q also turns off a command's progress bars, whichever
    of its two spellings (`progress`, `no_progress`) the command's switch has."""
    configure(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if args.quiet:
        if hasattr(args, "progress"):
            args.progress = False
        if hasattr(args, "no_progress"):
            args.no_progress = True
