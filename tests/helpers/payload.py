"""A crafted checkpoint: a tensor file whose unpickling runs a command."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant_payload(path: Path, marker: Path) -> None:
    """A tensor file that looks like a checkpoint but carries a pickle payload.

    Proves the payload is live first (an unsafe load does create the marker), so the
    tests that check it never ran could not pass with a dud.
    """
    torch.save({"epoch": 1, "model": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # noqa: S614 - the control: this must run it
    assert marker.exists(), "the payload does not work; the test would prove nothing"
    marker.unlink()


def plant_raw_payload(path: Path, marker: Path) -> None:
    """A raw ``pickle.dumps`` payload (no zip archive around it) at ``path``.

    torch.load's weights-only unpickler stops at protocol 4's first opcode (FRAME)
    before it reaches the import, so this once read as a merely corrupt file.
    Proved live first, like :func:`plant_payload`.
    """
    import pickle

    blob = pickle.dumps({"epoch": 1, "model": {"w": [0.0, 0.0]}, "payload": Payload(marker)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    pickle.loads(blob)  # noqa: S301 - the control: this must run it
    assert marker.exists(), "the payload does not work; the test would prove nothing"
    marker.unlink()
