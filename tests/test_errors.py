"""errors.run_stage, the one error path of every stage: user errors, MLflow store errors and
OS errors end as one ``error:`` line (exit 2), credentials removed; ``MNISTLAB_DEBUG=1``
adds the traceback; a bug keeps its traceback (exit 1), credentials removed there too.

In process, with the exceptions MLflow really raises; tests/test_bad_inputs has the same
failures through the real stage scripts.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys

import pytest
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from mnistlab import tracking  # loaded, as in every stage that uses MLflow
from mnistlab.errors import MnistlabError, run_stage

SECRET = "TopS3cret"
URI = f"http://bob:{SECRET}@127.0.0.1:5999"


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    monkeypatch.delenv("MNISTLAB_DEBUG", raising=False)


def outcome(exc: BaseException, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a stage whose main raises ``exc``."""
    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        run_stage(main)
    return e.value.code, capsys.readouterr().err


def one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and SECRET not in err, err
    lines = err.rstrip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
    return lines[-1]


def http_failure() -> MlflowException:
    """What MLflow raised against a dead server: its message holds the URI, password and all."""
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except OSError as e:
            raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries "
                                  "exceeded") from e
    except ConnectionError as e:
        try:  # as MLflow raises it: inside the except, not "from"
            raise MlflowException(f"API request to {URI}/api/2.0/mlflow/runs/log-batch failed "
                                  f"with exception {e}")
        except MlflowException as m:
            return m


def test_an_mlflow_error_is_one_line_naming_the_store_without_the_password(capsys):
    line = one_line(*outcome(http_failure(), capsys))
    assert line == "error: MLflow tracking store http://127.0.0.1:5999: [Errno 111] Connection refused"


def test_a_read_only_database_names_it_and_the_real_cause(capsys, monkeypatch):
    """Was: ~90 lines of traceback, then "(raised as a result of Query-invoked autoflush ...)"."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/mlflow.db")
    try:
        try:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        except sqlite3.Error as orig:
            raise sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", {}, orig) from orig
    except sqlalchemy.exc.OperationalError as e:
        wrapped = MlflowException("(raised as a result of Query-invoked autoflush; consider using a "
                                  f"session.no_autoflush block ...)\n{e}")
        wrapped.__cause__ = e
    line = one_line(*outcome(wrapped, capsys))
    assert line == ("error: MLflow tracking store sqlite:////data/mlflow.db: "
                    "attempt to write a readonly database")


@pytest.mark.parametrize(("err", "text"), [
    (errno.ENOSPC, "No space left on device"),
    (errno.EACCES, "Permission denied"),
    (errno.EROFS, "Read-only file system"),
])
def test_an_os_error_names_the_file(capsys, err, text):
    line = one_line(*outcome(OSError(err, text, "metrics/digits/mlp/test.json"), capsys))
    assert line == f"error: metrics/digits/mlp/test.json: {text}"


def test_a_user_error_is_still_its_own_line_redacted(capsys):
    line = one_line(*outcome(MnistlabError(f"cannot use {URI}\n(see above)"), capsys))
    assert line == "error: cannot use http://127.0.0.1:5999 (see above)"


def test_debug_adds_the_traceback_still_redacted(capsys, monkeypatch):
    monkeypatch.setenv("MNISTLAB_DEBUG", "1")
    code, err = outcome(http_failure(), capsys)
    assert code == 2 and "Traceback (most recent call last)" in err and SECRET not in err
    assert "ConnectionRefusedError" in err  # the whole chain
    assert err.rstrip().splitlines()[-1].startswith("error: MLflow tracking store http://127.0.0.1:5999")


def test_a_bug_keeps_its_traceback_without_the_password(capsys):
    code, err = outcome(ValueError(f"unexpected answer from {URI}"), capsys)
    assert code == 1 and "Traceback (most recent call last)" in err
    assert "ValueError: unexpected answer from http://127.0.0.1:5999" in err and SECRET not in err
    assert "error:" not in err


def test_fail_fast_http_settings_leave_the_users_alone(monkeypatch):
    for name in tracking.FAIL_FAST:
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever it sets
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    tracking._fail_fast()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == tracking.FAIL_FAST["MLFLOW_HTTP_REQUEST_TIMEOUT"]


def test_a_failed_per_epoch_flush_says_where_training_stopped(capsys, monkeypatch):
    """Was: the MlflowException's traceback, password included, from EpochLogger.flush."""
    from mnistlab.stages.train import EpochLogger

    def dead(run_id, rows):
        raise http_failure()

    monkeypatch.setattr(tracking, "log_history", dead)
    logger = EpochLogger("run")
    logger.buffer = [{"epoch": 6, "train_loss": 0.5}, {"epoch": 7, "train_loss": 0.4}]

    def main():
        logger.flush()

    with pytest.raises(SystemExit) as e:
        run_stage(main)
    line = one_line(e.value.code, capsys.readouterr().err)
    assert line == ("error: MLflow tracking store http://127.0.0.1:5999: [Errno 111] Connection "
                    "refused (while logging epoch 7: training stopped; rerun to resume from the "
                    "last checkpoint)")


# --------------------------------------------------------------------------- leaving a command

EXITING = '''
import atexit, sys, threading, time
from pathlib import Path
from mnistlab.errors import MnistlabError, exit_process, run_script

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))  # still runs: a normal exit's handlers
sys.stdout.write("buffered, no newline")  # flushed on the way out
how = sys.argv[2]
if how == "thread":  # a non-daemon thread still working: waited for, as at a normal exit
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
    exit_process(3)
if how == "message":
    exit_process("stopped: a message")
def main():
    if how == "user-error":
        raise MnistlabError("params.yaml: train.lr: not a number")
    return int(how)
run_script(main)
raise AssertionError("run_script returned")
'''


@pytest.mark.parametrize("how, status, stderr", [
    ("0", 0, ""), ("1", 1, ""), ("user-error", 2, "error: params.yaml: train.lr: not a number\n"),
    ("message", 1, "stopped: a message\n"), ("thread", 3, "")])
def test_a_command_exits_with_its_code_its_output_and_atexit_handlers_without_teardown(
        tmp_path, how, status, stderr):
    """run_script / exit_process: the exit code sys.exit would give, stdout flushed, the atexit
    handlers run; a still-running non-daemon thread is waited for (a plain sys.exit then)."""
    script = tmp_path / "cmd.py"
    script.write_text(EXITING)
    p = subprocess.run([sys.executable, str(script), str(tmp_path), how], capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout) == (status, "buffered, no newline"), p.stderr
    assert p.stderr.endswith(stderr) and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").exists() == (how == "thread")


def test_exit_process_skips_the_interpreter_teardown(tmp_path):
    """What it is for: an object freed only at teardown (a cycle's __del__) never runs."""
    code = ("import sys\nfrom mnistlab.errors import exit_process\n"
            "class Noisy:\n    def __del__(self):\n        sys.stdout.write('torn down')\n"
            "a = Noisy(); a.me = a\n"
            "exit_process(0) if sys.argv[1] == 'fast' else sys.exit(0)\n")
    fast, slow = (subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                                 timeout=120) for how in ("fast", "normal"))
    assert (fast.returncode, fast.stdout) == (0, "")
    assert (slow.returncode, slow.stdout) == (0, "torn down")
