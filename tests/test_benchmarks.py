"""The loop benchmark (benchmarks/compare_loops.py, `make benchmark`) runs end to end and
writes what its README table is made of: per-arch images/s of both loops, their ratio,
the CPU's flags and the verdict against issue #14's targets. On a tiny synthetic dataset:
this checks the script, not the speed (speed claims come from its full-MNIST run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import dataset_files, write_folder
from helpers.repo import ROOT


@pytest.mark.slow  # two archs, both loops, one epoch of 60 images (~15 s with imports)
def test_compare_loops_writes_ratios_flags_and_verdict(tmp_path: Path):
    data = write_folder(tmp_path / "data", dataset_files(n_train=60, n_test=20), gzipped=False)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_loops.py"), "--data", str(data),
         "--archs", "mlp,cnn_16_32", "--out", str(tmp_path / "results")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "loops-cpu.json").read_text())
    md = (tmp_path / "results" / "loops-cpu.md").read_text()
    assert [r["arch"] for r in result["archs"]] == ["mlp", "cnn_16_32"]
    for r in result["archs"]:
        assert r["epochs"] == 1  # the full-data default: one epoch for both loops, not the tutorials'
        assert r["classic_images_per_second"] > 0 and r["mnistlab_images_per_second"] > 0
        assert r["ratio"] == pytest.approx(r["mnistlab_images_per_second"] / r["classic_images_per_second"])
        assert 0 <= r["classic_test_accuracy"] <= 1 and 0 <= r["mnistlab_test_accuracy"] <= 1
    assert result["targets"] == {"each": 1.5, "geomean": 2.5}
    assert result["targets_met"] == (min(r["ratio"] for r in result["archs"]) >= 1.5
                                     and result["geomean_ratio"] >= 2.5)
    if Path("/proc/cpuinfo").is_file():
        assert "avx" in result["cpu_flags"] or result["cpu_flags"] == "unknown"
    assert "1 epoch(s) for both loops" in md
    assert "| mlp | 1 | 100 |" in md and "| cnn_16_32 | 1 | 50 |" in md
    assert ("Targets (every arch >= 1.5x, geometric mean >= 2.5x): "
            + ("met" if result["targets_met"] else "NOT met")) in md
