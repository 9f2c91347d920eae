"""Exit statuses of the train binary, so that job scripts can tell a stop from a finish.

  0   FINISHED   the schedule ran to total_steps (or to --stop_after); WORKDIR/DONE exists
  1   ERROR      a configuration, data or checkpoint problem; rerunning as is will fail again
  2   USAGE      bad command-line arguments
  75  STOPPED    stopped early by SIGTERM, SIGINT or a preemption notice, after a checkpoint
                 was saved and with no export; rerun the same command to resume
                 (75 is sysexits' EX_TEMPFAIL: "try again later")
  130 ABORTED    a second Ctrl-C: stopped at once, without saving (the shell's 128 + SIGINT)

What each launcher does with each status: docs/exit_statuses.md.
"""

FINISHED = 0
ERROR = 1
USAGE = 2
STOPPED = 75
ABORTED = 130

DONE_FILE = "DONE"  # written into the workdir when a run finishes its whole schedule
