"""`bioclip-jax train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]
[--stop-after=N] [--allow-config-change] [--allow-fresh-start]`, also `python -m bioclip_jax.train`.

Rerunning with the same workdir resumes from its latest checkpoint, under the same config
(a change is refused unless --allow-config-change; see train/run_identity.py). A workdir whose
checkpoints are all unreadable (moved to checkpoints_unreadable/) is not trained again from
step 0 unless --allow-fresh-start. One job at a
time trains in a workdir (WORKDIR/LOCK; see train/workdir.py). When launched as one of
several processes (JAX_COORDINATOR_ADDRESS / SLURM / TPU pod environment),
`jax.distributed` is initialised first.

Exit statuses (bioclip_jax/exit_codes.py, docs/exit_statuses.md): 0 finished; 1 failed, said in
one line on stderr (`error: ...`); 2 a usage or input error (a bad argument or config field, a
file it names that does not exist); 75 stopped early after saving a checkpoint: rerun the same
command to resume; 130 a second Ctrl-C, stopped without saving.
"""

from __future__ import annotations

import argparse
import sys

from absl import logging

from bioclip_jax import exit_codes
from bioclip_jax.cli.common import ArgumentParser, load_train_config
from bioclip_jax.train.distributed import maybe_initialize_distributed
from bioclip_jax.train.workdir import WorkdirInUseError, check_workdir, hold_workdir


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="bioclip-jax train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Any config field is set with --config.FIELD=VALUE, e.g. --config.optimizer.lr=3e-4.")
    parser.add_argument("--config", required=True, help="training config file (configs/*.py), with :ARG for a size")
    parser.add_argument("--workdir", required=True,
                        help="where checkpoints, metrics and the exported model go (local or gs://)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="save a checkpoint and exit at this step (schedule unchanged)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume under a config that differs from the workdir's config.json (recorded there)")
    parser.add_argument("--allow-fresh-start", action="store_true",
                        help="train from step 0 in a workdir whose checkpoints were all set aside as unreadable")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for `bioclip-jax train ...` (argv without the program name); returns the exit status."""
    try:
        args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # --help, or argparse's own usage message
        return exit_codes.USAGE if exit_.code else exit_codes.FINISHED
    try:
        config = load_train_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error, exit_codes.USAGE)
    config.lock()  # nothing downstream adds a field by a typo either
    # Orbax and Grain log every save at INFO through absl; keep the console for progress lines.
    logging.set_verbosity(logging.WARNING)
    from bioclip_jax.data.pipeline import BadDataError  # noqa: PLC0415 - grain: keep --help fast
    try:
        result = _run(config, args)
    except FileNotFoundError as error:  # a file the config names (init weights, shards) is not there
        return _fail(error, exit_codes.USAGE)
    except (ValueError, OSError, BadDataError, FloatingPointError, WorkdirInUseError) as error:
        return _fail(error, exit_codes.ERROR)
    except KeyboardInterrupt:  # the second Ctrl-C: the user chose not to wait for the save
        print("aborted without saving (second Ctrl-C); rerunning resumes from the last checkpoint",
              file=sys.stderr, flush=True)
        return exit_codes.ABORTED
    stopped = isinstance(result, dict) and result.get("stopped")
    return exit_codes.STOPPED if stopped else exit_codes.FINISHED


def _run(config, args):
    maybe_initialize_distributed()  # a malformed JAX_* / SLURM variable is a ValueError
    check_workdir(args.workdir)
    from bioclip_jax.train.job import run_job  # noqa: PLC0415 - orbax, optax: keep --help fast
    with hold_workdir(args.workdir):
        return run_job(config, args.workdir, stop_after=args.stop_after, allow_config_change=args.allow_config_change,
                       allow_fresh_start=args.allow_fresh_start)


def _fail(error: BaseException, status: int) -> int:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
