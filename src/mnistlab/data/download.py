"""The download stage's work: bring a source's files into ``data/raw/<name>``, verified.

Download and MD5 checks are torchvision's (``download_url``, ``check_integrity``);
what we add is what they lack for a pipeline: a timeout, retries with backoff,
falling back across mirrors, detecting a download cut short (Python's HTTP client
does not), an all-or-nothing output directory, and one-line errors that name the file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from mnistlab.config import DownloadSettings, local_path
from mnistlab.data.digits import write_digits
from mnistlab.data.idx import FILES, IMAGES, LABELS, read_pair, validate_raw, write_idx
from mnistlab.data.sources import Source, is_url
from mnistlab.errors import MnistlabError
from mnistlab.utils import file_sha256, write_json

log = logging.getLogger(__name__)


# torchvision is imported on first use: it adds ~1 s to every process start, and
# only the download and split stages need it (train/evaluate/features read split files).
def _tvu():
    import torchvision.datasets.utils

    return torchvision.datasets.utils


MANIFEST = "manifest.json"


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


# The manifest's ``verified`` entry of a file no digest was pinned for: from a folder, and from a
# URL or a kept download (where only gzip's own CRC checked it).
FOLDER_UNPINNED, URL_UNPINNED = "no md5 given", "gzip only"
UNPINNED = (FOLDER_UNPINNED, URL_UNPINNED)


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
            return _verify(gz, dest, pins, URL_UNPINNED, url)
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
    try:
        _extract(local, dest)
        return str(local), _verify(local, dest, pins, FOLDER_UNPINNED, str(local))
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
        verified = _verify(stage / gz, stage / fname, pins, URL_UNPINNED, str(path))
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
        urls = [m.rstrip("/") + "/" + gz for m in source.mirrors if is_url(m)]

        reused = _reuse(out, stage, fname, pins, urls, previous)
        if reused is not None:
            log.info("%s: %s already present and verified; not fetched", source.name, gz)
            manifest[fname] = reused
            continue

        misses: list[_Miss] = []
        for mirror in source.mirrors:
            if is_url(mirror):
                url = mirror.rstrip("/") + "/" + gz
                got = _download(url, stage / gz, stage / fname, pins, settings)
                if not isinstance(got, _Miss):
                    manifest[fname] = {"from": url, "md5": _tvu().calculate_md5(stage / gz),
                                       "verified": got}
                    break
            else:
                got = _from_folder(local_path(mirror), fname, source, stage / fname)
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
    if any(is_url(m) for m in source.mirrors):
        msg += (f". Offline? Put the four MNIST files ({', '.join(f'{f}.gz' for f in FILES)}, "
                f"gzipped or not) in a folder and list it first: "
                f"sources.{source.name}.mirrors: [/that/folder] in params.yaml")
    return msg


def unverified(out: str | os.PathLike) -> list[str]:
    """The files of a fetched dataset (``out``'s manifest) that no pinned digest checked."""
    try:
        files = json.loads((Path(out) / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError):
        return []
    return sorted(f for f, e in files.items() if isinstance(e, dict) and e.get("verified") in UNPINNED)


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
            for entry in manifest.values():
                if entry["verified"] in UNPINNED:
                    log.warning("%s: no MD5 or SHA-256 pinned for it (sources.%s); used as it is, "
                                "not verified", entry["from"], source.name)
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

