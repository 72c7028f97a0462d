"""train.threads: auto: a run's torch thread count follows the cores it can really use and the
training runs beside it (issue #14); the rule, the cgroup and slot readers, the setting, the
stage's record, and the concurrency benchmark end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.repo import ROOT, committed_params

from mnistlab import threads
from mnistlab.config import TrainSettings, load_params
from mnistlab.errors import MnistlabError
from mnistlab.threads import Lease, Slots, cgroup_cpu_limit, choose, share


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(("setting", "env", "cores", "runs", "want"), [
    (3, {}, 2, 1, 3),                                      # explicit: exactly that
    (3, {"OMP_NUM_THREADS": "1"}, 2, 4, 3),                # ... over OMP_NUM_THREADS and the runs
    ("auto", {"OMP_NUM_THREADS": "1"}, 8, 1, 1),           # the user/gate/torchrun said so
    ("auto", {"OMP_NUM_THREADS": "4,2"}, 2, 1, 4),         # nested list: its first level
    ("auto", {"OMP_NUM_THREADS": "0"}, 2, 1, 2),           # invalid: as if unset
    ("auto", {"OMP_NUM_THREADS": "many"}, 2, 2, 1),
    ("auto", {"OMP_NUM_THREADS": ""}, 2, 1, 2),
    ("auto", {}, 2, 1, 2),                                  # alone: every usable core
    ("auto", {}, 2, 2, 1),
    ("auto", {}, 2, 4, 1),                                  # more runs than cores: 1 each
    ("auto", {}, 16, 4, 4),
    (2, {"MNISTLAB_THREADS": "1"}, 2, 1, 1),                # a harness's override beats all
    ("auto", {"MNISTLAB_THREADS": "3", "OMP_NUM_THREADS": "1"}, 2, 1, 3),
])
def test_choose_threads(setting, env, cores, runs, want):
    assert choose(setting, env, cores=cores, runs=runs).threads == want


def test_the_cores_are_shared_without_loss_or_excess():
    for cores in range(1, 17):
        for runs in range(1, 9):
            counts = [share(cores, runs, rank) for rank in range(runs)]
            assert all(c >= 1 for c in counts)
            assert sum(counts) == max(cores, runs)  # all cores used; never more, but 1 each
            assert max(counts) - min(counts) <= 1   # the remainder to the lowest ranks
    assert [share(8, 3, r) for r in range(3)] == [3, 3, 2]


def test_the_choice_says_where_it_came_from():
    assert choose("auto", {}, cores=2, runs=2).source == \
        "train.threads=auto: 2 usable core(s) shared by 2 concurrent training runs"
    assert choose("auto", {"OMP_NUM_THREADS": "1"}, cores=2).source == \
        "train.threads=auto: OMP_NUM_THREADS=1"
    assert choose(4, {}, cores=2).source == "train.threads=4"


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_a_bad_override_is_one_line(bad):
    with pytest.raises(MnistlabError) as e:
        choose("auto", {"MNISTLAB_THREADS": bad}, cores=2)
    assert one_line(e) == f"MNISTLAB_THREADS must be a positive integer (got {bad!r})"


# --------------------------------------------------------------------------- usable cores


def cgroup(tmp_path: Path, self_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup (``files``: relative path -> content) and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    me = tmp_path / "self-cgroup"
    me.write_text(self_line + "\n")
    return root, me


@pytest.mark.parametrize(("self_line", "files", "limit"), [
    ("0::/", {"cpu.max": "max 100000"}, None),                       # v2, no quota
    ("0::/", {"cpu.max": "150000 100000"}, 1.5),                     # docker --cpus 1.5
    ("0::/a/b", {"a/cpu.max": "100000 100000", "a/b/cpu.max": "max 100000"}, 1.0),  # a parent binds
    ("0::/a/b", {"a/cpu.max": "400000 100000", "a/b/cpu.max": "200000 100000"}, 2.0),
    ("0::/docker/abc", {"cpu.max": "200000 100000"}, 2.0),            # path not mounted here: the top
    ("4:cpu,cpuacct:/", {"cpu,cpuacct/cpu.cfs_quota_us": "-1",        # v1, no quota
                         "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    ("4:cpu,cpuacct:/k8s/pod", {"cpu,cpuacct/k8s/pod/cpu.cfs_quota_us": "50000",
                                "cpu,cpuacct/k8s/pod/cpu.cfs_period_us": "100000"}, 0.5),
    ("1:cpu:/", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    ("0::/", {}, None),                                               # no files at all
    ("0::/", {"cpu.max": "garbage"}, None),
])
def test_cgroup_cpu_limit(tmp_path, self_line, files, limit):
    root, me = cgroup(tmp_path, self_line, files)
    assert cgroup_cpu_limit(root, me) == limit


def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path):
    root, me = cgroup(tmp_path, "0::/", {"cpu.max": "150000 100000"})
    assert threads.usable_cores(8, root, me) == 1          # 1.5 CPUs: rounded down
    assert threads.usable_cores(1, root, me) == 1
    root, me = cgroup(tmp_path / "b", "0::/", {"cpu.max": "400000 100000"})
    assert threads.usable_cores(2, root, me) == 2          # taskset to 2 of the 4 allowed
    root, me = cgroup(tmp_path / "c", "0::/", {"cpu.max": "20000 100000"})
    assert threads.usable_cores(4, root, me) == 1          # 0.2 CPUs: still one thread
    root, me = cgroup(tmp_path / "d", "0::/", {})
    assert threads.usable_cores(6, root, me) == 6
    assert threads.usable_cores() >= 1  # this machine, read for real


def test_affinity_is_what_the_process_may_use():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks here")
    assert threads.affinity_cores() == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- slots


def test_slots_count_the_runs_that_hold_one(tmp_path):
    a, b, c = Slots(tmp_path / "s"), Slots(tmp_path / "s"), Slots(tmp_path / "s")
    assert a.census() == (1, 0)  # no slot yet: alone
    assert (a.claim(), b.claim()) == (0, 1)
    assert a.census() == (2, 0) and b.census() == (2, 1)
    a.release()
    assert b.census() == (1, 0)
    assert c.claim() == 0  # a freed slot is reused
    assert b.census() == (2, 1) and c.census() == (2, 0)
    b.release()
    c.release()


HOLDER = ("import sys, time; from pathlib import Path; from mnistlab.threads import Slots; "
          "s = Slots(Path(sys.argv[1])); print(s.claim(), flush=True); time.sleep(60)")


def test_a_slot_of_another_process_counts_until_it_dies(tmp_path):
    """The kernel drops a flock when its process ends, however it ends: a killed run is never counted."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "s")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"
        mine = Slots(tmp_path / "s")
        assert mine.claim() == 1
        assert mine.census() == (2, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert mine.census() == (1, 0)
        mine.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_slot_folder_that_is_a_symlink_is_not_used(tmp_path, caplog):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    s = Slots(tmp_path / "link")
    assert s.claim() is None and s.census() == (1, 0)
    assert "not a folder of this user; counting this run alone" in caplog.text
    assert not list((tmp_path / "elsewhere").iterdir())


def test_the_slot_folder_is_per_user_or_the_environment_s(tmp_path):
    assert threads.slot_dir({"MNISTLAB_THREAD_SLOTS": str(tmp_path)}) == tmp_path
    assert threads.slot_dir({}).name == f"mnistlab-threads-{os.getuid()}"


def test_a_lease_sets_torch_threads_from_the_runs_beside_it(tmp_path, caplog):
    env = {"MNISTLAB_THREAD_SLOTS": str(tmp_path / "s")}
    before = torch.get_num_threads()
    other = Slots(tmp_path / "s")
    other.claim()
    try:
        with Lease(env) as lease:
            caplog.set_level("INFO", logger="mnistlab.threads")
            cores = threads.usable_cores()
            n = lease.apply("auto", "train.threads", "digits-mlp-1234")
            assert n == share(cores, 2, 1) == torch.get_num_threads()
            assert f"digits-mlp-1234: {n} torch thread(s) (train.threads=auto: {cores} usable core(s) " \
                   "shared by 2 concurrent training runs)" in caplog.text
            assert lease.apply(1) == 1 == torch.get_num_threads()
        assert Slots(tmp_path / "s").census() == (1, 0)  # released: only `other`'s is held
    finally:
        other.release()
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("bad", ["many", 0, -1, True, 1.5, None, [2]])
def test_a_bad_train_threads_is_one_line_naming_the_key(bad):
    params = committed_params()
    params["train"]["threads"] = bad
    with pytest.raises(MnistlabError) as e:
        TrainSettings.from_params(params)
    assert one_line(e) == f"params.yaml: train.threads must be auto or a positive integer (got {bad!r})"


def test_train_threads_is_auto_in_params_yaml_and_takes_a_count():
    assert load_params(ROOT / "params.yaml")["train"]["threads"] == "auto"
    params = committed_params()
    assert TrainSettings.from_params(params).threads == "auto"
    params["train"]["threads"] = 3
    assert TrainSettings.from_params(params).threads == 3
    del params["train"]["threads"]
    assert TrainSettings.from_params(params).threads == "auto"


def test_the_ci_copies_pin_the_threads_over_params_yaml(tmp_path, monkeypatch, capsys):
    """The gate's baseline must not depend on the core count, even if params.yaml pins train.threads."""
    from mnistlab.ci import copies

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\necho "omp=$OMP_NUM_THREADS mnistlab=$MNISTLAB_THREADS"\n')
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    (tmp_path / "w").mkdir()
    copies.run_shards([tmp_path / "w"], 1, 1, "the test")
    assert "omp=1 mnistlab=1" in capsys.readouterr().out


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow  # one short training run with an MLflow store (~10 s)
def test_the_train_stage_records_the_count_it_chose(tmp_path, monkeypatch, mlflow_store):
    from mlflow.tracking import MlflowClient

    from mnistlab.data.digits import write_digits
    from mnistlab.data.split import split
    from mnistlab.stages.train import TrainPaths, train

    write_digits(tmp_path / "raw")
    split(tmp_path / "raw", tmp_path / "split", [str(i) for i in range(10)], 0.1, 0.2, 1, "digits")
    params = committed_params()
    params["train"].update(min_steps=0, device="cpu")
    params["hparams"]["mlp"]["epochs"] = 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MNISTLAB_THREADS", raising=False)
    monkeypatch.setenv("MNISTLAB_THREAD_SLOTS", str(tmp_path / "slots"))
    monkeypatch.chdir(tmp_path)
    other = Slots(tmp_path / "slots")  # another training run, started first
    other.claim()
    before = torch.get_num_threads()
    try:
        p = TrainPaths(tmp_path / "split", tmp_path / "m", tmp_path / "metrics", tmp_path / "c" / "last.pt")
        summary = train(params, "digits", "mlp", params["seeds"][0], p)
    finally:
        other.release()
        torch.set_num_threads(before)
    want = share(threads.usable_cores(), 2, 1)
    assert summary["threads"] == want
    assert json.loads((p.metrics_dir / "train.json").read_text())["threads"] == want
    run_id = json.loads((p.model_dir / "run.json").read_text())["run_id"]
    run = MlflowClient(mlflow_store).get_run(run_id)
    assert run.data.params["threads"] == str(want)
    assert "threads" not in run.data.metrics and "final_threads" not in run.data.metrics
    assert Slots(tmp_path / "slots").census() == (1, 0)  # the stage's slot is free again

    # DVC deletes the outputs before a stage that then fails (a mistyped param); the rerun,
    # now alone on the machine (auto would pick all cores), rebuilds them from the finished
    # checkpoint without training: train.json still says what the training had.
    train_json = (p.metrics_dir / "train.json").read_bytes()
    for d in (p.model_dir, p.metrics_dir):
        shutil.rmtree(d)
    try:
        again = train(params, "digits", "mlp", params["seeds"][0], p)
    finally:
        torch.set_num_threads(before)
    assert again["threads"] == want and (p.metrics_dir / "train.json").read_bytes() == train_json


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow  # 6 short training processes (~20 s on 2 cores)
def test_the_concurrency_benchmark_runs_end_to_end(tmp_path):
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the benchmark removes it from its runs
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "concurrency.py"), "--data", "digits",
         "--archs", "mlp:1", "--ns", "1,2", "--take", "400", "--val", "100",
         "--out", str(tmp_path), "--name", "c"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: the verdict, on a busy machine
    result = json.loads((tmp_path / "c.json").read_text())
    md = (tmp_path / "c.md").read_text()
    assert [(g["mode"], g["n"]) for g in result["groups"]] == \
        [("auto", 1), ("auto", 2), ("all-cores", 1), ("all-cores", 2)]
    cores = result["cpu"]["usable_cores"]
    for g in result["groups"]:
        assert len(g["runs"]) == g["n"] and not g["timed_out"]
        assert all(r["images"] == 400 for r in g["runs"])  # batch 100: 4 full batches
        assert g["aggregate_images_per_second"] > 0
        if g["mode"] == "auto":
            assert sorted(r["threads"] for r in g["runs"]) == \
                sorted(share(cores, g["n"], rank) for rank in range(g["n"]))
    assert result["groups"][0]["ratio_to_n1"] == 1.0
    assert result["cpu"]["model"] and "simd" in result["cpu"]
    assert "| mlp | auto | 2 |" in md and "Verdict:" in md
    print(f"benchmark smoke run: {time.time() - t0:.1f} s")
