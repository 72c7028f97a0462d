"""`make exps`: the command its recipe runs, in a tiny git+DVC repo, shows only the wanted columns.

The command is read from make itself (``make -n``), so the test runs exactly what the
Makefile's ``EXPS_FLAGS`` say, quoting and ``$$`` escapes included; ``ARGS=--csv`` makes
the table parseable (DVC applies ``--keep``/``--drop`` to CSV output, not to ``--json``).
The repo imitates the pipeline's metric files and params, and their noise: test_loss,
macro_f1, epochs, a split summary.json, batch sizes, devices, arch args.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.repo import ROOT, run, stage_env

pytestmark = pytest.mark.slow  # several dvc subprocesses, an experiment run each

# Writes every metrics/<ds>/<arch>/seed-<seed>/{train,test}.json and data/split/<ds>/summary.json.
WRITE = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
for ds in p["datasets"]:
    os.makedirs(f"data/split/{ds}", exist_ok=True)
    json.dump({"train": {"count": 10}, "seed": p["seed"]}, open(f"data/split/{ds}/summary.json", "w"))
    for a, s in ((a, s) for a in p["archs"] for s in p["seeds"]):
        d = f"metrics/{ds}/{a}/seed-{s}"
        os.makedirs(d, exist_ok=True)
        h = p["hparams"][a]
        json.dump({"test_accuracy": 0.9 + h["lr"], "test_loss": 0.1, "macro_f1": 0.8},
                  open(f"{d}/test.json", "w"))
        json.dump({"best_val_accuracy": 0.95, "epochs": h["epochs"], "train_seconds": 1.5,
                   "parameters": 100}, open(f"{d}/train.json", "w"))
"""


def exps_command(args: str = "--csv") -> str:
    """The shell lines ``make exps ARGS=...`` runs (setup assumed done, as after ``make test``)."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    p = subprocess.run(["make", "--no-print-directory", "-n", "-o", "setup", "exps", f"ARGS={args}"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert "-m mnistlab.exps" in p.stdout, p.stdout
    return p.stdout


def make_exps(repo: Path, args: str = "--csv") -> str:
    """What ``make exps ARGS=...`` prints in ``repo``."""
    out = subprocess.run(["bash", "-c", exps_command(args)], cwd=repo, env=stage_env(repo),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def make_exps_repo(repo: Path, datasets: list[str], archs: list[str]) -> Path:
    """A git+DVC repo with one stage per dataset x arch x seed (dvc.yaml's matrix, one seed)
    writing the pipeline's metric files, reproduced and committed (so HEAD has metrics, as
    after ``make run`` and a commit)."""
    repo.mkdir()
    params = {"seed": 1234, "seeds": [1234], "datasets": datasets, "archs": archs,
              "train": {"device": "auto", "min_steps": 1500},
              "hparams": {a: {"args": {"hidden": 8}, "lr": 0.001, "epochs": 5, "batch_size": 100}
                          for a in archs},
              "evaluate": {"batch_size": 2000}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "write.py").write_text(WRITE)
    stage = {"matrix": {"dataset": "${datasets}", "arch": "${archs}", "seed": "${seeds}"},
             "cmd": "python write.py", "deps": ["write.py"],
             "params": ["seed", "train", "hparams.${item.arch}"],
             "metrics": [{f"metrics/${{item.dataset}}/${{item.arch}}/seed-${{item.seed}}/{f}.json":
                          {"cache": False}} for f in ("train", "test")]}
    dvc_yaml = {"stages": {"fake": stage},
                "metrics": [f"data/split/{ds}/summary.json" for ds in datasets]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"],
                ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        run(cmd, repo)
    return repo


def columns(repo: Path) -> list[str]:
    """The header of what ``make exps ARGS=--csv`` prints in ``repo``."""
    return next(csv.reader(io.StringIO(make_exps(repo))))


def exp_run(repo: Path, *sets: str) -> None:
    run(["dvc", "exp", "run", "-q", *(a for s in sets for a in ("-S", s))], repo)


def test_exps_shows_each_items_headline_metrics_and_only_changed_params(tmp_path):
    datasets, archs = ["digits", "fashion_mini"], ["mlp", "cnn_16_32"]
    repo = make_exps_repo(tmp_path / "repo", datasets, archs)
    metrics = {f"metrics/{ds}/{a}/seed-1234/{f}.json:{m}" for ds in datasets for a in archs
               for f, names in (("train", ("best_val_accuracy", "train_seconds")),
                                ("test", ("test_accuracy",)))
               for m in names}

    # no experiment yet: no param differs, so none is shown (nor the ~40 other columns)
    cols = columns(repo)
    assert cols[:3] == ["Experiment", "rev", "Created"]
    assert set(cols[3:]) == metrics

    # an experiment: the one changed param joins (not batch_size, train.*, deps, ...)
    exp_run(repo, "hparams.mlp.lr=0.01")
    cols = columns(repo)
    assert cols[:3] == ["Experiment", "rev", "Created"]
    assert set(cols[3:]) == metrics | {"hparams.mlp.lr"}


def test_exps_with_one_item_matches_dvcs_bare_and_file_prefixed_names(tmp_path):
    """One dataset x arch x seed: DVC names a column by its bare key where that key is unique
    (``test_accuracy``), ``file:key`` where two files share it (here ``seed``, also a
    key of summary.json: ``params.yaml:seed``)."""
    repo = make_exps_repo(tmp_path / "repo", ["digits"], ["mlp"])
    exp_run(repo, "hparams.mlp.epochs=3", "seed=7", "train.min_steps=0")
    cols = columns(repo)
    assert cols[:3] == ["Experiment", "rev", "Created"]
    assert set(cols[3:]) == {"test_accuracy", "best_val_accuracy", "train_seconds",
                             "hparams.mlp.epochs", "params.yaml:seed"}
    # both changed, as plain --only-changed shows, and are dropped all the same
    plain = run(["dvc", "exp", "show", "--csv", "--only-changed"], repo).stdout
    assert {"train.min_steps", "data/split/digits/summary.json:seed"} <= \
        set(next(csv.reader(io.StringIO(plain))))


def test_exps_table_shows_every_arch_of_six_and_the_changed_param(tmp_path):
    """Six archs: DVC's own table cut every column past its 1,024 characters (the last three
    archs' metrics and the changed lr, found by a new user). The printed table has them all,
    named short, and names the workspace and baseline rows."""
    archs = ["resnet_bn", "lenet5", "cnn_4_8", "cnn_32_64", "cnn_16_32", "mlp"]
    repo = make_exps_repo(tmp_path / "repo", ["digits"], archs)
    exp_run(repo, "hparams.mlp.lr=0.01")
    lines = make_exps(repo, "").splitlines()
    who, what, rule, *rows = lines
    assert who.split() == [a for a in archs for _ in range(3)]  # one line: what varies (the arch)
    assert what.split()[:2] == ["Experiment", "Created"] and what.count("test acc") == 6
    assert what.split()[2:6] == ["test", "acc", "best", "val"]  # a run's headline first
    assert what.count("best val acc") == 6 and what.count("train s") == 6
    assert what.split()[-1] == "hparams.mlp.lr" and set(rule) <= {"-", " "}
    assert max(map(len, lines)) < 1024
    by_name = {r.split()[0]: r.split() for r in rows}
    assert len(by_name) == 3 and "workspace" in by_name  # and the baseline, by its branch
    # mlp's test acc is 0.9 + lr (WRITE), then its best val acc and train s; the lr last
    assert sorted(r[-4:] for name, r in by_name.items() if name != "workspace") == [
        ["0.9010", "0.9500", "1.5", "0.001"], ["0.9100", "0.9500", "1.5", "0.01"]]


def test_exps_headers_name_what_varies():
    from mnistlab.exps import headers

    one = ["metrics/digits/mlp/seed-1234/test.json:test_accuracy", "params.yaml:seed", "archs"]
    assert headers(one) == ["mlp\ntest acc", "\nseed", "\narchs"]
    two = [f"metrics/{ds}/mlp/seed-{s}/train.json:train_seconds" for ds in ("digits", "mnist")
           for s in (1, 2)]
    assert headers(two) == [f"{ds}/{s}\ntrain s" for ds in ("digits", "mnist") for s in (1, 2)]
