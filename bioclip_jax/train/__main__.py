"""`python -m bioclip_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE] [--stop_after=N]`.

Rerunning with the same workdir resumes from its latest checkpoint. When launched as
one of several processes (JAX_COORDINATOR_ADDRESS / SLURM / TPU pod environment),
`jax.distributed` is initialised first.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bioclip_jax.train.distributed import maybe_initialize_distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py), with :ARG for a size",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the exported model go")
flags.DEFINE_integer("stop_after", None, "save a checkpoint and exit at this step (schedule unchanged)")


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    # Orbax and Grain log every save at INFO through absl; keep the console for progress lines.
    logging.set_verbosity(logging.WARNING)
    try:
        maybe_initialize_distributed()
    except ValueError as err:  # a malformed JAX_* / SLURM variable: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    from bioclip_jax.train.job import run_job  # noqa: PLC0415 - after distributed init
    from bioclip_jax.data.pipeline import BadDataError  # noqa: PLC0415
    config = FLAGS.config
    try:
        run_job(config, FLAGS.workdir, stop_after=FLAGS.stop_after)
    except (ValueError, FileNotFoundError, BadDataError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def main(argv=None) -> int:
    """Entry point for `bioclip-jax train ...` (argv without the program name)."""
    args = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:  # absl exits 1 on --help and lists only __main__'s flags
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]))
        return 0
    try:
        app.run(_main, argv=args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
