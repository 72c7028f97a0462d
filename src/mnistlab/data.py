"""Datasets: fetch, verify, parse and split the MNIST family into one raw format.

Every dataset ends up the same way on disk, so later stages never care where
it came from:

    data/raw/<name>/          the four IDX files under the official MNIST names,
                              uncompressed (``t10k-*`` may be absent: then the
                              split stage carves a test set out of train), the
                              ``.gz`` files as downloaded from a URL (kept so a
                              rerun can verify them without the network), and
                              manifest.json (where each file came from, its MD5).
                              With ``take`` in the source, the IDX files hold only
                              the first N train / M test samples, cut after the
                              full files were verified; the kept ``.gz`` files and
                              the manifest's digests stay those of the full files
    data/split/<name>/        train.pt, val.pt, test.pt  ({images: uint8 [N,28,28],
                              labels: int64 [N]}, loadable with weights_only=True)
                              and summary.json

Download, MD5 checks and IDX parsing are torchvision's (``download_url``,
``check_integrity``, ``read_image_file``/``read_label_file``); what we add is
what they lack for a pipeline: a timeout, retries with backoff, falling back
across mirrors, detecting a download cut short (Python's HTTP client does not),
an all-or-nothing output directory, and one-line errors that name the file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import torch

from mnistlab.errors import MnistlabError
from mnistlab.utils import atomic_path, file_sha256, torch_save, write_json

log = logging.getLogger(__name__)


# torchvision is imported on first use: it adds ~1 s to every process start, and
# only the download and split stages need it (train/evaluate/features read split files).
def _tvd():
    import torchvision.datasets

    return torchvision.datasets


def _tvm():
    import torchvision.datasets.mnist

    return torchvision.datasets.mnist


def _tvu():
    import torchvision.datasets.utils

    return torchvision.datasets.utils

IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}
FILES = [IMAGES["train"], LABELS["train"], IMAGES["test"], LABELS["test"]]
SIDE = 28  # every dataset is brought to MNIST's 28x28 uint8 layout
EMBEDDED = ("sklearn_digits",)
DIGIT_CLASSES = tuple(str(i) for i in range(10))
MANIFEST = "manifest.json"
# torchvision datasets that ship exactly the four official IDX files. Others that
# subclass MNIST (EMNIST, QMNIST) inherit MNIST's file list and MD5s but download
# something else, so ``issubclass(cls, MNIST)`` would silently pin the wrong MD5s.
TORCHVISION = ("MNIST", "FashionMNIST", "KMNIST")
SOURCE_KEYS = ("mirrors", "torchvision", "md5", "sha256", "classes", "content_md5", "content_sha256",
               "take")
# ``take`` keys: the official subsets a source may keep only the first samples of.
TAKE_KEYS = ("train", "test")
# Digests a source may pin per file: key in params.yaml → (name in messages, hex length).
DIGESTS = {"md5": ("an MD5", 32), "sha256": ("a SHA-256", 64)}
# Digests of a file's content (the uncompressed IDX bytes): key in params.yaml → the
# algorithm, as in DIGESTS. They hold whatever the compression, so an uncompressed or
# re-compressed copy of the official data verifies, and altered content never does.
CONTENT_DIGESTS = {"content_md5": "md5", "content_sha256": "sha256"}
# MD5s of the decompressed official files (torchvision pins only the .gz files, whose
# bytes change when a distributor re-compresses them, e.g. Debian's dataset-fashion-mnist).
OFFICIAL_CONTENT_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where one dataset comes from (``sources.<name>`` in params.yaml).

    ``md5`` maps a file name (``train-images-idx3-ubyte.gz``, or the uncompressed
    name for folders holding uncompressed files) to its MD5; ``sha256`` likewise,
    for files whose publisher gives a SHA-256 (both are checked when both are given).
    ``content_md5``/``content_sha256`` map an uncompressed name
    (``train-images-idx3-ubyte``) to the digest of the decompressed bytes: where one
    is given, the content must match it and the file as obtained need not match
    ``md5``/``sha256`` (an uncompressed or re-compressed copy of the same data).
    ``take`` maps ``train``/``test`` to how many samples to keep, the first ones
    in file order, once the full files are verified and validated (empty: all).
    """

    name: str
    mirrors: tuple[str, ...] = ()
    md5: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] = DIGIT_CLASSES
    embedded: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    content_md5: dict[str, str] = field(default_factory=dict)
    content_sha256: dict[str, str] = field(default_factory=dict)
    take: dict[str, int] = field(default_factory=dict)


def _take_spec(key: str, spec: Any) -> dict[str, int]:
    """Check ``sources.<name>.take`` (``key``): {train: N, test: M}, each optional, N, M >= 1."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise MnistlabError(f"params.yaml: {key} must map train and/or test to a sample count "
                            f"(e.g. {{train: 8000, test: 2000}}; got {spec!r})")
    unknown = sorted(set(spec) - set(TAKE_KEYS), key=str)
    if unknown:
        raise MnistlabError(f"params.yaml: {key}: unknown key(s) {', '.join(map(str, unknown))} "
                            f"(valid: {', '.join(TAKE_KEYS)})")
    for subset, n in spec.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MnistlabError(f"params.yaml: {key}.{subset} must be a positive integer (got {n!r})")
    return {s: spec[s] for s in TAKE_KEYS if s in spec}


def resolve_source(params: dict[str, Any], name: str) -> Source:
    """Build the :class:`Source` for dataset ``name`` from ``params['sources']``.

    Accepted forms: ``{embedded: sklearn_digits}``; a plain string (a folder or a
    base URL); or ``{mirrors: [...], torchvision: NAME, md5: {...}, sha256: {...},
    content_md5: {...}, content_sha256: {...}, classes: [...], take: {...}}`` where ``torchvision``
    (MNIST, FashionMNIST or KMNIST) supplies the official MD5s (of the ``.gz`` files
    and, for MNIST and FashionMNIST, of their content), class names and, unless
    ``mirrors`` is given, the mirrors. Digests given in ``spec`` override those per file.
    ``take: {train: N, test: M}`` (either optional) keeps only the first N/M samples.
    """
    sources = params.get("sources") or {}
    if not isinstance(sources, dict):
        raise MnistlabError("params.yaml: sources must be a mapping of dataset name to source")
    if name not in sources:
        raise MnistlabError(
            f"unknown dataset {name!r}: add it under 'sources' in params.yaml "
            f"(known: {', '.join(sorted(sources)) or 'none'})"
        )
    spec = sources[name]
    key = f"sources.{name}"
    if isinstance(spec, str):
        spec = {"mirrors": [spec]}
    if not isinstance(spec, dict):
        raise MnistlabError(f"params.yaml: {key} must be a path, a URL or a mapping")
    if "embedded" in spec:
        if set(spec) != {"embedded"}:
            raise MnistlabError(f"params.yaml: {key}: 'embedded' takes no other keys")
        if spec["embedded"] not in EMBEDDED:
            raise MnistlabError(
                f"params.yaml: {key}.embedded: unknown {spec['embedded']!r} (valid: {', '.join(EMBEDDED)})"
            )
        return Source(name, embedded=spec["embedded"])
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise MnistlabError(
            f"params.yaml: {key}: unknown key(s) {', '.join(map(str, unknown))} "
            f"(valid: {', '.join(SOURCE_KEYS)}, or embedded)"
        )

    md5: dict[str, str] = {}
    content_md5: dict[str, str] = {}
    classes = DIGIT_CLASSES
    mirrors: Any = None
    if "torchvision" in spec:
        if spec["torchvision"] not in TORCHVISION:
            raise MnistlabError(
                f"params.yaml: {key}.torchvision: {spec['torchvision']!r} is not a torchvision "
                f"dataset in the MNIST file layout (valid: {', '.join(TORCHVISION)})"
            )
        cls = getattr(_tvd(), spec["torchvision"])
        md5 = dict(cls.resources)
        content_md5 = dict(OFFICIAL_CONTENT_MD5.get(spec["torchvision"], {}))
        mirrors = list(cls.mirrors)
        if cls is not _tvd().MNIST:  # MNIST's names are "0 - zero"...; plain digits read better
            classes = tuple(cls.classes)

    known = set(FILES) | {f"{f}.gz" for f in FILES}
    pinned: dict[str, dict[str, str]] = {"md5": md5, "sha256": {},
                                         "content_md5": content_md5, "content_sha256": {}}
    for param in (*DIGESTS, *CONTENT_DIGESTS):
        shown, length = DIGESTS[CONTENT_DIGESTS.get(param, param)]
        content = param in CONTENT_DIGESTS
        extra = spec.get(param) or {}
        if not isinstance(extra, dict):
            raise MnistlabError(
                f"params.yaml: {key}.{param} must map "
                f"{'uncompressed ' if content else ''}file names to {shown.split()[1]}s"
            )
        for fname, digest in extra.items():
            if fname not in (FILES if content else known):
                valid = (f"the uncompressed official MNIST names: {', '.join(FILES)}" if content
                         else f"the official MNIST names, e.g. {FILES[0]}.gz or {FILES[0]}")
                raise MnistlabError(f"params.yaml: {key}.{param}: unknown file {fname!r} (valid: {valid})")
            if not (isinstance(digest, str) and re.fullmatch(f"[0-9a-fA-F]{{{length}}}", digest)):
                raise MnistlabError(f"params.yaml: {key}.{param}.{fname}: not {shown} (got {digest!r})")
            pinned[param][fname] = digest.lower()

    if spec.get("classes") is not None:
        cl = spec["classes"]
        if (not isinstance(cl, list) or not 2 <= len(cl) <= 256
                or len({str(c) for c in cl}) != len(cl)):
            raise MnistlabError(f"params.yaml: {key}.classes must list 2 to 256 distinct names")
        classes = tuple(str(c) for c in cl)

    if "mirrors" in spec:
        mirrors = spec["mirrors"]
        if isinstance(mirrors, str):
            mirrors = [mirrors]
    if not mirrors or not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise MnistlabError(f"params.yaml: {key}.mirrors must list at least one URL or folder")
    take = _take_spec(f"{key}.take", spec.get("take"))
    return Source(name, tuple(mirrors), md5, classes, sha256=pinned["sha256"],
                  content_md5=pinned["content_md5"], content_sha256=pinned["content_sha256"],
                  take=take)


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https", "ftp", "file")


# --------------------------------------------------------------------------- download


@dataclass(frozen=True)
class DownloadSettings:
    """``download`` in params.yaml: per-request timeout, attempts per mirror and file, backoff."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DownloadSettings:
        from mnistlab.config import non_negative, positive

        d = params.get("download") or {}
        if not isinstance(d, dict):
            raise MnistlabError("params.yaml: download must be a mapping")
        unknown = sorted(set(d) - {"timeout", "retries", "backoff"})
        if unknown:
            raise MnistlabError(
                f"params.yaml: download: unknown key(s) {', '.join(map(str, unknown))} "
                "(valid: timeout, retries, backoff)"
            )
        return cls(
            timeout=positive("download.timeout", d.get("timeout", cls.timeout)),
            retries=positive("download.retries", d.get("retries", cls.retries), int),
            backoff=non_negative("download.backoff", d.get("backoff", cls.backoff)),
        )


@dataclass(frozen=True)
class _Miss:
    """Why one mirror did not supply one file."""

    where: str
    problem: str
    absent: bool = False  # the mirror simply lacks the file (404, not in the folder)

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class _BadFile(Exception):
    """A fetched file is unusable; ``transient`` if a new attempt may fix it (cut short)."""

    def __init__(self, problem: str, transient: bool = False):
        super().__init__(problem)
        self.transient = transient


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's download_url calls urlopen without a timeout; the socket
    # default is the only knob that reaches it.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _extract(src: Path, dest: Path) -> None:
    """Write ``src`` to ``dest`` uncompressed (gzip detected by content, not by name).

    Raises :class:`_BadFile` for a ``.gz`` that is not gzip, a corrupt gzip, or
    one cut short (transient: the download may simply have been interrupted).
    """
    with open(src, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    if not is_gzip:
        if src.suffix == ".gz":
            raise _BadFile(f"named .gz but is not a gzip file ({src.stat().st_size} bytes)")
        shutil.copyfile(src, dest)
        return
    try:
        with gzip.open(src, "rb") as rf, open(dest, "wb") as wf:
            shutil.copyfileobj(rf, wf)
    except EOFError:
        dest.unlink(missing_ok=True)
        raise _BadFile(f"truncated gzip ({src.stat().st_size} bytes)", transient=True) from None
    except (OSError, zlib.error) as e:
        dest.unlink(missing_ok=True)
        raise _BadFile(f"corrupt gzip ({e})") from None


def _mismatch(path: Path, md5: str | None, sha256: str | None) -> str | None:
    """Why ``path`` fails its pinned digests (MD5 first, then SHA-256), or None if it passes."""
    if md5 and not _tvu().check_integrity(path, md5):
        return f"MD5 mismatch (expected {md5}, got {_tvu().calculate_md5(path)})"
    if sha256 and (got := file_sha256(path)) != sha256:
        return f"SHA-256 mismatch (expected {sha256}, got {got})"
    return None


def _verified(md5: str | None, sha256: str | None, otherwise: str) -> str:
    """The manifest's ``verified`` entry: which digests a file was checked against."""
    return "+".join(a for a, d in (("md5", md5), ("sha256", sha256)) if d) or otherwise


@dataclass(frozen=True)
class _Pins:
    """The digests pinned for one file: of the file as obtained, and of its content."""

    md5: str | None = None
    sha256: str | None = None
    content_md5: str | None = None
    content_sha256: str | None = None

    @classmethod
    def of(cls, source: Source, obtained: str, fname: str) -> _Pins:
        """``obtained``: the name of the file as obtained (``fname`` or ``fname.gz``)."""
        return cls(source.md5.get(obtained), source.sha256.get(obtained),
                   source.content_md5.get(fname), source.content_sha256.get(fname))

    @property
    def content(self) -> bool:
        return bool(self.content_md5 or self.content_sha256)

    def __bool__(self) -> bool:
        return bool(self.md5 or self.sha256 or self.content)


def _verify(obtained: Path, content: Path, pins: _Pins, otherwise: str, shown: str) -> str:
    """Check a file as obtained and as extracted (``content``) against ``pins``.

    With a content digest pinned, the content must match it and the file as
    obtained need not match its own digests (a re-compressed or uncompressed copy
    of the same data: only logged); otherwise the file as obtained must match.
    Returns the manifest's ``verified`` entry (``otherwise`` when nothing is
    pinned); raises :class:`_BadFile` (not transient) with the reason. ``shown``:
    what the log calls the file (its URL or path).
    """
    container_bad = _mismatch(obtained, pins.md5, pins.sha256)
    if not pins.content:
        if container_bad:
            raise _BadFile(container_bad)
        return _verified(pins.md5, pins.sha256, otherwise)
    if bad := _mismatch(content, pins.content_md5, pins.content_sha256):
        raise _BadFile(f"content {bad}")
    if container_bad:
        log.info("%s: differs from the official file (%s), but its content matches: a "
                 "re-compressed or uncompressed copy; accepted", shown, container_bad)
    checked = [] if container_bad else [a for a, d in (("md5", pins.md5), ("sha256", pins.sha256)) if d]
    checked += [f"content-{a}" for a, d in (("md5", pins.content_md5), ("sha256", pins.content_sha256)) if d]
    return "+".join(checked)


def _download(url: str, gz: Path, dest: Path, pins: _Pins, settings: DownloadSettings) -> str | _Miss:
    """Download ``url`` to ``gz``, extract it to ``dest`` and verify it (:func:`_verify`).

    Returns the manifest's ``verified`` entry, or why not. Retries (with backoff)
    what may be transient: timeouts, dropped connections, 5xx, a file cut short.
    Goes straight to the next mirror on what is not: 4xx, unknown host, a complete
    file with the wrong digest.
    """
    problem = "not attempted"
    for attempt in range(1, settings.retries + 1):
        # download_url skips the download when the file exists and md5 is None.
        gz.unlink(missing_ok=True)
        try:
            with _socket_timeout(settings.timeout):
                _tvu().download_url(url, str(gz.parent), filename=gz.name, md5=None)
            _extract(gz, dest)
            return _verify(gz, dest, pins, "gzip only", url)
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                return _Miss(url, problem, absent=e.code in (404, 410))
        except urllib.error.URLError as e:
            kind = type(e.reason).__name__ if isinstance(e.reason, BaseException) else "URLError"
            problem = f"{kind}: {' '.join(str(e.reason).split())}"
            if isinstance(e.reason, socket.gaierror) and e.reason.errno == socket.EAI_NONAME:
                return _Miss(url, f"host not found ({problem})")
        except (OSError, HTTPException, RuntimeError) as e:
            problem = f"{type(e).__name__}: {' '.join(str(e).split()) or 'connection failed'}"
        except _BadFile as e:
            if not e.transient:
                return _Miss(url, str(e))
            problem = str(e)
        if attempt < settings.retries:
            delay = settings.backoff * 2 ** (attempt - 1)
            log.warning("%s: %s (attempt %d/%d); retrying in %.1fs",
                        url, problem, attempt, settings.retries, delay)
            time.sleep(delay)
    return _Miss(url, f"{problem} (after {settings.retries} attempts)")


def _from_folder(folder: Path, fname: str, source: Source, dest: Path) -> tuple[str, str] | _Miss:
    """Extract ``fname`` (gzipped or not) from a local folder into ``dest``, verified.

    Returns (the file used, the manifest's ``verified`` entry) or a miss.
    """
    if not folder.is_dir():
        return _Miss(str(folder), "folder not found", absent=True)
    local = next((c for c in (folder / f"{fname}.gz", folder / fname) if c.is_file()), None)
    if local is None:
        return _Miss(str(folder), f"no {fname}.gz or {fname}", absent=True)
    pins = _Pins.of(source, local.name, fname)
    if not pins and (source.md5 or source.sha256 or source.content_md5 or source.content_sha256):
        log.warning("%s: no MD5 or SHA-256 known for this name; not verified", local)
    try:
        _extract(local, dest)
        return str(local), _verify(local, dest, pins, "no md5 given", str(local))
    except _BadFile as e:
        dest.unlink(missing_ok=True)
        # Without a content digest, a wrong digest is the reason given, even when the
        # file cannot be extracted either (it was checked before extracting, as ever).
        bad = None if pins.content else _mismatch(local, pins.md5, pins.sha256)
        return _Miss(str(local), bad or str(e))


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _reuse(out: Path, stage: Path, fname: str, pins: _Pins, urls: list[str],
           previous: dict[str, Any]) -> dict[str, Any] | None:
    """Reuse a verified copy of ``fname``'s ``.gz`` already in ``out``: copy and extract
    it into ``stage``; return its manifest entry, or None (nothing left in ``stage``).

    Verified means: passes :func:`_verify` against ``pins``; or, with nothing pinned,
    matches the MD5 recorded when it was downloaded from a URL that is still a mirror.
    """
    gz = f"{fname}.gz"
    path = out / gz
    if not path.is_file():
        return None
    entry = previous.get(fname) or {}
    if not isinstance(entry, dict):
        return None
    if not pins and not (entry.get("from") in urls and entry.get("md5")
                         and _tvu().check_integrity(path, entry["md5"])):
        return None
    shutil.copyfile(path, stage / gz)
    try:
        _extract(stage / gz, stage / fname)
        verified = _verify(stage / gz, stage / fname, pins, "gzip only", str(path))
    except _BadFile as e:  # changed, or verified by MD5 yet unreadable: fetch it again
        log.info("%s: %s; fetching it again", path, e)
        (stage / gz).unlink(missing_ok=True)
        (stage / fname).unlink(missing_ok=True)
        return None
    return {"from": entry.get("from", "earlier download"), "md5": _tvu().calculate_md5(stage / gz),
            "verified": verified}


def _fetch_files(source: Source, out: Path, stage: Path, settings: DownloadSettings
                 ) -> dict[str, dict[str, Any]]:
    """Bring ``source``'s files into the empty folder ``stage``.

    Returns the manifest: for each IDX file written, where it came from and the
    MD5 of what was fetched (the ``.gz`` for URLs, which is kept beside it).
    """
    previous = _read_manifest(out)
    manifest: dict[str, dict[str, Any]] = {}
    for fname in FILES:
        gz = f"{fname}.gz"
        pins = _Pins.of(source, gz, fname)
        # The test pair is optional (the split then carves one), unless a digest
        # pins it: an official dataset must come with its official test set.
        optional = fname.startswith("t10k") and not any(
            n in pinned for n in (gz, fname)
            for pinned in (source.md5, source.sha256, source.content_md5, source.content_sha256))
        urls = [m.rstrip("/") + "/" + gz for m in source.mirrors if _is_url(m)]

        reused = _reuse(out, stage, fname, pins, urls, previous)
        if reused is not None:
            log.info("%s: %s already present and verified; not fetched", source.name, gz)
            manifest[fname] = reused
            continue

        misses: list[_Miss] = []
        for mirror in source.mirrors:
            if _is_url(mirror):
                url = mirror.rstrip("/") + "/" + gz
                got = _download(url, stage / gz, stage / fname, pins, settings)
                if not isinstance(got, _Miss):
                    manifest[fname] = {"from": url, "md5": _tvu().calculate_md5(stage / gz),
                                       "verified": got}
                    break
            else:
                got = _from_folder(Path(mirror).expanduser(), fname, source, stage / fname)
                if not isinstance(got, _Miss):
                    local, verified = got
                    manifest[fname] = {"from": local, "md5": _tvu().calculate_md5(Path(local)),
                                       "verified": verified}
                    break
            misses.append(got)
            (stage / gz).unlink(missing_ok=True)
            (stage / fname).unlink(missing_ok=True)
        else:
            if optional and all(m.absent for m in misses):
                log.info("%s: no %s in any mirror; the split will carve a test set",
                         source.name, fname)
                continue
            raise MnistlabError(_not_found_message(source, gz, misses))
        log.info("%s: got %s", source.name, fname)

    have = {f for f in FILES if (stage / f).is_file()}
    if (IMAGES["test"] in have) != (LABELS["test"] in have):
        one, other = ((IMAGES["test"], LABELS["test"]) if IMAGES["test"] in have
                      else (LABELS["test"], IMAGES["test"]))
        raise MnistlabError(
            f"dataset {source.name!r}: found {one} but not {other} in {', '.join(source.mirrors)} "
            "(the test images and labels must come together)"
        )
    return manifest


def _not_found_message(source: Source, gz: str, misses: list[_Miss]) -> str:
    msg = (f"dataset {source.name!r}: could not get {gz} from any mirror "
           f"(tried: {'; '.join(map(str, misses))})")
    if any(_is_url(m) for m in source.mirrors):
        msg += (f". Offline? Put the four MNIST files ({', '.join(f'{f}.gz' for f in FILES)}, "
                f"gzipped or not) in a folder and list it first: "
                f"sources.{source.name}.mirrors: [/that/folder] in params.yaml")
    return msg


def fetch(source: Source, out: str | os.PathLike, settings: DownloadSettings) -> dict[str, int]:
    """Bring ``source``'s files into ``out`` (uncompressed IDX), validate them; return counts.

    All or nothing: everything is fetched and validated in a staging folder that
    then replaces ``out``, so a failure leaves an earlier ``out`` untouched, and a
    success leaves no stale file behind (dvc.yaml marks ``out`` ``persist`` so that
    verified files survive a rerun: they are reused without any network access).
    With ``source.take``, the full files are verified and validated first, then cut
    to their first samples (:func:`_take`); the counts returned are those kept.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.*.partial"):  # from a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    stage.chmod(out.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would become out's mode
    try:
        if source.embedded:
            write_digits(stage)
            manifest: dict[str, Any] = {"embedded": source.embedded}
            shown = {f: f"{source.embedded}:{f}" for f in FILES}
        else:
            manifest = _fetch_files(source, out, stage, settings)
            shown = {f: entry["from"] for f, entry in manifest.items()}
        counts = validate_raw(stage, len(source.classes), shown)
        record: dict[str, Any] = {"dataset": source.name, "files": manifest}
        if source.take:
            counts = _take(stage, source, counts, shown)
            record["take"] = dict(source.take)
        write_json(stage / MANIFEST, record)
        _replace_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return counts


def _take(stage: Path, source: Source, counts: dict[str, int], shown: dict[str, str]
          ) -> dict[str, int]:
    """Cut the validated IDX pairs in ``stage`` to their first ``source.take`` samples.

    ``counts``: the full files' sample counts (from :func:`validate_raw`). Only the
    uncompressed IDX files are rewritten; a kept ``.gz`` stays the full, verified
    file, so a rerun reuses it and cuts again. Returns the counts kept.
    """
    for subset, n in source.take.items():
        key = f"params.yaml: sources.{source.name}.take.{subset}"
        if subset not in counts:
            raise MnistlabError(f"{key}: asks for {n} samples, but dataset {source.name!r} has no "
                                f"{subset} set ({IMAGES[subset]} not found in any mirror)")
        if n > counts[subset]:
            raise MnistlabError(f"{key}: asks for {n} samples, but {shown.get(IMAGES[subset], IMAGES[subset])} "
                                f"holds only {counts[subset]}")
        if n == counts[subset]:
            continue
        images, labels = read_pair(stage, subset, len(source.classes), shown)
        write_idx(stage / IMAGES[subset], images[:n])
        write_idx(stage / LABELS[subset], labels[:n])
        log.info("%s: kept the first %d of %d %s samples (take)", source.name, n, counts[subset], subset)
    return validate_raw(stage, len(source.classes), shown)


def _replace_dir(new: Path, out: Path) -> None:
    """Put folder ``new`` where ``out`` is (two renames; ``out`` is never half-written)."""
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        os.replace(out, old / "old")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


# --------------------------------------------------------------------------- IDX parsing


def _check_idx_header(path: Path, want_ndim: int, shown: str) -> list[int]:
    """Check an uncompressed IDX file's header and length before torchvision parses it.

    torchvision's reader asserts (bare AssertionError) or mis-shapes on bad
    input; we want a sentence naming the file (``shown``) and the problem.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * want_ndim)
    kind = "images" if want_ndim == 3 else "labels"
    if len(head) < 4:
        raise MnistlabError(f"{shown}: truncated IDX file ({size} bytes)")
    if head[0:2] != b"\x00\x00":
        raise MnistlabError(f"{shown}: not an IDX file (bad magic 0x{head[:4].hex()})")
    if head[2] != 0x08:
        raise MnistlabError(f"{shown}: IDX dtype 0x{head[2]:02x} is not unsigned byte (0x08)")
    if head[3] != want_ndim:
        raise MnistlabError(f"{shown}: {head[3]}-d IDX where {kind} need {want_ndim}-d")
    if len(head) < 4 + 4 * want_ndim:
        raise MnistlabError(f"{shown}: truncated IDX header ({size} bytes)")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim)]
    if want_ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise MnistlabError(f"{shown}: images are {dims[1]}x{dims[2]}, expected {SIDE}x{SIDE}")
    expected = len(head) + math.prod(dims)
    if size < expected:
        raise MnistlabError(
            f"{shown}: truncated IDX file ({size} bytes, the header's {dims[0]} {kind} need {expected})"
        )
    if size > expected:
        raise MnistlabError(f"{shown}: {size - expected} trailing bytes after the IDX data")
    if dims[0] == 0:
        raise MnistlabError(f"{shown}: no samples")
    return dims


def read_pair(raw: Path, subset: str, num_classes: int, shown: dict[str, str] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse and validate one (images, labels) pair: uint8 [N,28,28], int64 [N].

    ``shown`` maps a file name to what error messages call it (its origin);
    by default its path in ``raw``.
    """
    raw = Path(raw)
    ipath, lpath = raw / IMAGES[subset], raw / LABELS[subset]
    name = {p: (shown or {}).get(p.name, str(p)) for p in (ipath, lpath)}
    for p in (ipath, lpath):
        if not p.is_file():
            raise MnistlabError(f"{p}: file not found (run the download stage first)")
    _check_idx_header(ipath, 3, name[ipath])
    _check_idx_header(lpath, 1, name[lpath])
    images = _tvm().read_image_file(str(ipath))
    labels = _tvm().read_label_file(str(lpath)).long()
    if len(images) != len(labels):
        raise MnistlabError(
            f"{name[ipath]}: {len(images)} images but {name[lpath]} has {len(labels)} labels"
        )
    bad = labels >= num_classes
    if bad.any():
        raise MnistlabError(
            f"{name[lpath]}: label {int(labels[bad][0])} out of range 0..{num_classes - 1} "
            f"({int(bad.sum())} such labels)"
        )
    return images, labels


def validate_raw(raw: Path, num_classes: int, shown: dict[str, str] | None = None
                 ) -> dict[str, int]:
    """Parse every pair present in ``raw``; return sample counts per official subset."""
    raw = Path(raw)
    counts = {"train": len(read_pair(raw, "train", num_classes, shown)[1])}
    if (raw / IMAGES["test"]).is_file() or (raw / LABELS["test"]).is_file():
        counts["test"] = len(read_pair(raw, "test", num_classes, shown)[1])
    return counts


# --------------------------------------------------------------------------- embedded digits


def digits_as_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 UCI digits in MNIST's layout.

    8x8 values 0..16 → 0..255, resized (bilinear) into a 20x20 box centred in a
    28x28 canvas, as MNIST's digits are. Shapes: [1797,28,28] uint8, [1797] int64.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # [N,1,8,8] in 0..1
    box = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", antialias=True,
                                          align_corners=False)  # [N,1,20,20]
    canvas = torch.zeros(len(x), 1, SIDE, SIDE)
    canvas[:, :, 4:24, 4:24] = box.clamp(0, 1)
    images = (canvas.squeeze(1) * 255).round().to(torch.uint8)  # [N,28,28]
    return images, torch.from_numpy(d.target).long()


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a tensor as an unsigned-byte IDX file (atomically)."""
    a = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, a.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + a.numpy().tobytes())


def write_digits(out: Path) -> list[str]:
    """The embedded dataset has no official test set: write the train pair only."""
    images, labels = digits_as_mnist()
    write_idx(out / IMAGES["train"], images)
    write_idx(out / LABELS["train"], labels)
    return [IMAGES["train"], LABELS["train"]]


# --------------------------------------------------------------------------- split


def _carve(labels: torch.Tensor, amount: float | int, seed: int, what: str, dataset: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (keep, carved) index split of ``labels``; sklearn does the stratifying."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if present.min() < 2:
        cls = int(torch.nonzero(counts == present.min())[0])
        raise MnistlabError(
            f"dataset {dataset!r}: class {cls} has only {int(present.min())} sample(s); "
            f"cannot carve a stratified {what} set"
        )
    try:
        keep, carved = train_test_split(torch.arange(len(labels)).numpy(), test_size=amount,
                                        stratify=labels.numpy(), random_state=seed, shuffle=True)
    except ValueError as e:
        raise MnistlabError(f"dataset {dataset!r}: cannot carve the {what} set: {e}") from None
    # Sorted indices: each subset keeps the raw files' order (training shuffles anyway).
    return torch.from_numpy(keep).sort().values, torch.from_numpy(carved).sort().values


def _amount(key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, float) and not 0 < value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count (got {value!r})")
    if isinstance(value, int) and value < 1:
        raise MnistlabError(f"params.yaml: {key} must be a fraction in (0, 1) or a count >= 1 (got {value!r})")
    return value


def split(raw: Path, out: Path, classes: list[str], val: Any, test: Any, seed: int,
          dataset: str) -> dict[str, Any]:
    """Split ``raw`` into train/val/test tensor files under ``out``; return the summary.

    The official test set stays the test set; without one, a stratified test set
    is carved from train first, then validation from the rest. Same seed, same
    bytes. Nothing is written unless every check passes.
    """
    raw, out = Path(raw), Path(out)
    val = _amount("split.val_fraction", val)
    test = _amount("split.test_fraction", test)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise MnistlabError(f"params.yaml: seed must be an integer in [0, 2**32) (got {seed!r})")
    n_cls = len(classes)
    images, labels = read_pair(raw, "train", n_cls)
    if (raw / IMAGES["test"]).is_file() or (raw / LABELS["test"]).is_file():
        test_images, test_labels = read_pair(raw, "test", n_cls)
        test_from = "official"
    else:
        keep, carved = _carve(labels, test, seed, "test", dataset)
        test_images, test_labels = images[carved], labels[carved]
        images, labels = images[keep], labels[keep]
        test_from = "carved from train"
    keep, carved = _carve(labels, val, seed, "validation", dataset)
    subsets = {
        "train": (images[keep], labels[keep]),
        "val": (images[carved], labels[carved]),
        "test": (test_images, test_labels),
    }
    summary: dict[str, Any] = {"classes": list(classes), "test_source": test_from}
    for name, (_, y) in subsets.items():
        per_class = torch.bincount(y, minlength=n_cls)
        if name == "train" and (per_class == 0).any():
            missing = [classes[i] for i in torch.nonzero(per_class == 0).flatten().tolist()]
            raise MnistlabError(f"dataset {dataset!r}: no training samples of class(es) {missing}")
        summary[name] = {"count": len(y), "per_class": per_class.tolist()}
    for name, (x, y) in subsets.items():
        # clone: an indexed view's storage would otherwise be saved whole
        torch_save({"images": x.clone().contiguous(), "labels": y.clone()}, out / f"{name}.pt")
    write_json(out / "summary.json", summary)
    return summary


def load_split(split_dir: Path, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one subset written by :func:`split` (weights_only, validated shapes)."""
    from mnistlab.utils import torch_load

    path = Path(split_dir) / f"{subset}.pt"
    obj = torch_load(path)
    if not (isinstance(obj, dict) and {"images", "labels"} <= set(obj)):
        raise MnistlabError(f"{path}: not a split file (needs images, labels)")
    x, y = obj["images"], obj["labels"]
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            and x.dtype == torch.uint8 and x.dim() == 3 and tuple(x.shape[1:]) == (SIDE, SIDE)
            and y.dtype == torch.int64 and y.shape == (len(x),)):
        raise MnistlabError(f"{path}: expected uint8 images [N,{SIDE},{SIDE}] and int64 labels [N]")
    return x, y


def load_classes(split_dir: Path) -> list[str]:
    """Class names recorded by the split stage in ``summary.json``."""
    try:
        return json.loads((Path(split_dir) / "summary.json").read_text())["classes"]
    except (OSError, ValueError, KeyError):
        raise MnistlabError(f"{Path(split_dir) / 'summary.json'}: missing or invalid (run the split stage)") from None
