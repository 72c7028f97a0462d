"""Small shared helpers: atomic writes, hashing, seeding, device choice, git info."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mnistlab.errors import MnistlabError, UnsafeFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds.

    Why: a killed stage must never leave a half-written file where the next
    stage (or a resumed run) would trust it. The rename is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file 0600; give it the mode a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON atomically (sorted keys keep diffs stable)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temp file + rename, with bytes that depend only on ``obj``.

    torch.save names the zip archive's records after the file it writes to, so
    saving straight to a random temp name would make the bytes differ on every
    run; an in-memory buffer is always named "archive".
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a tensor file with ``weights_only=True``; refuse anything that needs unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MnistlabError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "refused"
        text = str(e).strip()
        # torch's first line advises retrying with weights_only=False: never quote that.
        # The line that names the problem is the one about an unsupported GLOBAL (a
        # pickle that imports something: the way a payload runs code) or operand.
        unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([^\s,]+)", text)
        if unsafe:
            raise UnsafeFileError(
                f"{path}: refused to load: it asks to import {unsafe.group(1)} (a pickle "
                "payload that could run code; only plain tensor files are loaded, "
                "weights_only=True). Delete it if you do not trust it"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("Unsupported", "Trying to"))),
                      lines[0] if lines and not lines[0].startswith("Weights only load failed")
                      else type(e).__name__)
        raise MnistlabError(
            f"{path}: refused to load (not a plain tensor file; weights_only=True): {detail}"
        ) from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python and torch; with ``deterministic`` ask torch for bit-reproducible kernels."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """``auto`` → cuda > mps > cpu; anything else must be a device torch can use.

    ``key`` is the params key named in errors (each stage has its own device setting).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MnistlabError(
            f"{key}: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MnistlabError(f"{key}: {name!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MnistlabError(f"{key}: {name!r} requested but MPS is not available")
    return dev


def git_info(cwd: str | os.PathLike = ".") -> dict[str, str]:
    """Commit and dirty flag of the repo at ``cwd`` ("unknown" outside git)."""
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        # Only tracked files count: DVC outputs and mlflow.db are git-ignored.
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}
