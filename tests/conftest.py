"""Shared fixtures: repo paths, the real MNIST files beside the repo, and temp copies of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
VENV_BIN = Path(sys.executable).parent

# Tests are CPU-only and small; two threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mnist_t10k() -> Path:
    path = SHARED / "mnist-t10k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def mnist_mini() -> Path:
    path = SHARED / "mnist-mini"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def stage_env(tmp: Path) -> dict[str, str]:
    """Environment for running stages/DVC in a temp repo: venv first on PATH, own MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env.pop("DVC_EXP_NAME", None)
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture
def tmp_repo(tmp_path: Path) -> Path:
    """A git+DVC copy of the project (code and params only) in a temp dir.

    ``../shared`` is linked beside it so the ``mnist_mini`` source resolves.
    """
    return make_repo(tmp_path / "repo")


def make_repo(repo: Path) -> Path:
    """What :func:`tmp_repo` makes, at ``repo`` (for module-scoped copies built once)."""
    tmp_path = repo.parent
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, repo / name)
    for d in ("stages", "src"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    if SHARED.parent.is_dir() and not (tmp_path / "shared").exists():
        (tmp_path / "shared").symlink_to(SHARED.parent)
    env = stage_env(repo)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    return repo


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """Run a command in a temp repo with the stage environment; show output on failure."""
    env = kw.pop("env", None) or stage_env(cwd)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p
