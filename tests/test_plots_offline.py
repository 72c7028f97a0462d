"""`dvc plots show` draws its Vega plots offline (issue #15).

dvc_render's default page loads Vega, Vega-Lite and vega-embed from cdn.jsdelivr.net, so
without a network every plot stays blank. .dvc/config points ``plots.html_template`` at
.dvc/plots.html, which loads them from node_modules/ (package-lock.json, ``make setup``).

Here: the project's dvc.yaml and .dvc/ in a temp dir, tiny metrics files for two archs (one seed),
``dvc plots show``, then the page in headless Chromium with every network path blocked.
A probe script appended to a copy of the page counts the coloured pixels on each Vega
canvas (data marks: lines, heat-map cells; axes and text are grey), so "drew" means
data was painted, not only that a canvas exists. The same check on DVC's default
(CDN) page must find nothing drawn: that is what shows the check can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from helpers.repo import ROOT, committed_params, run

from mnistlab import artifacts
from mnistlab.ci.copies import write_no_scm
from mnistlab.config import run_dir

ARCHS = ["mlp", "lenet5"]
SEED = 1234  # the training seed: metrics/digits/<arch>/seed-1234/
SCRIPTS = [f"node_modules/{p}/build/{p}.min.js" for p in ("vega", "vega-lite", "vega-embed")]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_INK = 50  # coloured pixels per plot; a drawn curve or confusion matrix has thousands

# Appended before </body> of a copy of the page: after the views have rendered (virtual
# time, see chromium_dom), each canvas gets data-ink = its count of coloured pixels.
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  for (const c of document.querySelectorAll("canvas")) {
    if (!c.width || !c.height) continue;  // an empty spec's view: nothing to read
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let ink = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] > 0 && Math.abs(d[i] - d[i + 1]) + Math.abs(d[i + 1] - d[i + 2]) > 60) ink++;
    }
    c.setAttribute("data-ink", ink);
  }
}, 4000));
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = next(filter(None, map(shutil.which, BROWSERS)), None)
    if path is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}): apt-get install chromium")
    return path


@pytest.fixture(scope="module")
def vega_scripts() -> None:
    missing = [s for s in SCRIPTS if not (ROOT / s).is_file()]
    if missing and shutil.which("npm") is None:
        pytest.skip("npm not installed, so `make setup` could not fetch node_modules/ (package.json)")
    assert not missing, f"{missing} missing: run `make setup` (npm ci from package-lock.json)"


@pytest.fixture
def plots_repo(tmp_path: Path) -> Path:
    """dvc.yaml, .dvc/ (config + plots.html) and tiny train/evaluate plot files for ARCHS (seed 1234)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    write_no_scm(repo)
    (repo / "node_modules").symlink_to(ROOT / "node_modules")

    params = committed_params()
    params["datasets"], params["archs"], params["seeds"] = ["digits"], ARCHS, [SEED]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for arch in ARCHS:
        metrics = run_dir(repo / params["paths"]["metrics"], "digits", arch, SEED)  # .../seed-1234
        metrics.mkdir(parents=True)
        artifacts.write_history(metrics / artifacts.HISTORY, [
            {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_accuracy": 1 - 0.2 / e}
            for e in (1, 2, 3)])
        # three of each digit 0-9, every fourth one mistaken for the next digit
        rows = [f"{d},{d if i % 4 else (d + 1) % 10}" for i, d in enumerate(list(range(10)) * 3)]
        (metrics / artifacts.PREDICTIONS).write_text("actual,predicted\n" + "\n".join(rows) + "\n")
    return repo


def chromium_dom(browser: str, page: Path, tmp: Path) -> str:
    """``page`` (with PROBE) rendered headless with the network blocked; its DOM afterwards."""
    probed = page.with_name("probe.html")  # beside the page: its relative script paths still hold
    probed.write_text(page.read_text(encoding="utf8").replace("</body>", PROBE + "</body>"), encoding="utf8")
    profile = tmp / f"chromium-{page.parent.name}"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}",
           # offline: every connection goes to a closed port, every host name fails to resolve
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           # virtual time runs the page's timers (PROBE's 4 s) without waiting in real time
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "</html>" in p.stdout, f"{browser} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p.stdout


class _Ink(HTMLParser):
    """data-ink of the canvases inside each div whose id is in ``ids`` (summed per div)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, ids: set[str]):
        super().__init__()
        self.ids, self.stack, self.ink = ids, [], {i: 0 for i in ids}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "canvas":
            plot = next((i for i in reversed(self.stack) if i in self.ids), None)
            if plot is not None:
                self.ink[plot] += int(a.get("data-ink") or 0)
        if tag not in self.VOID:
            self.stack.append(a.get("id") if tag == "div" else None)

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.stack:
            self.stack.pop()


def drawn(browser: str, page: Path, tmp: Path) -> dict[str, int]:
    """{vega div id: coloured pixels drawn in it} for the page ``dvc plots show`` wrote."""
    # DVC also writes an empty spec for each declared plot it found no file for (here the
    # reports/ pictures, not made): those can draw nothing on any page.
    specs = re.findall(r"var spec = (.*?);\s*vegaEmbed\('#([^']+)'", page.read_text(encoding="utf8"), re.S)
    ids = {i for spec, i in specs if spec.strip() != "{}"}
    assert ids, f"{page}: no Vega plots in it"
    parser = _Ink(ids)
    parser.feed(chromium_dom(browser, page, tmp))
    return parser.ink


@pytest.mark.slow
def test_dvc_plots_show_draws_offline(plots_repo, chromium, vega_scripts, tmp_path):
    from dvc_render.html import PAGE_HTML

    repo = plots_repo
    run(["dvc", "plots", "show"], repo, timeout=300)  # .dvc/config's template, dvc_plots/ by default
    page = repo / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf8")
    assert not re.search(r"""src\s*=\s*["']?(https?:)?//""", html), "the page still loads a script from the network"
    for script in SCRIPTS:
        assert f'src="../{script}"' in html and (page.parent / ".." / script).is_file(), script

    ink = drawn(chromium, page, tmp_path)
    assert len(ink) == 2 * len(ARCHS), ink  # per arch (one seed): the val_accuracy curve and the confusion matrix
    assert all(v >= MIN_INK for v in ink.values()), f"plots that drew nothing offline: {ink}"

    # The same data through DVC's default page (Vega from the CDN): nothing may draw offline,
    # or the check above could not tell a working page from a broken one.
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    run(["dvc", "plots", "show", "-o", "cdn_plots", "--html-template", str(default)], repo, timeout=300)
    cdn_page = repo / "cdn_plots" / "index.html"
    assert "cdn.jsdelivr.net" in cdn_page.read_text(encoding="utf8")
    cdn_ink = drawn(chromium, cdn_page, tmp_path)
    assert cdn_ink.keys() == ink.keys() and not any(cdn_ink.values()), cdn_ink
