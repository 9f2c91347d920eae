"""The stop vote is its own job: reading a logged step writes its record, the vote says whether to stop."""

import os
import signal

import numpy as np

from bioclip_jax.train.metrics import MetricsWriter, OneStepLate, read_metrics
from bioclip_jax.train.stopping import StopSignals, StopVote


def test_a_lone_process_acts_on_its_signal_and_the_logged_step_counts_the_exchanged_skips(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=10)
    with StopSignals(handle_sigterm=True) as signals:
        vote = StopVote(signals)
        logged = OneStepLate(writer, share=vote.exchange, diverged_hint=lambda: "", start_step=0,
                             to_record=lambda metrics, seconds, skipped: {"loss": float(metrics["loss"]),
                                                                          "skipped_samples": skipped})
        logged.hold(2, {"loss": np.float32(0.5)}, np.array([1, 2], np.int64))
        assert not vote.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert vote.requested and signals.reason == "SIGTERM"  # before any exchange: one process needs no vote
        assert logged.read() is None  # reading writes the record; it answers nothing about stopping
        assert vote.exchange(np.array([0, 4], np.int64)) == 4
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 2, "loss": 0.5, "skipped_samples": 3}]
