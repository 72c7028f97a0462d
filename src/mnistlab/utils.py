"""Small shared helpers: atomic writes, hashing, seeding, device choice, git info."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickletools
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
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
        try:
            os.replace(tmp, path)
        except OSError as e:  # its message would name the hidden temp file first: name the target
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except OSError as e:
        if e.filename is not None:
            raise
        # A writer that reports a full disk without the file (torch.save, zipfile, json.dump:
        # "[Errno 28] No space left on device") gets it here, so the one error line names it.
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


class Staging:
    """Outputs written to a temp folder under their final names, put in place all at once.

    :meth:`path` and :meth:`folder` give the stand-in of a final file or folder; :func:`staged`
    publishes every file written there only when the whole stage has succeeded.
    """

    def __init__(self, root: Path):
        self.root = root
        self.folders: dict[Path, Path] = {}  # final folder -> its stand-in

    def folder(self, final: str | os.PathLike) -> Path:
        """The (empty, at first) stand-in of the folder ``final``."""
        final = Path(final)
        if final not in self.folders:
            self.folders[final] = self.root / str(len(self.folders))
            self.folders[final].mkdir()
        return self.folders[final]

    def path(self, final: str | os.PathLike) -> Path:
        """The stand-in of the file ``final`` (same name: MLflow names artifacts after files)."""
        return self.folder(Path(final).parent) / Path(final).name

    def publish(self) -> list[Path]:
        """Copy every staged file over its final path; none is replaced unless all copies
        are complete (each goes through :func:`atomic_path`). Returns the final paths."""
        done = []
        with contextlib.ExitStack() as renames:  # on exit, without error: every rename
            for final, stand_in in self.folders.items():
                final.mkdir(parents=True, exist_ok=True)  # a DVC output folder, even if empty
                for src in sorted(stand_in.rglob("*")):
                    if src.is_file():
                        dst = final / src.relative_to(stand_in)
                        shutil.copyfile(src, renames.enter_context(atomic_path(dst)))
                        done.append(dst)
        return done


@contextlib.contextmanager
def staged() -> Iterator[Staging]:
    """A :class:`Staging` whose files replace the stage's outputs only if the block succeeds.

    Why: a stage either completes all its outputs or leaves those of its last successful
    run byte-identical. One that logs its outputs to MLflow writes them first (here), logs
    them, and publishes them last: a failure anywhere (a dead tracking server, a read-only
    mlflow.db, a full disk) leaves no new picture beside stale metrics.
    """
    with tempfile.TemporaryDirectory(prefix="mnistlab-staged-") as tmp:
        staging = Staging(Path(tmp))
        yield staging
        staging.publish()


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


ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins (zip format, torch >= 1.6)


def _pickle_imports(path: Path) -> list[str] | None:
    """What unpickling ``path`` would import (GLOBAL, INST, STACK_GLOBAL); None: not a whole pickle.

    pickletools only parses the opcodes: nothing is built, imported or called.
    STACK_GLOBAL takes module and name from the stack: the last two strings pushed
    (a stream that hides them behind the memo shows up as a wrong name, never as none).
    """
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) or "?")
                elif isinstance(arg, str):
                    strings.append(arg)
                elif op.name == "STOP":
                    return names
    except Exception:  # noqa: BLE001 - any parse error (bad opcode, cut short) means "not a pickle"
        return None
    return None


def _check_container(path: Path) -> None:
    """Refuse, before torch.load sees it, any file that is not the zip archive torch.save writes.

    Why: torch.load hands anything else (a raw pickle, torch's pre-1.6 format, which we
    never write) to its weights-only unpickler. That runs nothing, but it stops at the
    first opcode it does not know (protocol 4's FRAME) before it sees what the stream
    imports, so a planted ``pickle.dumps`` payload looked merely "corrupt", and a
    corrupt checkpoint used to be replaced by a fresh run.
    """
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head == ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise MnistlabError(f"{path}: refused to load (not a plain tensor file: a damaged zip "
                                "archive, its directory is missing: truncated?)")
        return
    if not head:
        raise MnistlabError(f"{path}: refused to load (not a plain tensor file: empty, 0 bytes)")
    imports = _pickle_imports(path)
    if imports is None:
        raise MnistlabError(f"{path}: refused to load (not a plain tensor file: neither the zip "
                            "archive torch.save writes nor a pickle)")
    if not imports:
        raise MnistlabError(f"{path}: refused to load (not a plain tensor file: a raw pickle, not "
                            "the zip archive torch.save writes)")
    raise UnsafeFileError(
        f"{path}: refused to load: not a file torch can load safely, a raw pickle (not the zip "
        f"archive torch.save writes) that asks to import {', '.join(dict.fromkeys(imports))} "
        "(a payload that could run code: possibly malicious). Nothing was loaded or run and "
        "the file is left in place for inspection; delete it if you do not trust it"
    )


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a tensor file with ``weights_only=True``; refuse anything that needs unpickling code.

    Only the zip archive torch.save writes is handed to torch.load (:func:`_check_container`);
    an empty, truncated or foreign file is a :class:`MnistlabError`, a pickle that imports
    something an :class:`UnsafeFileError`. Integrity (a flipped byte in a weight, which
    torch.load does not notice) is the caller's check: :func:`check_seal`.
    """
    path = Path(path)
    if not path.is_file():
        raise MnistlabError(f"{path}: file not found")
    _check_container(path)
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


# --------------------------------------------------------------------------- sealed files
# Model files and checkpoints carry a SHA-256 of their own payload, checked on load.
# torch's zip archive keeps a CRC-32 per record but torch.load never checks it: one
# flipped byte inside a weight loads silently as a slightly different float. The digest
# is taken over the loaded values (structure, keys, scalars, each tensor's dtype, shape
# and bytes), not over the file's bytes, so it can live inside the file it vouches for.
# It catches damage and edits that do not recompute it; it is not a signature (anyone
# able to write the file can also write a matching digest).

DIGEST_KEY = "sha256"  # the top-level key of a sealed file that holds the digest


def payload_sha256(obj: Any) -> str:
    """SHA-256 of a payload: dicts (in key order), lists, tuples, scalars and tensors' bytes.

    Every item is fed as a type tag, a length and its bytes, so two different payloads
    never feed the same stream. Raises TypeError for a type mnistlab never saves.
    """
    h = hashlib.sha256()

    def feed(tag: bytes, data: bytes | memoryview) -> None:
        h.update(tag + len(data).to_bytes(8, "little"))
        h.update(data)

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            feed(b"T", f"{t.dtype}{list(t.shape)}".encode())
            feed(b"B", memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            feed(b"D", str(len(x)).encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            feed(b"L" if isinstance(x, list) else b"U", str(len(x)).encode())
            for v in x:
                walk(v)
        elif isinstance(x, float):
            feed(b"f", struct.pack("<d", x))  # exact, NaN and -0.0 included
        elif x is None or isinstance(x, (bool, int)):  # bool before int: repr tells them apart
            feed(b"i", repr(x).encode())
        elif isinstance(x, str):
            feed(b"s", x.encode("utf-8", "surrogatepass"))
        elif isinstance(x, bytes):
            feed(b"y", x)
        elif isinstance(x, (torch.dtype, torch.device)):
            feed(b"r", repr(x).encode())
        else:
            raise TypeError(f"payload_sha256: cannot digest a {type(x).__name__}")

    walk(obj)
    return h.hexdigest()


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with :data:`DIGEST_KEY` (last) holding :func:`payload_sha256` of the rest."""
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    return {**body, DIGEST_KEY: payload_sha256(body)}


def check_seal(record: Any, path: str | os.PathLike, remedy: str) -> bool:
    """Check the digest :func:`seal` stored in a loaded ``record``.

    Returns:
        True if it matches; False if ``record`` holds none (a file written before
        digests, or not by mnistlab): the caller decides what that means.

    Raises:
        MnistlabError: The digest differs (one line naming ``path``, ending with ``remedy``).
    """
    if not isinstance(record, dict) or DIGEST_KEY not in record:
        return False
    try:
        ok = record[DIGEST_KEY] == payload_sha256({k: v for k, v in record.items() if k != DIGEST_KEY})
    except TypeError:  # holds a type mnistlab never writes: not what was sealed
        ok = False
    if not ok:
        raise MnistlabError(f"{path}: integrity check failed (SHA-256 of the payload differs): "
                            f"the file was altered or damaged; {remedy}")
    return True


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
    set_deterministic(deterministic)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode)`` for eager code, without importing Inductor.

    Why: the public call also sets ``torch._inductor.config.deterministic``, and importing
    that config imports Inductor, for a flag only torch.compile reads: ~1.5 s of a train
    stage under cProfile on a 2-core CPU (Dynamo, which it also imports, the optimizer
    loads anyway). :func:`mnistlab.training.build` makes the public call
    when it compiles (Inductor is imported then anyway), and so does this function whenever
    Inductor is already loaded or torch lacks the private setter.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=False)
    else:
        setter(mode, warn_only=False)


def pick_device(name: str, key: str) -> torch.device:
    """``auto`` → cuda > mps > cpu; anything else must be a device torch can use.

    ``key`` is the params key named in errors (each stage has its own device setting:
    no default, so no stage can report another stage's key).
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
            f"params.yaml: {key}: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MnistlabError(f"params.yaml: {key}: {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MnistlabError(f"params.yaml: {key}: {name!r} requested but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MnistlabError(f"params.yaml: {key}: {name!r} requested but MPS is not available")
    return dev


def git_info(cwd: str | os.PathLike = ".", outputs: Sequence[str] = ()) -> dict[str, str]:
    """Commit and dirty flag of the repo at ``cwd`` ("unknown" outside git).

    Dirty: a tracked file differs from the commit, ``outputs`` (paths relative to ``cwd``)
    excepted. Why: the pipeline's own outputs include tracked files (dvc.lock, metrics/,
    reports/: :func:`mnistlab.config.pipeline_outputs`) that every stage rewrites, so a run
    made from a clean checkout after another stage had run would be called dirty. Untracked
    files never count.
    """
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        # only exclusions: git then looks at the whole work tree, as with no pathspec at all
        excluded = [f":(exclude){p}" for p in outputs]
        dirty = bool(run("status", "--porcelain", "--untracked-files=no",
                         *(["--", *excluded] if excluded else [])))
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}
