"""The repo and its stages, run as DVC runs them: paths, temp copies, the stage environment, params.yaml."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mnistlab.config import load_yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "datasets"
VENV_BIN = Path(sys.executable).parent


@functools.cache
def committed_params_text() -> str:
    """The text of params.yaml as committed (``git show HEAD:params.yaml``); the file itself without git.

    Tests never read the working tree's params.yaml: ``dvc exp run -S hparams.mlp.lr=0.01``
    or ``-S 'datasets=[mnist]'`` rewrites it (in DVC's own YAML style), and ``make test``
    must pass after one. Without git history (a tarball, params.yaml not yet committed)
    the working-tree file is all there is.
    """
    try:
        # ./: relative to ROOT, not to the top of whatever repository holds it
        return subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / "params.yaml").read_text()


def committed_params() -> dict[str, Any]:
    """The committed params.yaml, parsed as the stages parse it (a fresh dict: edit it freely)."""
    return load_yaml(committed_params_text())


def write_committed_params(path: Path) -> Path:
    """The committed params.yaml written at ``path`` (for commands that take ``--params``)."""
    path.write_text(committed_params_text())
    return path


def stage_env(tmp: Path) -> dict[str, str]:
    """Environment for running stages/DVC in a temp repo: venv first on PATH, own MLflow store."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env.pop("DVC_EXP_NAME", None)
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def make_repo(repo: Path) -> Path:
    """What :func:`tmp_repo` makes, at ``repo`` (for module-scoped copies built once)."""
    tmp_path = repo.parent
    repo.mkdir()
    for name in ("dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, repo / name)
    write_committed_params(repo / "params.yaml")  # never the user's `dvc exp run -S` edits
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


def run_stage(script: str, *args: str, params: dict | None = None, cwd: Path,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``stages/<script>`` as DVC would, with ``params`` written to ``cwd/params.yaml``."""
    if params is not None:
        (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def edit_params(repo: Path, edit: Callable[[dict], object]) -> None:
    """Load the repo's params.yaml, let ``edit`` change it in place, write it back."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def no_step_floor(params: dict) -> dict:
    """``params`` with no step floor at all: ``train.min_steps: 0`` and no arch's own
    ``hparams.<arch>.min_steps`` (params.yaml gives lenet5 and cnn_4_8 one), so every
    arch trains exactly its ``epochs``; returns ``params`` (changed in place)."""
    params["train"]["min_steps"] = 0
    for section in params["hparams"].values():
        section.pop("min_steps", None)
    return params
