"""The CI regression gate: run the pipeline on the CI profile, compare with a committed baseline.

The Makefile wraps it: ``make ci-gate`` (pipeline + check) and ``make baseline``
(pipeline + accept)::

    python -m mnistlab.ci.gate pipeline  # build/ci/<dataset>/ copies + ci/profile.yaml; dvc repro there
    python -m mnistlab.ci.gate check     # Markdown table; exit 1 on any regression
    python -m mnistlab.ci.gate accept    # the copies' results become ci/baseline.json (commit it)

Its settings are ``ci/gate.yaml`` (:data:`CONFIG`): the profile, the baseline, the
workdir, jobs and threads, the gated metrics and ``require_best``. No pipeline stage
reads them, which is why they are not in params.yaml.

Why copies in ``build/ci/`` rather than ``dvc exp run -S ...`` in the workspace:
the profile must not touch the developer's params.yaml, outputs or MLflow store.
Applying it in place would leave params.yaml modified (or retrain the default
pipeline after every gate run, since both would share one dvc.lock). Each copy
(see :mod:`mnistlab.ci.copies`) holds the files of this working tree (uncommitted
edits included, DVC outputs and dvc.lock excluded), keeps its own dvc.lock, DVC
cache and ``mlflow.db`` across runs (an unchanged tree reruns nothing), and gets
``params.yaml`` = the repo's params.yaml with ``ci/profile.yaml`` merged over it,
for one dataset each (see :func:`prepare`).

The comparison: for every run in the baseline (``dataset/arch/seed-<seed>``,
:func:`mnistlab.config.run_key`: one per item of the profile's ``seeds``), each metric listed in
``metrics`` (ci/gate.yaml) is compared with an absolute tolerance and a
direction (``max``: higher is better). Beyond tolerance in the bad direction is
a REGRESSION, in the good one an improvement (reported, not failing). A
baseline entry without a new result is MISSING and fails; a new entry without a
baseline is reported as ``new``. ``require_best`` ({dataset: arch}) also
fails the gate unless that arch has the strictly highest test accuracy there (its mean
over the seeds, with several).

Judging by evidence (``judge: evidence``, the default for ``test_accuracy``): a
fixed tolerance is too lax on 2,000 images and too strict on 360, where one
image is 0.28 %. ``accept`` therefore stores, per run, which test images
the model got right (``correct``: a '0'/'1' string in test-file order, from
``predictions.csv``), and ``check`` calls a change a REGRESSION only when it is
both larger than ``min_effect`` and supported by McNemar's exact test on the
same images (p < ``alpha``; :mod:`mnistlab.stats`); an improvement likewise. A
baseline without ``correct`` for that entry (or a test set of another length)
falls back to the tolerance, and the row says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab.ci.copies import (
    deep_merge,
    rebase_sources,
    run_shards,
    sync_tree,
    write_no_scm,
    write_params,
)
from mnistlab.config import (
    choice,
    get,
    load_params,
    non_negative,
    pipeline_outputs,
    positive,
    run_dir,
    run_key,
    seeds_of,
)
from mnistlab.errors import MnistlabError, run_script
from mnistlab.stats import McNemar, mcnemar
from mnistlab.utils import atomic_path, git_info, json_digest, write_json

log = logging.getLogger(__name__)

CONFIG = Path("ci/gate.yaml")  # the gate's settings, from the repository root
DIRECTIONS = ("max", "min")
JUDGES = ("evidence", "tolerance")
# The only metric with a per-image outcome (right or wrong), so the only one a paired test can judge.
EVIDENCE_METRIC = "test_accuracy"
# Verdicts that fail the gate.
FAILING = ("REGRESSION", "MISSING", "FAILED")


# --------------------------------------------------------------------------- settings


def load_settings(path: Path) -> dict[str, Any]:
    """The gate's settings (``ci/gate.yaml``): a mapping; each key is checked where it is used."""
    return load_params(path, what="gate settings", keys=None)


def setting(settings: dict[str, Any], key: str) -> Any:
    """``settings[key]``, or an error naming ci/gate.yaml and the missing key."""
    if not isinstance(settings, dict) or key not in settings:
        raise MnistlabError(f"{CONFIG}: missing key {key!r}")
    return settings[key]


def _checked(check: Callable[..., Any], key: str, *args: Any) -> Any:
    """``check(key, *args)``, a validator of :mod:`mnistlab.config`, its error naming ci/gate.yaml.

    Those validators name params.yaml, where the stages' keys live; a gate setting is
    not one of them.
    """
    try:
        return check(key, *args)
    except MnistlabError as e:
        raise MnistlabError(f"{CONFIG}: {str(e).removeprefix('params.yaml: ')}") from None


# --------------------------------------------------------------------------- the profile copy


def load_profile(path: Path) -> dict[str, Any]:
    """The CI profile: a mapping of params.yaml overrides (their keys checked by profile_params)."""
    return load_params(path, what="CI profile", keys=None)


def profile_params(root: Path, profile: Path) -> dict[str, Any]:
    """params.yaml of ``root`` with the profile merged over it and its sources made absolute."""
    params = load_params(root / "params.yaml")
    overrides = load_profile(profile)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise MnistlabError(f"{profile}: override(s) {', '.join(unknown)} name no key of params.yaml")
    return rebase_sources(deep_merge(params, overrides), root)


def shard_dir(workdir: Path, dataset: str) -> Path:
    """The copy that runs the CI pipeline of one dataset."""
    return workdir / dataset


def prepare(root: Path, workdir: Path, profile: Path) -> dict[str, Any]:
    """Make one copy of the working tree per dataset of the CI profile under ``workdir``.

    Why one copy (shard) per dataset: DVC runs the stages of one repo one after
    the other, and most of a stage's time is single-threaded (imports, MLflow,
    plotting); two shards side by side keep both CPU cores of a CI machine busy.
    Each shard is a complete pipeline (its compare stage ranks all archs of its
    dataset and registers that dataset's champion).

    Returns:
        The merged params (all datasets), also written to ``workdir/params.yaml``.
    """
    params = profile_params(root, profile)
    rel_work = os.path.relpath(workdir.resolve(), root.resolve())
    # DVC outputs and the lock belong to each copy; copying the default run's would clobber them.
    outputs = [str(v) for v in (params.get("paths") or {}).values()]
    note = (f"# Generated by `python -m mnistlab.ci.gate prepare`: {root / 'params.yaml'}\n"
            f"# with {profile} merged over it. Do not edit; edit those two instead.\n")
    workdir.mkdir(parents=True, exist_ok=True)
    write_params(workdir / "params.yaml", params, note)
    for ds in get(params, "datasets"):
        shard = shard_dir(workdir, ds)
        n = sync_tree(root, shard, [rel_work, "dvc.lock", "params.yaml", *outputs])
        write_params(shard / "params.yaml", {**params, "datasets": [ds]},
                     note + f"# This shard runs dataset {ds!r} only.\n")
        write_no_scm(shard)
        log.info("%s: %d files synced, CI profile %s applied", shard, n, profile)
    return params


def repro_targets(settings: dict[str, Any]) -> list[str]:
    """``targets`` of ci/gate.yaml: the stages each shard reproduces (with all they depend on).

    Absent or empty: every stage. A list of stage names otherwise, e.g. ``[compare]``.
    """
    targets = settings.get("targets")
    if targets is None:
        return []
    if not (isinstance(targets, list) and all(isinstance(t, str) and t.strip() for t in targets)):
        raise MnistlabError(f"{CONFIG}: targets must be a list of stage names, got {targets!r}")
    return targets


def run_pipeline(workdir: Path, params: dict[str, Any], settings: dict[str, Any]) -> None:
    """``dvc repro [targets]`` in every shard of ``params``' datasets, ``jobs`` at a time,
    ``threads`` threads each."""
    jobs = _checked(positive, "jobs", setting(settings, "jobs"), int)
    threads = _checked(positive, "threads", setting(settings, "threads"), int)
    run_shards([shard_dir(workdir, ds) for ds in get(params, "datasets")], jobs, threads,
               "the CI pipeline", targets=repro_targets(settings))


# --------------------------------------------------------------------------- comparing


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one metric is judged.

    ``direction``: max/min is better. ``tolerance``: the absolute change the
    ``tolerance`` judge allows. ``judge``: ``evidence`` (test_accuracy only: the change
    must exceed ``min_effect`` and McNemar's p-value must be below ``alpha``; the
    tolerance rule stands in when the baseline has no per-image outcomes) or
    ``tolerance``.
    """

    direction: str
    tolerance: float
    judge: str = "tolerance"
    min_effect: float = 0.005
    alpha: float = 0.05


def gate_rules(settings: dict[str, Any]) -> dict[str, Rule]:
    """``metrics`` of ci/gate.yaml: ``{metric: {direction, tolerance[, judge, min_effect, alpha]}}``.

    ``judge`` defaults to ``evidence`` for test_accuracy and ``tolerance`` otherwise;
    ``min_effect`` and ``alpha`` (defaults 0.005 and 0.05) only apply to ``evidence``.
    """
    spec = setting(settings, "metrics")
    if not isinstance(spec, dict) or not spec:
        raise MnistlabError(f"{CONFIG}: metrics must map at least one metric to "
                            "{direction, tolerance}")
    rules = {}
    for metric, r in spec.items():
        if not isinstance(r, dict):
            raise MnistlabError(f"{CONFIG}: metrics.{metric} must be {{direction, tolerance}}")
        default = "evidence" if metric == EVIDENCE_METRIC else "tolerance"
        judge_by = _checked(choice, f"metrics.{metric}.judge", r.get("judge", default), JUDGES)
        if judge_by == "evidence" and metric != EVIDENCE_METRIC:
            raise MnistlabError(f"{CONFIG}: metrics.{metric}.judge: evidence needs per-image "
                                f"outcomes, which only {EVIDENCE_METRIC} has (use tolerance)")
        alpha = _checked(non_negative, f"metrics.{metric}.alpha", r.get("alpha", Rule.alpha))
        if not 0 < alpha < 1:
            raise MnistlabError(f"{CONFIG}: metrics.{metric}.alpha must be in (0, 1), got {alpha}")
        rules[metric] = Rule(
            _checked(choice, f"metrics.{metric}.direction", r.get("direction"), DIRECTIONS),
            _checked(non_negative, f"metrics.{metric}.tolerance", r.get("tolerance")),
            judge_by,
            _checked(non_negative, f"metrics.{metric}.min_effect",
                     r.get("min_effect", Rule.min_effect)),
            alpha)
    return rules


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the gate's table."""

    key: str           # dataset/arch/seed-<seed> (mnistlab.config.run_key), or dataset/arch
    metric: str
    baseline: float | None
    new: float | None
    tolerance: float | None  # the allowed change: tolerance, or min_effect when judged by evidence
    verdict: str       # ok, improved, new, REGRESSION, MISSING, FAILED
    note: str = ""
    test: McNemar | None = None  # baseline = a, new = b: b_only fixed, a_only broken

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.new is None:
            return None
        return self.new - self.baseline


def judge(baseline: float, new: float, rule: Rule, test: McNemar | None = None) -> str:
    """``ok``, ``improved`` or ``REGRESSION`` for one metric (NaN is always a regression).

    With ``test`` (McNemar's, baseline vs. new on the same images) and ``judge:
    evidence``, a change counts only if it exceeds ``min_effect`` and p < ``alpha``;
    otherwise it must exceed ``tolerance``.
    """
    if not math.isfinite(new):
        return "REGRESSION"
    gain = (new - baseline) if rule.direction == "max" else (baseline - new)
    if rule.judge == "evidence" and test is not None:
        if test.p_value >= rule.alpha:
            return "ok"
        threshold = rule.min_effect
    else:
        threshold = rule.tolerance
    if gain < -threshold:
        return "REGRESSION"
    if gain > threshold:
        return "improved"
    return "ok"


def decode_correct(text: str) -> np.ndarray:
    """A baseline's ``correct`` string ('0'/'1' per test image) as bool [N]."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise MnistlabError("baseline: 'correct' entries must be strings of 0s and 1s")
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def encode_correct(correct: np.ndarray) -> str:
    """bool [N] → '0'/'1' string: 2,000 test images are 2,000 characters, readable in a diff."""
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool).tolist())


def _paired(rule: Rule, key: str, base_correct: dict[str, str], new_correct: dict[str, np.ndarray]
            ) -> tuple[McNemar | None, str]:
    """McNemar's test of baseline vs. new for an evidence rule, or why the tolerance stands in."""
    if rule.judge != "evidence":
        return None, ""
    if key not in base_correct:
        return None, "tolerance: the baseline has no per-image outcomes"
    if key not in new_correct:
        return None, "tolerance: no predictions.csv"
    before, after = decode_correct(base_correct[key]), new_correct[key]
    if len(before) != len(after):
        return None, f"tolerance: {len(after)} test images, the baseline had {len(before)}"
    return mcnemar(before, after), ""


def compare_results(baseline: dict[str, dict[str, float]], new: dict[str, dict[str, float]],
                    rules: dict[str, Rule], base_correct: dict[str, str] | None = None,
                    new_correct: dict[str, np.ndarray] | None = None) -> list[Row]:
    """Judge every gated metric of every run (``dataset/arch/seed-<seed>``); a pure function of its arguments.

    ``base_correct`` ({key: '0'/'1' string}, the baseline's) and ``new_correct``
    ({key: bool [N]}) give the per-image outcomes that ``judge: evidence`` rules test.
    """
    rows = []
    for key in sorted(set(baseline) | set(new)):
        for metric, rule in rules.items():
            b = baseline.get(key, {}).get(metric)
            n = new.get(key, {}).get(metric)
            if b is None and n is None:
                continue
            if n is None:
                what = "no result" if key not in new else f"no {metric}"
                rows.append(Row(key, metric, b, None, rule.tolerance, "MISSING", what))
            elif b is None:
                rows.append(Row(key, metric, None, n, rule.tolerance, "new", "not in the baseline"))
            else:
                test, note = _paired(rule, key, base_correct or {}, new_correct or {})
                allowed = rule.min_effect if test is not None else rule.tolerance
                rows.append(Row(key, metric, b, n, allowed, judge(b, n, rule, test), note, test))
    return rows


def check_best(new: dict[str, dict[str, float]], require_best: dict[str, str],
               metric: str = "test_accuracy") -> list[Row]:
    """``require_best`` {dataset: arch}: that arch must have the strictly highest ``metric``
    (each arch's mean over its runs, ``new``'s keys being :func:`mnistlab.config.run_key`).

    A dataset with no results at all is skipped (the profile does not run it; a
    baseline that has it reports it MISSING anyway).
    """
    values: dict[str, dict[str, list[float]]] = {}  # {dataset: {arch: one value per seed}}
    for k, v in new.items():
        ds, arch = k.split("/")[:2]
        if metric in v:
            values.setdefault(ds, {}).setdefault(arch, []).append(v[metric])
    means = {ds: {a: float(np.mean(vs)) for a, vs in archs.items()} for ds, archs in values.items()}
    rows = []
    for ds, arch in (require_best or {}).items():
        key = f"{ds}/{arch}"
        if not any(k.split("/", 1)[0] == ds for k in new):
            continue
        if arch not in means.get(ds, {}):
            rows.append(Row(key, f"best {metric}", None, None, None, "MISSING",
                            f"{CONFIG} require_best: no result for {key}"))
            continue
        mine = means[ds][arch]
        others = {a: m for a, m in means[ds].items() if a != arch}
        if not others:
            rows.append(Row(key, f"best {metric}", None, mine, None, "ok", "no other arch to beat"))
            continue
        rival, best = max(others.items(), key=lambda kv: kv[1])
        ok = mine > best
        rows.append(Row(key, f"best {metric}", best, mine, None, "ok" if ok else "FAILED",
                        f"must beat every other arch on {ds}; best other: {ds}/{rival} {best:.4f}"))
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _evidence(r: Row) -> str:
    """`` McNemar p=…`` for a failure or improvement line judged by evidence."""
    if r.test is None:
        return ""
    return f", McNemar p={r.test.p_value:.2g} (+{r.test.b_only}/−{r.test.a_only} images)"


def render(rows: list[Row], problems: list[str], title: str) -> str:
    """The gate's report: a Markdown table, then a verdict line and the failures by name.

    ``p-value`` and ``discordant`` (``+fixed/−broken``: test images only the new / only
    the baseline model gets right) are filled for metrics judged by evidence.
    """
    mark = {"REGRESSION": "❌ REGRESSION", "MISSING": "❌ MISSING", "FAILED": "❌ FAILED",
            "improved": "✅ improved", "ok": "ok", "new": "🆕 new"}
    lines = [f"## {title}", "",
             "| run | metric | baseline | new | delta | tolerance | p-value | discordant "
             "| verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = mark.get(r.verdict, r.verdict) + (f" ({r.note})" if r.note else "")
        p = "—" if r.test is None else f"{r.test.p_value:.2g}"
        disc = "—" if r.test is None else f"+{r.test.b_only}/−{r.test.a_only}"
        lines.append(f"| {r.key} | {r.metric} | {_fmt(r.baseline)} | {_fmt(r.new)} | "
                     f"{_fmt(r.delta, signed=True)} | {_fmt(r.tolerance)} | {p} | {disc} | {verdict} |")
    failed = [r for r in rows if r.verdict in FAILING]
    improved = [r for r in rows if r.verdict == "improved"]
    lines.append("")
    if failed or problems:
        lines.append(f"**Gate FAILED**: {len(failed)} failing check(s)"
                     + (f", {len(problems)} problem(s)" if problems else "") + ".")
    else:
        lines.append(f"**Gate passed**: {len(rows)} checks, {len(improved)} improvement(s).")
    lines += [f"- {p}" for p in problems]
    lines += [f"- {r.key} {r.metric}: {r.verdict}" + (f" ({r.note})" if r.note else "")
              + ("" if r.delta is None else f", {_fmt(r.baseline)} → {_fmt(r.new)}") + _evidence(r)
              for r in failed]
    lines += [f"- {r.key} {r.metric}: improved {_fmt(r.baseline)} → {_fmt(r.new)}" + _evidence(r)
              for r in improved]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def runs_of(params: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every (dataset, arch, seed) the profile runs: the runs the gate reads and judges."""
    return [(ds, arch, seed) for ds in get(params, "datasets") for arch in get(params, "archs")
            for seed in seeds_of(params)]


def metrics_dir(workdir: Path, params: dict[str, Any], dataset: str, arch: str, seed: int) -> Path:
    """A run's metrics folder in its dataset's shard: what the gate reads of that run."""
    return run_dir(shard_dir(workdir, dataset) / str(get(params, "paths.metrics")), dataset, arch, seed)


def read_results(workdir: Path, params: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{dataset/arch/seed-<seed>: metrics}`` of every shard: train.json overlaid by test.json.

    Only the datasets x archs x seeds the profile runs count: stale folders from an
    earlier profile must not stand in for a result that is no longer produced.
    """
    out = {}
    for ds, arch, seed in runs_of(params):
        key = run_key(ds, arch, seed)
        merged: dict[str, float] = {}
        for name in ("train.json", "test.json"):
            p = metrics_dir(workdir, params, ds, arch, seed) / name
            if p.is_file():
                try:
                    merged.update({k: float(v) for k, v in json.loads(p.read_text()).items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
                except ValueError:
                    raise MnistlabError(f"{p}: not valid JSON") from None
        if merged:
            out[key] = merged
    return out


def read_correct(workdir: Path, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{dataset/arch/seed-<seed>: bool [N]}``: which test images each shard's model got right.

    From each ``predictions.csv`` (:func:`mnistlab.artifacts.read_predictions`), for the
    datasets x archs x seeds the profile runs; an entry without the file is left out.
    """
    from mnistlab import artifacts  # here: it imports torch, which `check` otherwise never needs

    out = {}
    for ds, arch, seed in runs_of(params):
        p = metrics_dir(workdir, params, ds, arch, seed) / artifacts.PREDICTIONS
        if p.is_file():
            actual, predicted = artifacts.read_predictions(p)
            out[run_key(ds, arch, seed)] = actual == predicted
    return out


def read_baseline(path: Path) -> dict[str, Any]:
    """The committed baseline (``results``: {dataset/arch/seed-<seed>: {metric: value}}, profile digest)."""
    try:
        base = json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistlabError(f"{path}: no baseline yet; create it with `make baseline`") from None
    except ValueError:
        raise MnistlabError(f"{path}: not valid JSON") from None
    if not isinstance(base, dict) or not isinstance(base.get("results"), dict):
        raise MnistlabError(f"{path}: not a gate baseline (needs a 'results' mapping)")
    return base


def runs_differ(base: dict[str, Any], params: dict[str, Any], baseline_path: Path) -> str | None:
    """Why the runs ``params`` makes are not the ones the baseline holds; None when they are.

    Why: the CI copies take datasets' archs and seeds from the working tree's params.yaml,
    which ``dvc exp run -S 'seeds=[1,2,3]'`` leaves edited; the gate then listed every
    baseline run as MISSING (110 rows) and never said that the params were the difference.
    """
    def dims(keys) -> list[list[str]]:
        parts = [k.rsplit("/", 2) for k in keys if k.count("/") == 2]  # dataset/arch/seed-<seed>
        seeds = sorted({p[2].removeprefix("seed-") for p in parts}, key=lambda x: (len(x), x))
        return [sorted({p[0] for p in parts}), sorted({p[1] for p in parts}), seeds]

    have = set(base.get("results", {}))
    want = {run_key(*run) for run in runs_of(params)}
    if have == want:
        return None
    diffs = [f"{name} {', '.join(n) or 'none'} (baseline: {', '.join(b) or 'none'})"
             for name, n, b in zip(("datasets", "archs", "seeds"), dims(want), dims(have),
                                   strict=True) if n != b]
    what = "; ".join(diffs) or f"{len(want ^ have)} runs differ"
    return (f"the CI copies run other datasets x archs x seeds than {baseline_path} holds: {what}. "
            "params.yaml left edited by `dvc exp run -S`? `git checkout params.yaml`; "
            "after an intended change, `make baseline` and commit it")


def check(workdir: Path, profile: Path, baseline_path: Path,
          settings: dict[str, Any]) -> tuple[bool, str]:
    """Compare the copy's fresh results with the baseline, by the rules of ``settings`` (ci/gate.yaml).

    Returns:
        ``(passed, Markdown report)``.
    """
    params = load_params(workdir / "params.yaml")
    rules = gate_rules(settings)
    base = read_baseline(baseline_path)
    new = read_results(workdir, params)
    problems = []
    digest = json_digest(load_profile(profile))
    if base.get("profile_digest") != digest:
        problems.append(f"{baseline_path} was made with another {profile.name} (profile digest "
                        f"differs); compare like with like: run `make baseline` and commit it")
    differ = runs_differ(base, params, baseline_path)
    if differ:
        problems.append(differ)
    correct = base.get("correct") or {}
    if not isinstance(correct, dict):
        raise MnistlabError(f"{baseline_path}: 'correct' must map each run to a 0/1 string")
    rows = compare_results(base["results"], new, rules, correct, read_correct(workdir, params))
    rows += check_best(new, setting(settings, "require_best") or {})
    passed = not problems and not any(r.verdict in FAILING for r in rows)
    return passed, render(rows, problems, f"Regression gate: {workdir} vs {baseline_path}")


def accept(root: Path, workdir: Path, profile: Path, baseline_path: Path,
           settings: dict[str, Any]) -> dict[str, Any]:
    """Write the copy's current results as the new baseline (only the metrics ``settings`` gates).

    With them, ``correct``: each entry's per-image outcomes, for ``judge: evidence``.
    """
    import torch

    params = load_params(workdir / "params.yaml")
    rules = gate_rules(settings)
    new = read_results(workdir, params)
    correct = read_correct(workdir, params)
    expected = [run_key(*run) for run in runs_of(params)]
    missing = [k for k in expected if not set(rules) <= set(new.get(k, {}))]
    if missing:
        raise MnistlabError(f"{workdir}: no complete results for {', '.join(missing)} "
                            "(run the CI pipeline first: make ci-pipeline)")
    baseline = {
        "about": "Results of the CI profile, accepted with `make baseline`. Regenerate, never edit.",
        "profile": str(profile.relative_to(root) if profile.is_relative_to(root) else profile),
        "profile_digest": json_digest(load_profile(profile)),
        "made_with": {**git_info(root, pipeline_outputs(params)), "python": platform.python_version(),
                      "torch": torch.__version__, "machine": platform.machine(),
                      "processor": platform.processor() or "unknown"},
        "results": {k: {m: new[k][m] for m in rules} for k in expected},
        # per test image, in test-file order: 1 = right. What `judge: evidence` tests against.
        "correct": {k: encode_correct(v) for k, v in correct.items() if k in expected},
    }
    write_json(baseline_path, baseline)
    return baseline


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (1: the gate failed)."""
    ap = argparse.ArgumentParser(prog="python -m mnistlab.ci.gate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("prepare", "pipeline", "check", "accept"),
                    help="prepare: make the CI copy; pipeline: prepare + dvc repro there; "
                         "check: compare with the baseline (exit 1 on regression); "
                         "accept: make the current results the baseline")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (default: .)")
    ap.add_argument("--config", type=Path, default=None,
                    help=f"the gate's settings (default: <root>/{CONFIG})")
    ap.add_argument("--workdir", type=Path, default=None,
                    help=f"the CI copy (default: workdir of {CONFIG})")
    ap.add_argument("--profile", type=Path, default=None, help=f"default: profile of {CONFIG}")
    ap.add_argument("--baseline", type=Path, default=None, help=f"default: baseline of {CONFIG}")
    ap.add_argument("--summary", type=Path, default=None,
                    help="also append the report here (e.g. $GITHUB_STEP_SUMMARY)")
    ap.add_argument("--jobs", type=_positive_int, default=None,
                    help=f"pipeline: copies run at once (default: jobs of {CONFIG}); results do "
                         "not depend on it, only the wall time")
    args = ap.parse_args(argv)

    root = args.root.resolve()
    settings = load_settings(args.config or root / CONFIG)
    workdir = args.workdir or root / str(setting(settings, "workdir"))
    profile = args.profile or root / str(setting(settings, "profile"))
    baseline = args.baseline or root / str(setting(settings, "baseline"))

    if args.command in ("prepare", "pipeline"):
        prepare(root, workdir, profile)
        if args.command == "pipeline":
            if args.jobs is not None:
                settings = {**settings, "jobs": args.jobs}  # argparse checked it (_positive_int)
            params = load_params(workdir / "params.yaml")
            try:
                differ = baseline.is_file() and runs_differ(read_baseline(baseline), params, baseline)
            except MnistlabError:  # an unreadable baseline: `check` says so; `make baseline` replaces it
                differ = None
            if differ:  # not an error: `make baseline` runs the pipeline after such a change
                log.warning("%s", differ)
            run_pipeline(workdir, params, settings)
        return 0
    if args.command == "accept":
        base = accept(root, workdir, profile, baseline, settings)
        print(f"{baseline}: {len(base['results'])} results accepted as the baseline; commit it")
        return 0
    passed, report = check(workdir, profile, baseline, settings)
    print(report, end="")
    with atomic_path(workdir / "gate-report.md") as tmp:
        tmp.write_text(report)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(report)
    if not passed:
        print("error: regression gate failed (see the table above)", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    run_script(main)
