"""Exit statuses of every `bioclip-jax` command, so that scripts can tell a finish from a stop,
a mistake in the command from a failure of the work.

  0   FINISHED   done. For `train`: the schedule ran to total_steps, the model is exported and
                 WORKDIR/DONE exists, or it ran to --stop-after (no export, no DONE)
  1   ERROR      the work failed (a damaged checkpoint, unusable data, a storage error), said in
                 one line on stderr; rerunning as is will fail again
  2   USAGE      a usage or input error: a bad argument, value or config field, or a file or
                 model source it names that does not exist
  75  STOPPED    `train` stopped early by SIGTERM, SIGINT or a preemption notice, after a
                 checkpoint was saved and with no export; rerun the same command to resume
                 (75 is sysexits' EX_TEMPFAIL: "try again later")
  130 ABORTED    interrupted: Ctrl-C (for `train`, a second one), stopped at once without
                 saving (the shell's 128 + SIGINT)

The same table, and what each launcher does with each status: docs/exit_statuses.md.
"""

FINISHED = 0
ERROR = 1
USAGE = 2
STOPPED = 75
ABORTED = 130

DONE_FILE = "DONE"  # written into a training workdir when a run finishes its whole schedule
