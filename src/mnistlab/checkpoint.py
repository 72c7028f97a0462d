"""Resumable checkpoints: what they hold, their identity (fingerprint), save and load.

A checkpoint (``checkpoints/<ds>/<arch>/last.pt``) holds the model, optimizer and
scheduler states, every global RNG state, the epoch, the history, the best weights,
the arch name and its builder arguments, and a fingerprint of everything that
decides the trained weights: params, data, code, torch version, world size. A run
resumes only from a checkpoint with its own fingerprint, so a resumed run ends
bit-identical to one that was never interrupted. Files are written and read with
:func:`mnistlab.utils.torch_save`/:func:`~mnistlab.utils.torch_load` (atomic,
``weights_only=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mnistlab.errors import MnistlabError, UnsafeFileError
from mnistlab.utils import file_sha256, json_digest, torch_load, torch_save

log = logging.getLogger(__name__)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def rng_state() -> dict[str, Any]:
    """Every global RNG state training draws from (dropout, init): CPU, CUDA, MPS.

    Shuffling and augmentation use per-epoch generators and need no saving.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (device states only where that device exists)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])


def load_resumable(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact run (same fingerprint), else None.

    A checkpoint that cannot be read (another torch version, a foreign file) is
    treated like a mismatch: a warning, and training starts from scratch. The
    file itself is left alone; the new run's first checkpoint replaces it. One
    carrying a pickle payload (:class:`UnsafeFileError`) is not: it stops the stage
    with a one-line error, so a planted file is reported, never silently replaced.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch_load(path)
    except UnsafeFileError:
        raise
    except MnistlabError as e:
        log.warning("%s; not resumed, training from scratch", e)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != fingerprint:
        log.warning("%s: made with other params, data or code (fingerprint differs); not resumed, "
                    "training from scratch", path)
        return None
    return ckpt


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a kill mid-write leaves the previous one intact)."""
    torch_save(state, path)


# --------------------------------------------------------------------------- identity

# Modules the train stage runs that only *record* a run and never touch a tensor that
# decides the weights: a change to them must not force a retrain (a finished
# checkpoint stays reusable), while any other module in the stage's import closure
# counts (tracking.py: MLflow; serving.py: the wrapper the logged model serves with).
# Everything else is derived from the real import graph, not a list.
RECORDING_ONLY = ("tracking.py", "serving.py")


def code_digest() -> str:
    """sha256 over the source of every module the train stage runs (minus :data:`RECORDING_ONLY`),
    and the torch version: a checkpoint made by other code is never resumed."""
    from mnistlab import codegraph

    files = codegraph.closure(codegraph.SRC / "stages" / "train.py")
    return json_digest({"torch": torch.__version__, **{
        str(f.relative_to(codegraph.SRC)): file_sha256(f)
        for f in sorted(files) if f.name not in RECORDING_ONLY}})
