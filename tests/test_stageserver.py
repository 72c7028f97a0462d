"""The stage server (src/mnistlab/stageserver.py): a served script is the script ``python`` would
have run (arguments, folder, environment, output, exit status, signals), a stage that it cannot
stand in for runs as a fresh interpreter, and no stage outlives the process it belongs to.

The session's server (conftest's ``stage_server``) serves most of them; the tests that change
mnistlab's code or kill the server start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.repo import ROOT, stage_env

from mnistlab import stageserver
from mnistlab.stageserver import ENV, Server, mismatch, refusal

pytestmark = pytest.mark.skipif(not stageserver.supported(), reason="the stage server is Linux-only")

PROBE = """\
import json, os, signal, sys, time
mode = sys.argv[1]
if mode == "wait":  # until a stop signal: exit 7 on SIGTERM (set before the line the test waits for)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print(json.dumps({"argv": sys.argv, "file": __file__, "cwd": os.getcwd(), "path0": sys.path[0],
                  "var": os.environ.get("MNISTLAB_PROBE"), "preloaded": "torch" in sys.modules,
                  "pid": os.getpid()}), flush=True)
import logging  # as a stage logs (mnistlab.errors.run_stage), in a process that imported MLflow
logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.getLogger("probe").info("logged")
print("to stderr", file=sys.stderr)
if mode == "wait":
    time.sleep(120)
if mode == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(mode))
"""


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "probe.py").write_text(PROBE)
    return tmp_path


CLIENT = [sys.executable, "-m", "mnistlab.stageserver", "run"]  # what stages/run.sh starts


def through_client(cwd: Path, *args: str, env: dict[str, str] | None = None,
                   script: str = "sub/probe.py") -> subprocess.CompletedProcess:
    return subprocess.run([*CLIENT, script, *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def started(cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """The client running the probe in "wait" mode, and the probe's first line."""
    proc = subprocess.Popen([*CLIENT, "sub/probe.py", "wait"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_served_script_is_what_python_would_run(stage_server: str | None, probe: Path):
    assert stage_server, "the session's stage server did not start"
    env = {**os.environ, "MNISTLAB_PROBE": "from the client", "MNISTLAB_DEBUG": "1"}
    served = through_client(probe, "3", env=env)
    fresh = subprocess.run([sys.executable, "sub/probe.py", "3"], cwd=probe, env=env,
                           capture_output=True, text=True, timeout=60)
    a, b = json.loads(served.stdout), json.loads(fresh.stdout)
    assert a.pop("preloaded") and not b.pop("preloaded")  # the server's imports, not its own
    assert a.pop("pid") != b.pop("pid")
    assert a == b == {"argv": ["sub/probe.py", "3"], "file": str(probe / "sub" / "probe.py"),
                      "cwd": str(probe), "path0": str(probe / "sub"), "var": "from the client"}
    assert served.returncode == fresh.returncode == 3
    assert served.stderr.splitlines()[-2:] == fresh.stderr.splitlines() == ["logged", "to stderr"]
    assert "forked by" in served.stderr  # MNISTLAB_DEBUG: said how it ran


@pytest.mark.parametrize("change", ["OMP_NUM_THREADS", "no server", "off"])
def test_what_the_server_cannot_stand_in_for_runs_fresh(stage_server: str | None, probe: Path,
                                                       change: str):
    env = {**os.environ, "MNISTLAB_DEBUG": "1"}
    if change == "OMP_NUM_THREADS":  # read by OpenMP when torch loads: the server's is fixed
        env["OMP_NUM_THREADS"] = str(int(env.get("OMP_NUM_THREADS", "1")) + 1)
    else:
        env[ENV] = str(probe / "no-such-socket") if change == "no server" else "off"
    p = through_client(probe, "4", env=env)
    assert p.returncode == 4
    assert not json.loads(p.stdout)["preloaded"]
    if change == "OMP_NUM_THREADS":
        assert "environment variable OMP_NUM_THREADS differs from the server's" in p.stderr


def test_python_options_and_a_missing_script_are_pythons_own(stage_server: str | None, tmp_path: Path):
    """stages/run.sh hands the client whatever followed `python`: only a script is served."""
    p = through_client(tmp_path, "import sys; print('torch' in sys.modules, sys.argv)", "x", script="-c")
    assert (p.returncode, p.stdout) == (0, "False ['-c', 'x']\n")
    p = through_client(tmp_path, script="missing.py")
    assert p.returncode == 2 and "can't open file" in p.stderr and "missing.py" in p.stderr


def test_mismatch_ignores_only_what_stages_read_while_running():
    base = {"HOME": "/h", "OMP_NUM_THREADS": "1", "PATH": "/a", "MLFLOW_TRACKING_URI": "sqlite:///a.db"}
    assert mismatch(base, {**base, "PATH": "/b:/a", "MLFLOW_TRACKING_URI": "sqlite:///b.db",
                           "DVC_EXP_NAME": "x", "MNISTLAB_THREADS": "2",
                           "_MLFLOW_TELEMETRY_SESSION_ID": "s", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}) is None
    assert mismatch(base, {**base, "OMP_NUM_THREADS": "2"}) == "OMP_NUM_THREADS"
    assert mismatch(base, {k: v for k, v in base.items() if k != "HOME"}) == "HOME"
    assert mismatch(base, {**base, "PYTHONHASHSEED": "0"}) == "PYTHONHASHSEED"
    # set by a preloaded library's import: a client whose parent imported it has it too
    assert mismatch(base, {**base, "KMP_DUPLICATE_LIB_OK": "True"}) == "KMP_DUPLICATE_LIB_OK"
    assert mismatch(base, {**base, "KMP_DUPLICATE_LIB_OK": "True"}, {"KMP_DUPLICATE_LIB_OK": "True"}) is None
    assert mismatch(base, {**base, "KMP_DUPLICATE_LIB_OK": "x"}, {"KMP_DUPLICATE_LIB_OK": "True"}) \
        == "KMP_DUPLICATE_LIB_OK"


def test_refusal_names_what_a_fork_would_get_wrong():
    me = stageserver.describe_process()
    assert refusal(me, me) is None
    assert "niceness" in refusal({**me, "nice": me["nice"] + 1}, me)  # a fork cannot lower it
    assert refusal(me, {**me, "nice": me["nice"] + 1}) is None  # the child raises its own
    limits = {**me["limits"], "RLIMIT_NOFILE": [64, 64]}
    assert refusal(me, {**me, "limits": limits}) == "another limits than the server's"
    assert refusal(me, {**me, "executable": "/other/python"}) == "another executable than the server's"


def test_a_stop_signal_reaches_the_stage(stage_server: str | None, probe: Path):
    proc, first = started(probe, dict(os.environ))
    assert first["preloaded"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 7  # the probe's own handler ran: the signal reached it, once


def test_a_stage_killed_by_a_signal_kills_its_client_alike(stage_server: str | None, probe: Path):
    p = through_client(probe, "die")
    assert json.loads(p.stdout)["preloaded"]
    assert p.returncode == -signal.SIGKILL


def test_a_killed_client_takes_its_stage_along(stage_server: str | None, probe: Path):
    proc, first = started(probe, dict(os.environ))
    assert first["preloaded"]
    proc.kill()  # kill -9: nothing forwarded; the server sees the connection close
    proc.wait(10)
    assert gone(first["pid"]), "the stage ran on after its client was killed"


def test_served_stages_import_mnistlab_as_it_is_now_and_die_with_the_server(probe: Path,
                                                                           tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "mnistlab", src / "mnistlab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    server = Server({**os.environ, "PYTHONPATH": str(src)})
    env = server.start()
    try:
        assert ENV in env
        # changed after the server started (and imported it): the stage sees the change
        with open(src / "mnistlab" / "__init__.py", "a") as f:
            f.write("MARK = 'edited'\n")
        (probe / "sub" / "mark.py").write_text(
            "import json, mnistlab, sys\n"
            "print(json.dumps([mnistlab.__file__, getattr(mnistlab, 'MARK', None), 'torch' in sys.modules]))\n")
        p = through_client(probe, env=env, script="sub/mark.py")
        assert json.loads(p.stdout) == [str(src / "mnistlab" / "__init__.py"), "edited", True], p.stderr

        proc, first = started(probe, env)
        assert first["preloaded"]
        server.proc.kill()  # the server dies mid-stage: its stage with it, the client says so
        assert proc.wait(30) == 1
        assert proc.stderr.read().strip().splitlines()[-1] == (
            f"error: the stage server stopped while it ran sub/probe.py (process {first['pid']})")
        assert gone(first["pid"])
    finally:
        server.stop()


def test_a_python_started_by_a_relative_path_starts_its_server(tmp_path: Path):
    """`PATH=.venv/bin:$PATH python ...` gives a relative sys.executable; the server it starts runs
    in its own folder, so that path must not be taken as is."""
    venv_parent = Path(sys.executable).parent.parent.parent
    script = ("import sys; from mnistlab.stageserver import ENV, Server\n"
              "s = Server(); env = s.start()\n"
              "try:\n    print(sys.executable, ENV in env)\nfinally:\n    s.stop()\n")
    bin_dir = os.path.relpath(Path(sys.executable).parent, venv_parent)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    p = subprocess.run([Path(sys.executable).name, "-c", script], cwd=venv_parent,
                       env={**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    relative, served = p.stdout.split()
    assert not os.path.isabs(relative) and served == "True"


def test_pipeline_stages_are_served_through_run_sh(stage_server: str | None, tmp_repo: Path):
    """The stages that DVC runs in the tests (stages/run.sh, the stage environment) fork from the
    session's server: a refusal would turn every served pipeline test back into fresh starts."""
    env = {**stage_env(tmp_repo), "MNISTLAB_DEBUG": "1"}
    out = tmp_repo / "data" / "raw" / "digits"
    p = subprocess.run(["sh", "stages/run.sh", "python", "stages/download.py", "--dataset", "digits",
                        "--out", str(out)], cwd=tmp_repo, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "stage server: stages/download.py runs as process" in p.stderr, p.stderr
    assert "running a fresh interpreter" not in p.stderr
