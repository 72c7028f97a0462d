"""Stage commands find the project's Python however DVC was started (issue #15).

dvc.yaml starts every command with ``sh stages/run.sh``: it runs the stage with the first
interpreter that imports mnistlab among $MNISTLAB_PYTHON, $VIRTUAL_ENV, the repo's .venv,
PATH, and the .venv of an enclosing repo (``dvc exp run --temp`` and the queue run in
``.dvc/tmp/exps/<tmp>/``); with none, one ``error:`` line and exit 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.checks import assert_one_line_error
from helpers.repo import ROOT, VENV_BIN, run, stage_env

BARE_PATH = "/usr/bin:/bin"  # no venv on it: what `.venv/bin/dvc repro` sees without `activate`
VENV = Path(sys.prefix)  # the venv running the tests (it has mnistlab)
SHOW = "import shutil, sys; print(sys.executable); print(shutil.which('torchrun'))"
FIX = "run 'make setup' or activate .venv"

needs_venv = pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="tests not run from a venv")


def launcher_env(path: str, **extra: str) -> dict[str, str]:
    """The environment with ``PATH=path``, no activated venv and no override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MNISTLAB_PYTHON")}
    return {**env, "PATH": path, **extra}


def launch(cwd: Path, *cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``/bin/sh stages/run.sh CMD...`` in ``cwd`` (a folder holding stages/run.sh)."""
    return subprocess.run(["/bin/sh", "stages/run.sh", *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def fake_repo(at: Path) -> Path:
    """A folder with dvc.yaml and stages/run.sh: all the launcher looks at."""
    (at / "stages").mkdir(parents=True)
    shutil.copy2(ROOT / "stages" / "run.sh", at / "stages" / "run.sh")
    (at / "dvc.yaml").write_text("stages: {}\n")
    return at


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A real venv without mnistlab (nor anything else)."""
    path = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def test_every_stage_command_starts_with_the_launcher():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        script = f"stages/{name}.py "
        launcher = "${train.launcher}" if name == "train" else "python"
        assert cmd.startswith(f"sh stages/run.sh {launcher} {script}"), (name, cmd)


@needs_venv
@pytest.mark.parametrize("how", ["activated venv", "repo .venv", "venv first on PATH", "queue temp dir"])
def test_the_launcher_picks_the_projects_python(tmp_path: Path, how: str):
    repo = fake_repo(tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    # PATH without any python (not even a system one, which might have mnistlab)
    cwd, env, want = repo, launcher_env(str(tmp_path / "empty")), VENV / "bin"
    if how == "activated venv":
        env["VIRTUAL_ENV"] = str(VENV)
    elif how == "repo .venv":  # `.venv/bin/dvc repro` without `activate`
        (repo / ".venv").symlink_to(VENV)
        want = repo / ".venv" / "bin"
    elif how == "venv first on PATH":  # the CI copies under `make`: no .venv of their own
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
        want = VENV_BIN
    else:  # `dvc exp run --temp` / the queue: a copy in .dvc/tmp/exps/<tmp>/, no venv on PATH
        (repo / ".venv").symlink_to(VENV)
        cwd = fake_repo(repo / ".dvc" / "tmp" / "exps" / "tmpabc")
        want = repo / ".venv" / "bin"
    p = launch(cwd, "python", "-c", SHOW, env=env)
    assert p.returncode == 0, p.stderr
    python, torchrun = p.stdout.split("\n")[:2]
    assert python == str(want / "python")
    # its bin folder is first on PATH: train.launcher `torchrun ...` is the same venv's
    if (want / "torchrun").exists():
        assert torchrun == str(want / "torchrun")


@needs_venv
@pytest.mark.slow
def test_dvc_repro_without_activating_the_venv(tmp_repo: Path):
    """The issue's case: `.venv/bin/dvc repro` with no venv on PATH ran `python` from PATH
    (none in /usr/bin, or one without mnistlab: ModuleNotFoundError). The stage commands,
    exactly as dvc.yaml writes them, now run the repo's .venv."""
    (tmp_repo / ".venv").symlink_to(VENV)  # git-ignored, as `make setup` makes it
    env = {**stage_env(tmp_repo), "PATH": BARE_PATH}
    env.pop("VIRTUAL_ENV", None)
    env.pop("MNISTLAB_PYTHON", None)
    p = run([str(VENV_BIN / "dvc"), "repro", "split@digits"], tmp_repo, env=env)
    assert "Running stage 'download@digits'" in p.stdout and "Running stage 'split@digits'" in p.stdout
    assert "sh stages/run.sh python stages/split.py" in p.stdout  # the command as DVC showed it
    assert (tmp_repo / "data" / "split" / "digits" / "train.pt").is_file()


@pytest.mark.parametrize("how", ["override", "activated venv", "no python at all"])
def test_no_python_with_mnistlab_is_a_one_line_error(tmp_path: Path, bare_venv: Path, how: str):
    repo = fake_repo(tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    env = launcher_env(str(tmp_path / "empty"))  # nothing on PATH: only what each case names
    python = bare_venv / "bin" / "python"
    if how == "override":
        env["MNISTLAB_PYTHON"] = str(python)
        want = f"error: cannot import mnistlab with {python} (MNISTLAB_PYTHON): {FIX}"
    elif how == "activated venv":  # a venv of another project
        env["VIRTUAL_ENV"] = str(bare_venv)
        want = f"error: cannot import mnistlab with {python}: {FIX}"
    else:
        want = f"error: no Python found (no venv, none on PATH): {FIX}"
    # the stage command as dvc.yaml writes it (download@digits)
    p = launch(repo, "python", "stages/download.py", "--dataset", "digits", "--out", "data/raw/digits",
               env=env)
    assert assert_one_line_error(p) == want
    assert p.stderr == want + "\n" and p.stdout == ""
    assert not (repo / "data").exists()


def test_system_python_without_mnistlab_is_named(tmp_path: Path):
    """The usual culprit: a system python3 on a bare PATH, in a repo with no .venv."""
    system = shutil.which("python3", path=BARE_PATH)
    if system is None or subprocess.run([system, "-c", "import mnistlab"], capture_output=True).returncode == 0:
        pytest.skip("no python3 without mnistlab on /usr/bin:/bin")
    repo = fake_repo(tmp_path / "repo")
    p = launch(repo, "python", "stages/split.py", "--dataset", "digits", env=launcher_env(BARE_PATH))
    line = assert_one_line_error(p, f"{system}", FIX)
    assert line.startswith("error: cannot import mnistlab with ")


@pytest.mark.skipif(not (VENV / ".installed").is_file(), reason="tests not run from a `make setup` venv")
def test_make_setup_leaves_the_libraries_byte_compiled():
    """`make setup` installs with pip's --no-compile and byte-compiles on every core itself: the
    libraries each stage imports must still have their bytecode, or every stage process (with
    PYTHONDONTWRITEBYTECODE set, which keeps none) compiles them again at each start."""
    import importlib.util

    missing = []
    for name in ("torch", "torch.nn.modules.conv", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
                 "sqlalchemy", "alembic", "sklearn.metrics", "scipy.stats", "dvc.repo"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        if not Path(importlib.util.cache_from_source(spec.origin)).is_file():
            missing.append(f"{name} ({spec.origin})")
    assert not missing, f"not byte-compiled by make setup: {missing}"
