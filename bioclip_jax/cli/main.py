"""`bioclip-jax <command> ...`: one entry point; each command is also `python -m <module>`."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

from bioclip_jax import exit_codes

# command -> (module with `main(argv) -> int`, one-line help)
COMMANDS = {
    "train": ("bioclip_jax.cli.train", "train a CLIP on tree-of-life shards (ml_collections config)"),
    "eval": ("bioclip_jax.cli.eval", "zero-shot / few-shot / per-rank evaluation"),
    "predict": ("bioclip_jax.cli.predict", "classify images with custom labels or the tree of life"),
    "embed": ("bioclip_jax.cli.embed", "write image or text embeddings to .npy"),
    "embed-taxa": ("bioclip_jax.cli.embed_taxa", "text embeddings for every taxon of a catalog"),
    "export": ("bioclip_jax.cli.export", "write an open_clip hf-hub folder from a checkpoint"),
    "import": ("bioclip_jax.cli.import_weights", "turn open_clip weights into a bioclip_jax checkpoint"),
    "make-synthetic": ("bioclip_jax.cli.make_synthetic", "generate the synthetic tree of life"),
    "make-shards": ("bioclip_jax.cli.make_shards", "turn your own labelled images into shards + a held-out set"),
    "check-data": ("bioclip_jax.cli.check_data", "read every sample of some shards and report problems"),
    "convert-shards": ("bioclip_jax.cli.convert_shards", "convert webdataset shards to ArrayRecord"),
    "plan": ("bioclip_jax.cli.plan", "per-device memory and FLOPs of a train config on a mesh"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bioclip-jax <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`bioclip-jax <command> --help` describes a command's options; every command takes",
              "-q (warnings and errors only, no progress bars) and -v (detail too)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs a command; run as the program itself (no `argv`), a failed one ends by `_exit_quietly`."""
    if argv is None:
        _drop_closed_loop_reports()
    try:
        status = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a reader that left shows here, not as a failed flush at exit
    except BrokenPipeError:
        return _reader_left()
    if status and argv is None:
        _exit_quietly(status)
    return status


def _reader_left() -> int:
    """`bioclip-jax predict ... | head`: stop quietly, as Unix tools do, with the status a process killed by
    SIGPIPE has (128 + 13). Python would otherwise fail again flushing stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bioclip-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return exit_codes.USAGE
    # huggingface_hub logs through its own handler; its records reaching the root logger too (which absl
    # configures) printed every warning twice.
    logging.getLogger("huggingface_hub").propagate = False
    logging.getLogger("gcsfs").addFilter(_without_traceback)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C: stop without a traceback, with the shell's status for it
        print(f"bioclip-jax {command}: interrupted", file=sys.stderr)
        return exit_codes.ABORTED
    except SystemExit as exit_:  # argparse exits on --help and on usage errors (after printing them)
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # SystemExit("message"): Python would print it, so do we
        return exit_codes.USAGE


def _without_traceback(record: logging.LogRecord) -> bool:
    """gcsfs logs each request it gives up on with aiohttp's whole traceback (~25 lines, repeated per
    file) before the error reaches a command, which says it in one line: its message alone is kept."""
    record.exc_info = record.exc_text = None
    return True


def _is_closed_loop_report(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_closed_loop_reports() -> None:
    """Drops, for the whole run, the reports of callbacks that reach an asyncio loop already closed.

    When a command fails while Orbax or TensorStore still has reads in flight, their callbacks call
    into the loop that the failure closed, from their own threads, as the command prints its error:
    the reports ("Event loop is closed", through sys.unraisablehook, sys.excepthook or
    threading.excepthook) then cut into the error line or follow it. They mean nothing to the user.
    """
    unraisable, uncaught, in_thread = sys.unraisablehook, sys.excepthook, threading.excepthook
    sys.unraisablehook = lambda report: None if _is_closed_loop_report(report.exc_value) else unraisable(report)
    sys.excepthook = lambda kind, error, trace: None if _is_closed_loop_report(error) else uncaught(kind, error, trace)
    threading.excepthook = lambda report: None if _is_closed_loop_report(report.exc_value) else in_thread(report)


def _exit_quietly(status: int) -> NoReturn:
    """Ends a failed command with its one-line reason as the last thing on the console.

    After an error, the background threads of Orbax, TensorStore and gcsfs finish against an
    asyncio loop that is gone: each of their callbacks reports "Event loop is closed" through
    sys.unraisablehook ("Exception ignored ..."), and absl logs their tracebacks, by the hundred.
    Those reports are silenced; then the process leaves as Python would (threads it waits for,
    such as a checkpoint save being committed, finish; exit handlers run) but without the
    interpreter's teardown, where the rest of the noise comes from.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.disable(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    try:
        threading._shutdown()  # noqa: SLF001 - the interpreter's first exit step: join non-daemon threads
        atexit._run_exitfuncs()  # noqa: SLF001 - its second: the exit handlers
    except KeyboardInterrupt:  # one more Ctrl-C while waiting: leave at once
        pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
