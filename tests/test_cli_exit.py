"""A failed command ends with its one-line reason, not with the background noise that follows it.

The noise comes from threads still running after the error (Orbax, TensorStore and gcsfs
callbacks on a closed asyncio loop: "Exception ignored ...", "Event loop is closed", absl
tracebacks). How much of it appears is a race, so the first check stages it with a command of
its own; the second is the real case, a damaged checkpoint.
"""

import os
import subprocess
import sys
import textwrap

import bioclip_jax
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.models.params import flat_params
from bioclip_jax.pretrained import model_metadata

NOISY_COMMAND = textwrap.dedent('''
    import pathlib, sys, threading, time
    from absl import logging

    class ClosedLoopCallback:
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    def finish_saving(path):  # a background save still committing when the command fails
        time.sleep(0.3)
        for _ in range(50):
            ClosedLoopCallback()  # "Exception ignored in ..." through sys.unraisablehook
        logging.error("Traceback (most recent call last): ... from a background thread")
        pathlib.Path(path).write_text("saved")

    def main(argv):
        threading.Thread(target=finish_saving, args=(argv[0],)).start()
        print("error: the one clear line", file=sys.stderr, flush=True)
        return 1
''')


def _bioclip_jax(tmp_path, *args, code="from bioclip_jax.cli.main import main; sys.exit(main())"):
    """Runs `bioclip-jax ARGS` as the program, in tmp_path (where a test's own command module can lie)."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.argv[1:] = {list(map(str, args))!r}; {code}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_the_noise_after_a_failure_is_not_shown_and_pending_work_still_finishes(tmp_path):
    (tmp_path / "noisy_command.py").write_text(NOISY_COMMAND)
    register = "from bioclip_jax.cli import main as cli; cli.COMMANDS['noisy'] = ('noisy_command', ''); "
    done = _bioclip_jax(tmp_path, "noisy", tmp_path / "saved.txt", code=register + "sys.exit(cli.main())")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: the one clear line"], done.stderr
    assert (tmp_path / "saved.txt").read_text() == "saved"  # waited for, as Python's own exit does


CLOSED_LOOP_COMMAND = textwrap.dedent('''
    import sys, threading

    def callback_on_a_closed_loop():  # a storage read finishing after the failure closed its loop
        raise RuntimeError("Event loop is closed")

    def main(argv):
        reader = threading.Thread(target=callback_on_a_closed_loop)
        reader.start()
        reader.join()  # its report comes before the command's own line, as it can in a real failure
        print("error: the one clear line", file=sys.stderr, flush=True)
        return 1
''')


def test_closed_loop_reports_from_before_the_error_line_are_not_shown(tmp_path):
    """Reports that come while the command is still failing (the old code silenced only those after it)."""
    (tmp_path / "closed_loop_command.py").write_text(CLOSED_LOOP_COMMAND)
    register = "from bioclip_jax.cli import main as cli; cli.COMMANDS['closed'] = ('closed_loop_command', ''); "
    done = _bioclip_jax(tmp_path, "closed", code=register + "sys.exit(cli.main())")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: the one clear line"], done.stderr


def test_a_damaged_checkpoint_gives_its_one_line(tmp_path):
    workdir = tmp_path / "run"
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=1)
    model_dir.write_model_json(str(workdir), *model_metadata(model))
    model_dir.save_params(str(workdir / "checkpoints" / "10"), flat_params(model))
    for data in (workdir / "checkpoints").rglob("ocdbt.process_0/d/*"):  # cut in half, as an interrupted copy
        if data.stat().st_size > 100_000:                                   # leaves the big files
            os.truncate(data, data.stat().st_size // 2)
    done = _bioclip_jax(tmp_path, "export", "--checkpoint", workdir, "--output", tmp_path / "out")
    lines = done.stderr.splitlines()
    assert done.returncode == 1
    assert lines and lines[-1].startswith("error: ") and str(workdir) in lines[-1], done.stderr
    assert len(lines) < 5, done.stderr  # 1 to 31 lines before, by the race above


def test_gcsfs_giving_up_is_its_message_without_the_traceback(monkeypatch, caplog):
    import logging
    import types

    from bioclip_jax.cli import main as cli

    def command(argv):
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")
        except OSError:  # what gcsfs logs after its retries, before the error reaches the command
            logging.getLogger("gcsfs").error("_request out of retries on exception: Cannot connect", exc_info=True)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake", "a command that reaches a bucket that is down"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(main=command))
    assert cli.main(["fake"]) == 0
    assert "out of retries on exception: Cannot connect" in caplog.text
    assert "Traceback" not in caplog.text and "ConnectionRefusedError" not in caplog.text
