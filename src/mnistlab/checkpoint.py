"""Resumable checkpoints: what they hold, their identity (fingerprint), save and load.

A checkpoint (``checkpoints/<ds>/<arch>/seed-<seed>/last.pt``) holds the model, optimizer and
scheduler states, every global RNG state, the epoch, the history, the best weights,
the arch name and its builder arguments, and a fingerprint of everything that
decides the trained weights: params, data, code, torch version, world size. A run
resumes only from a checkpoint with its own fingerprint, so a resumed run ends
bit-identical to one that was never interrupted. Files are written and read with
:func:`mnistlab.utils.torch_save`/:func:`~mnistlab.utils.torch_load` (atomic,
``weights_only=True``) and sealed with a SHA-256 of their payload
(:func:`mnistlab.utils.seal`), checked before anything is resumed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from mnistlab.errors import MnistlabError, UnsafeFileError
from mnistlab.utils import (
    atomic_path,
    check_seal,
    file_sha256,
    json_digest,
    seal,
    torch_load,
    torch_save,
)

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


# What a refused checkpoint's error ends with: resuming is only an optimisation, so the
# way out is always open, but it is the user's call (the file may be evidence of tampering).
KEEP = "not resumed; left in place for inspection: delete it to train from scratch"


def load_resumable(path: Path, fingerprint: str, kept: Path | None = None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact run (same fingerprint), else None.

    With ``kept`` (:func:`kept_copy`), the copy of an unfinished run's last checkpoint is
    looked at too, and resumed when it is this run's and further along than ``path``:
    ``dvc exp run`` restores ``path`` from dvc.lock before it runs (the finished checkpoint
    of the committed params), which would otherwise throw an interrupted experiment's
    epochs away.

    Not resumed, with a warning (training starts from scratch and its first checkpoint
    replaces the file): a checkpoint of other params, data or code, and one without a
    digest, i.e. written before checkpoints were sealed (its code fingerprint cannot
    match today's code either, so nothing unverified is ever resumed).

    Refused with a one-line error that stops the stage, the file left in place: one
    torch cannot load safely (a pickle payload, :class:`UnsafeFileError`: possibly
    malicious), one that is empty, truncated or foreign, and one whose digest differs
    (altered or damaged: resuming from it would end in other weights than an
    uninterrupted run). Why refuse rather than retrain: a file that fails a check may
    be tampering, and overwriting it would destroy the evidence; deleting it is one
    command, which the error names.
    """
    ckpt, why_not = _judge(path, fingerprint)
    if kept is not None:
        copy, _ = _judge(kept, fingerprint)  # another run's copy: replaced by this run's first
        if copy is not None and (ckpt is None or copy["epoch"] > ckpt["epoch"]):
            if ckpt is not None:
                instead = f"epoch {ckpt['epoch']}, further back"
            else:  # another run's (DVC restored the committed one), or none (DVC removed it)
                instead = why_not or "not there"
            log.info("%s: resuming from %s, the last checkpoint of this unfinished run (%s: %s)",
                     path, kept, path.name, instead)
            return copy
    if why_not:
        log.warning("%s: %s; not resumed, training from scratch", path, why_not)
    return ckpt


def _judge(path: Path, fingerprint: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(checkpoint, None)`` if ``path`` resumes this run; ``(None, why not)`` if it is
    another's; ``(None, None)`` if there is none. Raises on a file it refuses (above)."""
    if not path.is_file():
        return None, None
    try:
        ckpt = torch_load(path)
    except UnsafeFileError:
        raise
    except MnistlabError as e:
        raise MnistlabError(f"{e}; {KEEP}") from None
    if not check_seal(ckpt, path, KEEP):
        if isinstance(ckpt, dict) and "fingerprint" in ckpt:
            return None, "no integrity digest (written by an older mnistlab)"
        raise MnistlabError(f"{path}: not a checkpoint (a tensor file without mnistlab's "
                            f"integrity digest); {KEEP}")
    if ckpt.get("fingerprint") != fingerprint:
        return None, "made with other params, data or code (fingerprint differs)"
    return ckpt, None


def kept_copy(checkpoint: Path) -> Path:
    """Where the last checkpoint of an unfinished run is also kept: beside the folder DVC
    tracks (``checkpoints/<ds>/<arch>/seed-<seed>.unfinished.pt``), outside it.

    Why: ``dvc exp run`` checks out every output recorded in dvc.lock before it runs,
    ``persist`` ones included, and a directory output loses any file it does not record.
    An experiment stopped mid-training and run again would find the committed run's
    checkpoint instead of its own and start over. The copy exists only while the run is
    unfinished (:func:`save_kept`, :func:`drop_kept`).
    """
    folder = checkpoint.parent
    return folder.with_name(f"{folder.name}.unfinished.pt")


def save_kept(checkpoint: Path, state: dict[str, Any]) -> None:
    """:func:`save_checkpoint` to :func:`kept_copy` first, then the same file to ``checkpoint``.

    In that order, so that a stop between the two leaves the copy ahead of ``checkpoint``
    (which :func:`load_resumable` then takes), never behind it or missing.
    """
    kept = kept_copy(checkpoint)
    save_checkpoint(kept, state)
    with atomic_path(checkpoint) as tmp:
        shutil.copyfile(kept, tmp)


def drop_kept(checkpoint: Path) -> None:
    """The run has finished: its checkpoint is what DVC records; the copy goes."""
    kept_copy(checkpoint).unlink(missing_ok=True)


def recorded_run_id(path: Path) -> str | None:
    """The MLflow run id a checkpoint names, whatever its fingerprint; None if it names
    none or cannot be read. Never raises: it only says which run a new one replaces."""
    try:
        ckpt = torch_load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - load_resumable has already judged the file
        return None
    run_id = ckpt.get("run_id") if isinstance(ckpt, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a sealed checkpoint atomically (a kill mid-write leaves the previous one intact)."""
    torch_save(seal(state), path)


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
