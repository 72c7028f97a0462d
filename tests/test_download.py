"""Downloads through a real HTTP server on 127.0.0.1: mirrors, retries, MD5s, no-network reruns.

The server is ``http.server.ThreadingHTTPServer`` bound to 127.0.0.1 on a free
port, in a thread the fixture shuts down. It serves gzipped IDX files the test
makes, under one path prefix per "mirror", and can misbehave on request
(404, 500, a connection dropped mid-file, a stall); it records every request.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers.checks import assert_one_line_error
from helpers.data import (
    dataset_files,
    gz,
    idx_bytes,
    make_pair,
    manifest_verified,
    md5,
    official_spec,
    regz,
    tree_digest,
    write_folder,
)
from helpers.http import FAST, Mirrors
from helpers.repo import run_stage

from mnistlab.config import DownloadSettings
from mnistlab.data.download import MANIFEST, fetch
from mnistlab.data.idx import IMAGES, LABELS, read_pair
from mnistlab.data.sources import Source, resolve_source
from mnistlab.errors import MnistlabError


def url_source(*urls: str, md5s: dict[str, str] | None = None, name: str = "web") -> Source:
    spec: dict = {"mirrors": list(urls)}
    if md5s:
        spec["md5"] = md5s
    return resolve_source({"sources": {name: spec}}, name)


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def requests_per_attempt(m: Mirrors, tmp_path: Path) -> int:
    """GETs one clean download makes (torchvision probes for redirects with a GET first)."""
    m.publish("probe", dataset_files(test=False))
    fetch(url_source(m.url("probe")), tmp_path / "probe", FAST)
    per_file = Counter(r for r in m.requests if "/train-" in r)  # the t10k files 404 here
    assert len(set(per_file.values())) == 1
    m.requests.clear()
    return next(iter(per_file.values()))


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("with_md5", [True, False])
def test_download_success(mirrors: Mirrors, tmp_path: Path, with_md5: bool):
    files = dataset_files()
    served = mirrors.publish("m1", files)
    out = tmp_path / "raw"
    source = url_source(mirrors.url("m1"), md5s={k: md5(v) for k, v in served.items()} if with_md5 else None)
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
        assert (out / f"{name}.gz").read_bytes() == served[f"{name}.gz"]  # kept for offline reruns
    assert sorted(set(mirrors.requests)) == sorted(f"/m1/{n}" for n in served)
    manifest = (out / MANIFEST).read_text()
    assert mirrors.url("m1") + "train-images-idx3-ubyte.gz" in manifest
    assert ('"verified": "md5"' in manifest) == with_md5


def test_url_without_a_test_pair(mirrors: Mirrors, tmp_path: Path):
    """A 404 for the optional t10k files is fine: the split stage carves a test set."""
    mirrors.publish("m1", dataset_files(test=False))
    assert fetch(url_source(mirrors.url("m1")), tmp_path / "raw", FAST) == {"train": 60}


# --------------------------------------------------------------------------- mirror fallback


def test_404_goes_to_the_next_mirror_without_retrying(mirrors: Mirrors, tmp_path: Path):
    per_attempt = requests_per_attempt(mirrors, tmp_path)
    served = mirrors.publish("m2", dataset_files())
    source = url_source(mirrors.url("m1"), mirrors.url("m2"), md5s={k: md5(v) for k, v in served.items()})
    assert fetch(source, tmp_path / "raw", FAST) == {"train": 60, "test": 20}
    # m1 has nothing: exactly one request per file (a 404 is not retried), then m2
    assert Counter(r for r in mirrors.requests if r.startswith("/m1/")) == {f"/m1/{n}": 1 for n in served}
    assert mirrors.count("/m2/") == 4 * per_attempt


def test_corrupt_file_goes_to_the_next_mirror(mirrors: Mirrors, tmp_path: Path, caplog):
    per_attempt = requests_per_attempt(mirrors, tmp_path)
    good = mirrors.publish("m2", dataset_files())
    bad_files = dataset_files()
    bad_files[LABELS["train"]] = idx_bytes((torch.arange(60) + 1) % 10)  # valid, wrong
    mirrors.publish("m1", bad_files)
    source = url_source(mirrors.url("m1"), mirrors.url("m2"), md5s={k: md5(v) for k, v in good.items()})
    out = tmp_path / "raw"
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert (out / "train-labels-idx1-ubyte.gz").read_bytes() == good["train-labels-idx1-ubyte.gz"]
    # a complete file with the wrong MD5 will not improve on retry: one attempt, then m2
    assert mirrors.requests.count("/m1/train-labels-idx1-ubyte.gz") == per_attempt
    assert mirrors.requests.count("/m2/train-labels-idx1-ubyte.gz") == per_attempt
    assert mirrors.count("/m2/") == per_attempt  # the other files came from m1


def test_corrupt_file_and_no_mirror_left(mirrors: Mirrors, tmp_path: Path):
    good = dataset_files()
    want = md5(gz(good[IMAGES["train"]]))
    good[IMAGES["train"]] = idx_bytes(torch.zeros(60, 28, 28))
    served = mirrors.publish("m1", good)
    source = url_source(mirrors.url("m1"), md5s={"train-images-idx3-ubyte.gz": want})
    with pytest.raises(MnistlabError) as e:
        fetch(source, tmp_path / "raw", FAST)
    got = md5(served["train-images-idx3-ubyte.gz"])
    assert str(e.value) == (
        f"dataset 'web': could not get train-images-idx3-ubyte.gz from any mirror (tried: "
        f"{mirrors.url('m1')}train-images-idx3-ubyte.gz: MD5 mismatch (expected {want}, got {got})). "
        "Offline? Put the four MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, gzipped or not) in a folder and list "
        "it first: sources.web.mirrors: [/that/folder] in params.yaml"
    )
    assert not (tmp_path / "raw").exists()


def test_html_page_instead_of_gzip_goes_to_the_next_mirror(mirrors: Mirrors, tmp_path: Path):
    mirrors.publish("m2", dataset_files())
    mirrors.files["/m1/train-images-idx3-ubyte.gz"] = b"<html>captive portal</html>"
    source = url_source(mirrors.url("m1"), mirrors.url("m2"))
    assert fetch(source, tmp_path / "raw", FAST) == {"train": 60, "test": 20}
    assert mirrors.requests.count("/m2/train-images-idx3-ubyte.gz") >= 1


# --------------------------------------------------------------------------- retries


def test_dropped_connection_is_retried(mirrors: Mirrors, tmp_path: Path, caplog):
    per_attempt = requests_per_attempt(mirrors, tmp_path)
    mirrors.publish("m1", dataset_files())
    path = "/m1/train-images-idx3-ubyte.gz"
    # every request of the first attempt is cut short after half the body
    mirrors.faults[path] = lambda seen: "drop" if seen < per_attempt else None
    with caplog.at_level(logging.WARNING, logger="mnistlab.data.download"):
        assert fetch(url_source(mirrors.url("m1")), tmp_path / "raw", FAST) == {"train": 60, "test": 20}
    assert mirrors.requests.count(path) == 2 * per_attempt  # one failed attempt, one good
    assert "train-images-idx3-ubyte.gz: truncated gzip" in caplog.text
    assert "(attempt 1/3); retrying" in caplog.text


def test_dropped_connection_every_time_gives_up(mirrors: Mirrors, tmp_path: Path):
    mirrors.publish("m1", dataset_files())
    mirrors.faults["/m1/train-images-idx3-ubyte.gz"] = lambda seen: "drop"
    settings = DownloadSettings(timeout=5, retries=2, backoff=0)
    with pytest.raises(MnistlabError, match=r"train-images-idx3-ubyte.gz: truncated gzip \(\d+ bytes\) \(after 2 attempts\)"):
        fetch(url_source(mirrors.url("m1")), tmp_path / "raw", settings)


def test_server_error_is_retried_with_backoff(mirrors: Mirrors, tmp_path: Path, caplog):
    mirrors.publish("m1", dataset_files())
    path = "/m1/train-labels-idx1-ubyte.gz"
    mirrors.faults[path] = lambda seen: "500" if seen < 2 else None
    settings = DownloadSettings(timeout=5, retries=3, backoff=0.05)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="mnistlab.data.download"):
        fetch(url_source(mirrors.url("m1")), tmp_path / "raw", settings)
    assert time.perf_counter() - t0 >= 0.05 + 0.1  # slept backoff, then twice the backoff
    assert "HTTP 500 (attempt 1/3); retrying in 0.1s" in caplog.text or "HTTP 500 (attempt 1/3)" in caplog.text
    assert "HTTP 500 (attempt 2/3)" in caplog.text


def test_stalled_server_times_out(mirrors: Mirrors, tmp_path: Path):
    mirrors.publish("m1", dataset_files())
    mirrors.faults["/m1/train-images-idx3-ubyte.gz"] = lambda seen: "stall"
    settings = DownloadSettings(timeout=0.3, retries=1, backoff=0)
    t0 = time.perf_counter()
    with pytest.raises(MnistlabError, match=r"train-images-idx3-ubyte.gz: \w*(Timeout|timed out)"):
        fetch(url_source(mirrors.url("m1")), tmp_path / "raw", settings)
    assert time.perf_counter() - t0 < 1.4  # gave up before the server's 1.5 s stall ended


# --------------------------------------------------------------------------- no network when present


@pytest.mark.parametrize("with_md5", [True, False])
def test_present_and_verified_makes_no_request(mirrors: Mirrors, tmp_path: Path, with_md5: bool):
    served = mirrors.publish("m1", dataset_files())
    source = url_source(mirrors.url("m1"), md5s={k: md5(v) for k, v in served.items()} if with_md5 else None)
    out = tmp_path / "raw"
    fetch(source, out, FAST)
    before = tree_digest(out)
    mirrors.requests.clear()
    mirrors.server.shutdown()  # belt and braces: any request would now fail
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert mirrors.requests == []
    assert tree_digest(out) == before


def test_present_but_changed_is_fetched_again(mirrors: Mirrors, tmp_path: Path):
    served = mirrors.publish("m1", dataset_files())
    source = url_source(mirrors.url("m1"), md5s={k: md5(v) for k, v in served.items()})
    out = tmp_path / "raw"
    fetch(source, out, FAST)
    (out / "train-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    mirrors.requests.clear()
    fetch(source, out, FAST)
    assert {r.rsplit("/", 1)[1] for r in mirrors.requests} == {"train-labels-idx1-ubyte.gz"}
    assert (out / "train-labels-idx1-ubyte.gz").read_bytes() == served["train-labels-idx1-ubyte.gz"]


def test_no_md5_and_a_new_mirror_list_fetches_again(mirrors: Mirrors, tmp_path: Path):
    """Without MD5s, 'verified' means: the MD5 recorded when it came from a URL still listed."""
    mirrors.publish("m1", dataset_files())
    mirrors.publish("m2", dataset_files(seed=5))
    out = tmp_path / "raw"
    fetch(url_source(mirrors.url("m1")), out, FAST)
    mirrors.requests.clear()
    fetch(url_source(mirrors.url("m2")), out, FAST)
    assert mirrors.count("/m2/") > 0 and mirrors.count("/m1/") == 0
    assert (out / IMAGES["train"]).read_bytes() == dataset_files(seed=5)[IMAGES["train"]]


# --------------------------------------------------------------------------- content digests


def content_source(*mirrors: str, files: dict[str, bytes]) -> Source:
    """Pinned as an official dataset: .gz MD5s (of :func:`gz`'s bytes) and content MD5s."""
    return resolve_source({"sources": {"web": {"mirrors": list(mirrors), **official_spec(files)}}}, "web")


def publish_recompressed(m: Mirrors, mirror: str, files: dict[str, bytes]) -> dict[str, bytes]:
    served = {f"{name}.gz": regz(blob) for name, blob in files.items()}
    for name, blob in served.items():
        m.files[f"/{mirror}/{name}"] = blob
    return served


def test_recompressed_download_verifies_by_content_and_is_reused(mirrors: Mirrors, tmp_path: Path, caplog):
    files = dataset_files()
    served = publish_recompressed(mirrors, "m1", files)
    source = content_source(mirrors.url("m1"), files=files)
    out = tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger="mnistlab.data.download"):
        assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert manifest_verified(out) == {"content-md5"}
    url = mirrors.url("m1") + "train-images-idx3-ubyte.gz"
    assert f"{url}: differs from the official file (MD5 mismatch (expected " \
           f"{md5(gz(files[IMAGES['train']]))}, got {md5(served['train-images-idx3-ubyte.gz'])})" in caplog.text
    for name, blob in files.items():
        assert (out / name).read_bytes() == blob
        assert (out / f"{name}.gz").read_bytes() == served[f"{name}.gz"]

    # a rerun reuses the kept .gz files: their content is verified, no request is made
    before = tree_digest(out)
    mirrors.requests.clear()
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert mirrors.requests == [] and tree_digest(out) == before

    # a kept .gz whose content changed (a valid gzip) is fetched again
    name = LABELS["train"]
    assert files[name][-1] == 9
    (out / f"{name}.gz").write_bytes(regz(files[name][:-1] + b"\x00"))
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert {r.rsplit("/", 1)[1] for r in mirrors.requests} == {f"{name}.gz"}
    assert (out / name).read_bytes() == files[name]


def test_changed_content_byte_over_http(mirrors: Mirrors, tmp_path: Path):
    """Re-compressed with one content byte changed: refused (next mirror), one line naming the URL."""
    per_attempt = requests_per_attempt(mirrors, tmp_path)
    files = dataset_files()
    name = LABELS["train"]
    changed = {**files, name: files[name][:-1] + bytes([(files[name][-1] + 1) % 10])}
    publish_recompressed(mirrors, "bad", changed)
    mirrors.publish("good", files)
    out = tmp_path / "raw"
    source = content_source(mirrors.url("bad"), mirrors.url("good"), files=files)
    assert fetch(source, out, FAST) == {"train": 60, "test": 20}
    assert (out / name).read_bytes() == files[name]
    assert mirrors.requests.count(f"/bad/{name}.gz") == per_attempt  # not retried
    assert mirrors.count("/good/") == per_attempt  # only that file came from the good mirror

    with pytest.raises(MnistlabError) as e:
        fetch(content_source(mirrors.url("bad"), files=files), tmp_path / "other", FAST)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"dataset 'web': could not get {name}.gz from any mirror (tried: {mirrors.url('bad')}{name}.gz: "
        f"content MD5 mismatch (expected {md5(files[name])}, got {md5(changed[name])})). Offline?")
    assert not (tmp_path / "other").exists()


def test_local_folder_first_means_no_request(mirrors: Mirrors, tmp_path: Path):
    files = dataset_files()
    mirrors.publish("m1", files)
    folder = write_folder(tmp_path / "local", files, gzipped=False)
    out = tmp_path / "raw"
    assert fetch(content_source(str(folder), mirrors.url("m1"), files=files), out, FAST) == {"train": 60, "test": 20}
    assert mirrors.requests == []
    assert manifest_verified(out) == {"content-md5"}
    assert not list(out.glob("*.gz"))

    # a folder that does not exist is skipped: the URL mirror is used
    out2 = tmp_path / "raw2"
    source = content_source(str(tmp_path / "nowhere"), mirrors.url("m1"), files=files)
    assert fetch(source, out2, FAST) == {"train": 60, "test": 20}
    assert mirrors.count("/m1/") > 0 and manifest_verified(out2) == {"md5+content-md5"}


def test_take_keeps_the_full_gz_and_reruns_without_requests(mirrors: Mirrors, tmp_path: Path):
    """With take, the kept .gz files stay the full verified downloads: a rerun, or a
    new take, is cut from them without any request; a changed one is fetched again."""
    files = dataset_files()
    served = publish_recompressed(mirrors, "m1", files)  # verified by content, as Debian's copy
    out = tmp_path / "raw"

    def source(take: dict) -> Source:
        spec = {"mirrors": [mirrors.url("m1")], **official_spec(files), "take": take}
        return resolve_source({"sources": {"web": spec}}, "web")

    assert fetch(source({"train": 25, "test": 7}), out, FAST) == {"train": 25, "test": 7}
    for name in files:
        assert (out / f"{name}.gz").read_bytes() == served[f"{name}.gz"]  # the full file
    x, y = make_pair(60)
    assert read_pair(out, "train", 10)[0].equal(x[:25])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["take"] == {"train": 25, "test": 7}
    assert {e["md5"] for e in manifest["files"].values()} == {md5(b) for b in served.values()}

    before = tree_digest(out)
    mirrors.requests.clear()
    assert fetch(source({"train": 25, "test": 7}), out, FAST) == {"train": 25, "test": 7}
    assert mirrors.requests == [] and tree_digest(out) == before

    # a new take: cut from the kept files, still no request
    assert fetch(source({"train": 40}), out, FAST) == {"train": 40, "test": 20}
    assert mirrors.requests == []
    assert read_pair(out, "train", 10)[1].equal(y[:40])
    assert (out / IMAGES["test"]).read_bytes() == files[IMAGES["test"]]

    # a kept .gz changed beyond the slice (valid gzip, last label altered): fetched again
    name = LABELS["train"]
    (out / f"{name}.gz").write_bytes(regz(files[name][:-1] + bytes([(files[name][-1] + 1) % 10])))
    assert fetch(source({"train": 25, "test": 7}), out, FAST) == {"train": 25, "test": 7}
    assert {r.rsplit("/", 1)[1] for r in mirrors.requests} == {f"{name}.gz"}
    assert (out / f"{name}.gz").read_bytes() == served[f"{name}.gz"]


# --------------------------------------------------------------------------- no network at all


def test_dead_mirrors_fail_fast_with_one_line(tmp_path: Path):
    a, b = dead_url(), dead_url().replace("/mnist/", "/other/")
    settings = DownloadSettings(timeout=5, retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(MnistlabError) as e:
        fetch(url_source(a, b, name="mnist"), tmp_path / "raw", settings)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("dataset 'mnist': could not get train-images-idx3-ubyte.gz from any mirror (tried: ")
    assert f"{a}train-images-idx3-ubyte.gz: ConnectionRefusedError" in msg
    assert f"{b}train-images-idx3-ubyte.gz: ConnectionRefusedError" in msg
    assert "(after 2 attempts)" in msg
    assert "in a folder and list it first: sources.mnist.mirrors: [/that/folder] in params.yaml" in msg
    assert not (tmp_path / "raw").exists()


def test_unknown_hosts_fail_fast_with_default_settings(tmp_path: Path):
    """The default timeout/retries/backoff: an unresolvable host is not retried.

    ``.invalid`` never resolves (RFC 6761), with or without a network.
    """
    source = url_source("https://mnist-mirror.invalid/mnist/", "http://also-not-here.invalid/x/",
                        name="mnist")
    t0 = time.perf_counter()
    with pytest.raises(MnistlabError, match="host not found") as e:
        fetch(source, tmp_path / "raw", DownloadSettings())
    assert time.perf_counter() - t0 < 30
    assert "https://mnist-mirror.invalid/mnist/train-images-idx3-ubyte.gz: host not found" in str(e.value)
    assert "http://also-not-here.invalid/x/train-images-idx3-ubyte.gz: host not found" in str(e.value)


@pytest.mark.slow  # runs the stage script in a subprocess
def test_download_stage_dead_mirror_exits_2(tmp_path: Path):
    url = dead_url()
    params = {"sources": {"mnist": {"torchvision": "MNIST", "mirrors": [url]}},
              "download": {"timeout": 5, "retries": 2, "backoff": 0}}
    t0 = time.perf_counter()
    p = run_stage("download.py", "--dataset", "mnist", "--out", "raw/mnist", params=params, cwd=tmp_path)
    assert time.perf_counter() - t0 < 30
    assert_one_line_error(p, f"tried: {url}train-images-idx3-ubyte.gz: ConnectionRefusedError",
                          "sources.mnist.mirrors: [/that/folder]")
    assert "WARNING" in p.stderr and "(attempt 1/2)" in p.stderr  # the retry was logged
    assert not (tmp_path / "raw" / "mnist").exists()
