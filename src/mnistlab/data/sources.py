"""Where each dataset comes from: ``sources.<name>`` in params.yaml, resolved to a :class:`Source`.

Also the official facts a source may lean on: the torchvision datasets in the MNIST
file layout (their mirrors, ``.gz`` MD5s and class names) and the MD5s of their
decompressed files.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from mnistlab.config import RESERVED_CLASS_NAMES
from mnistlab.data.idx import FILES
from mnistlab.errors import MnistlabError, redact_text


# torchvision is imported on first use: it adds ~1 s to every process start, and
# only the download and split stages need it (train/evaluate/features read split files).
def _tvd():
    import torchvision.datasets

    return torchvision.datasets


EMBEDDED = ("sklearn_digits",)
DIGIT_CLASSES = tuple(str(i) for i in range(10))
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


URL_SCHEMES = ("http", "https", "ftp", "file")


def is_url(location: str) -> bool:
    """Whether a mirror is fetched (a URL) rather than read (a folder). Raises ValueError
    for a URL that does not parse (:func:`_check_url` names it)."""
    return urllib.parse.urlparse(location).scheme in URL_SCHEMES


def _check_url(key: str, mirror: str) -> None:
    """A mirror that looks like a URL must parse, and carry no user name, password or query.

    Why: torchvision's download (urllib) cannot send ``user:password@``; it fails with a
    misleading "host not found" or "nonnumeric port", whose text would carry the password
    into the error. A query (``?token=...``) cannot work either: each file's name is
    appended to the mirror, which would put it inside the query; and the token would be
    printed in every error and written to the download's manifest.
    """
    try:
        if not is_url(mirror):
            return  # a folder
        parts = urllib.parse.urlsplit(mirror)
        has_login = parts.username is not None or parts.password is not None
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        shown = redact_text(mirror).split("?")[0]
        raise MnistlabError(f"params.yaml: {key}: {shown!r} is not a valid URL ({e})") from None
    if has_login or parts.query or parts.fragment:
        what = ("a user name or password in a mirror URL is not supported (the download cannot "
                "send it)" if has_login else "a query or fragment (?... or #...) in a mirror URL is "
                "not supported (each file's name is appended to the URL)")
        raise MnistlabError(
            f"params.yaml: {key}: {parts.scheme}://{parts.hostname}{parts.path}: {what}; use a "
            "URL that needs none, or download the files to a folder and list that folder")


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
        # refused here, not after training, where the served model's metadata is written
        if reserved := [c for c in classes if c in RESERVED_CLASS_NAMES]:
            raise MnistlabError(f"params.yaml: {key}.classes: {', '.join(map(repr, reserved))} "
                                f"cannot name a class (the served model's answer has columns "
                                f"{' and '.join(RESERVED_CLASS_NAMES)} besides one per class)")

    if "mirrors" in spec:
        mirrors = spec["mirrors"]
        if isinstance(mirrors, str):
            mirrors = [mirrors]
    if not mirrors or not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise MnistlabError(f"params.yaml: {key}.mirrors must list at least one URL or folder")
    for mirror in mirrors:
        _check_url(f"{key}.mirrors", mirror)
    take = _take_spec(f"{key}.take", spec.get("take"))
    return Source(name, tuple(mirrors), md5, classes, sha256=pinned["sha256"],
                  content_md5=pinned["content_md5"], content_sha256=pinned["content_sha256"],
                  take=take)
