"""Stage ``compare``: one leaderboard over every dataset x arch, curves, and the champions.

Reads what the train and evaluate stages wrote (``metrics/<run>/{train,test}.json``,
``history.csv``; ``models/<run>/run.json``, ``<run>`` = ``<ds>/<arch>/seed-<seed>``) for the
``datasets`` x ``archs`` x ``seeds`` of params.yaml, and writes

    reports/leaderboard.csv, reports/leaderboard.md   one row per dataset x arch, ranked per dataset
    reports/runs.csv                                   one row per dataset x arch x seed
    reports/curves/val-curves-<ds>.png                 every arch's validation curves overlaid
    reports/pairwise/<ds>.csv                          McNemar's test of every pair of archs (no rows: one arch)
    reports/curves/pairwise-<ds>.png                   the same as a heat map (two archs or more)
    reports/champions.json                             the registered champion of each dataset
    exports/<ds>/champion.onnx, champion.json          each dataset's rank-1 model in ONNX

Why under ``reports/`` and not ``metrics/``: this stage depends on the whole
``metrics/`` tree, and DVC refuses a stage whose output lies inside its own
dependency (it would be a cycle). The ONNX files go to a folder of their own,
``exports/`` (``paths.exports``): not ``models/<ds>/<arch>/`` (the train stage's output
and this stage's dependency), not ``reports/`` (pictures and the git-tracked
leaderboard); like ``models/`` it is DVC-cached and git-ignored.

Seeds: with one seed (the default) a row is that run. With several, a row is the arch's mean
over its seeds (``test_accuracy`` and every other number), ranked by that mean, with
``accuracy_std`` (sample std over seeds) and ``seeds`` (how many); ``best_seed`` is the seed
of its best run by ``rank_by``, the model a champion registers and exports.

Whether a rank means anything: each row has a 95 % interval of its test accuracy
(``accuracy_ci_low/high``; ``ci`` says which): with one seed Wilson's interval from that
run's test predictions (test-set sampling), with several Student's t interval of the
mean over seeds (training variance). ``p_vs_best`` tests the arch against the dataset's
rank-1 arch, Holm-adjusted over the dataset's comparisons with its rank-1 arch (``test``
says which): with one seed McNemar's exact test on the same test images
(``predictions.csv``), with several Welch's t-test of the two archs' per-seed
accuracies. ``below_best`` is ``yes`` where that p-value is below :data:`ALPHA`. The
pairwise files test every pair with McNemar at the first of ``seeds`` (paired
predictions need one run per arch; their ``seed`` column says which), Holm-adjusted
over all pairs of the dataset (a larger family, so with one seed ``p_holm`` there is
never smaller than ``p_vs_best`` for the same pair). See :mod:`mnistlab.stats`.

Each dataset's rank-1 model is exported to ONNX (:func:`mnistlab.export.export_onnx`:
raw pixels in, probabilities out, checked against PyTorch on that dataset's test
split) and, when champions are registered, logged to the champion's MLflow run
(``onnx/champion.onnx``, ``onnx/champion.json``).

Each dataset's best model is registered in the MLflow model registry as
``<compare.registry_prefix>-<dataset>`` and given the alias ``compare.alias``
(``champion``), so ``models:/mnistlab-digits@champion`` always loads the current best.

Being the last stage, it prints the leaderboard and then where to look
(:func:`where_to_look`): the files, each champion, the MLflow UI command for the
tracking URI in use (credentials removed), ``dvc plots show`` and ``make predict``.
"""

from __future__ import annotations

import csv
import logging
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mnistlab import artifacts, plots, tracking
from mnistlab.config import RANKABLE, CompareSettings, run_dir, run_key
from mnistlab.errors import MnistlabError
from mnistlab.stats import holm, mcnemar, seed_interval, welch
from mnistlab.utils import Staging, staged, write_json

log = logging.getLogger(__name__)

# Leaderboard columns that can rank it, with their direction (True: higher is better).
# Averaged over an arch's seeds on the leaderboard (one value per run in runs.csv).
MEANS = ["test_accuracy", "test_loss", "macro_f1", "parameters", "train_seconds",
         "images_per_second", "epochs", "best_val_accuracy"]
RUN_COLUMNS = ["dataset", "arch", "seed", *MEANS, "accuracy_ci_low", "accuracy_ci_high"]
# The columns of one seed's leaderboard first, in their order (readers of the CSV keep
# working), then those the seeds added.
COLUMNS = ["dataset", "rank", "arch", "test_accuracy", "test_loss", "macro_f1", "parameters",
           "train_seconds", "images_per_second", "epochs", "best_val_accuracy",
           "accuracy_ci_low", "accuracy_ci_high", "p_vs_best", "below_best",
           "seeds", "accuracy_std", "ci", "test", "best_seed"]
ALPHA = 0.05  # family-wise error rate of ``below_best`` (after Holm)
PAIRWISE = ["seed", "arch_a", "arch_b", "a_only", "b_only", "p_value", "p_holm"]


@dataclass(frozen=True)
class ComparePaths:
    """Every file ``compare`` reads or writes; dvc.yaml passes each one in."""

    metrics: Path  # metrics/: <ds>/<arch>/seed-<seed>/{train.json, test.json, history.csv}
    models: Path   # models/: <ds>/<arch>/seed-<seed>/run.json
    out: Path      # reports/: leaderboard.csv, leaderboard.md, runs.csv, champions.json
    curves: Path   # reports/curves/: val-curves-<ds>.png, pairwise-<ds>.png
    split: Path | None = None    # data/split/: <ds>/test.pt, for the ONNX check
    exports: Path | None = None  # exports/: <ds>/champion.{onnx,json} (None: no ONNX export)
    pairwise: Path | None = None  # reports/pairwise/: <ds>.csv (None: not written)


def read_history(path: Path) -> pd.DataFrame:
    """A train stage's ``history.csv`` (one row per epoch)."""
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise MnistlabError(f"{path}: missing (run its train stage)") from None
    except (ValueError, pd.errors.ParserError) as e:
        raise MnistlabError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = {"epoch", "val_accuracy", "val_loss"} - set(df.columns)
    if missing:
        raise MnistlabError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return df


def collect(metrics_root: Path, datasets: list[str], archs: list[str],
            seeds: list[int]) -> pd.DataFrame:
    """One row per (dataset, arch, seed) from its ``train.json`` and ``test.json`` (runs.csv).

    The accuracy's interval is NaN for a ``test.json`` written before evaluate had it.
    """
    rows = []
    for ds in datasets:
        for arch in archs:
            for seed in seeds:
                d = run_dir(metrics_root, ds, arch, seed)
                train = artifacts.read_json(d / artifacts.TRAIN_METRICS)
                test = artifacts.read_json(d / artifacts.TEST_METRICS)
                try:
                    rows.append({
                        "dataset": ds, "arch": arch, "seed": seed,
                        "test_accuracy": float(test["test_accuracy"]),
                        "test_loss": float(test["test_loss"]),
                        "macro_f1": float(test["macro_f1"]),
                        "parameters": int(train["parameters"]),
                        "train_seconds": float(train["train_seconds"]),
                        "images_per_second": float(train["train_images_per_second"]),
                        "epochs": int(train["epochs"]),
                        "best_val_accuracy": float(train["best_val_accuracy"]),
                        "accuracy_ci_low": float(test.get("test_accuracy_ci_low", math.nan)),
                        "accuracy_ci_high": float(test.get("test_accuracy_ci_high", math.nan)),
                    })
                except KeyError as e:
                    raise MnistlabError(f"{d}: train.json/test.json lack key {e.args[0]!r} "
                                        "(re-run its train/evaluate stage)") from None
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def best_run(runs: pd.DataFrame, rank_by: str) -> pd.Series:
    """The best of one arch's runs by ``rank_by`` (ties: lower test loss, then the earlier seed)."""
    keys, asc = [rank_by, "test_loss"], [not RANKABLE[rank_by], True]
    if rank_by == "test_loss":
        keys, asc = keys[1:], asc[1:]
    return runs.sort_values(keys, ascending=asc, kind="stable").iloc[0]


def aggregate(runs: pd.DataFrame, rank_by: str) -> pd.DataFrame:
    """One row per (dataset, arch): the mean over its seeds, their spread and a 95 % interval.

    ``ci``: ``wilson`` for a single run (its ``test.json`` interval: test-set sampling), else
    ``t, <n> seeds`` (:func:`mnistlab.stats.seed_interval`: training variance of the mean,
    clipped to [0, 1]).
    Rows keep the order of ``runs`` (params.yaml's datasets, then archs).
    """
    rows = []
    for (ds, arch), g in runs.groupby(["dataset", "arch"], sort=False):
        row = {"dataset": ds, "arch": arch, "seeds": len(g),
               **{c: float(g[c].mean()) for c in MEANS},
               "accuracy_std": float(g["test_accuracy"].std(ddof=1)) if len(g) > 1 else math.nan,
               "best_seed": int(best_run(g, rank_by)["seed"])}
        row["parameters"] = int(g["parameters"].iloc[0])  # one network, whatever the seed
        if len(g) == 1:
            row["accuracy_ci_low"], row["accuracy_ci_high"] = (
                float(g["accuracy_ci_low"].iloc[0]), float(g["accuracy_ci_high"].iloc[0]))
            row["ci"] = "wilson"
        else:
            lo, hi = seed_interval(g["test_accuracy"])
            # Clipped to an accuracy's range. A t interval that reaches past it says the seeds
            # spread too far for the normal model behind it (lenet5 on digits: 0.23 to 0.96);
            # the std beside it says how far.
            row["accuracy_ci_low"], row["accuracy_ci_high"] = max(lo, 0.0), min(hi, 1.0)
            row["ci"] = f"t, {len(g)} seeds"
        rows.append(row)
    return pd.DataFrame(rows)


def read_correct(metrics_root: Path, dataset: str, archs: list[str], seed: int
                 ) -> dict[str, np.ndarray]:
    """``{arch: bool [N]}``: which test images each arch's run at ``seed`` got right
    (its ``predictions.csv``).

    An arch without the file is left out (with a warning): its rows get no p-value.
    All archs of a dataset must have been scored on the same images in the same order,
    or a paired test would compare different things.
    """
    out: dict[str, np.ndarray] = {}
    reference: tuple[str, np.ndarray] | None = None
    for arch in archs:
        path = run_dir(metrics_root, dataset, arch, seed) / artifacts.PREDICTIONS
        if not path.is_file():
            log.warning("%s: missing; %s gets no paired test (re-run its evaluate stage)",
                        path, run_key(dataset, arch, seed))
            continue
        actual, predicted = artifacts.read_predictions(path)
        if reference is None:
            reference = (arch, actual)
        elif not np.array_equal(actual, reference[1]):
            raise MnistlabError(f"{path}: not the test images of "
                                f"{run_key(dataset, reference[0], seed)} "
                                "(re-run the evaluate stages of this dataset)")
        out[arch] = actual == predicted
    return out


def versus_best(part: pd.DataFrame, correct: dict[str, np.ndarray],
                accuracies: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """``p_vs_best``, ``test`` and ``below_best`` of one dataset's ranked rows (rank 1 first).

    Each arch is tested against the rank-1 arch: where both have two or more seeds
    (``accuracies``: {arch: per-seed test accuracies}), with Welch's t-test of those
    accuracies; else with McNemar's exact test on the same test images (``correct``: one
    run each). The p-values are Holm-adjusted together (one family per dataset).
    ``below_best`` is ``yes`` where the adjusted p-value is below :data:`ALPHA` and the arch
    did worse (fewer images right; a lower mean), ``n/a`` where there is nothing to test,
    else ``no``.
    """
    part = part.copy()
    part["p_vs_best"] = math.nan
    part["test"] = ""
    part["below_best"] = "n/a"
    best = part["arch"].iloc[0]
    part.iloc[0, part.columns.get_loc("below_best")] = "no"
    accuracies = accuracies or {}
    tests: list[tuple[Any, str, float, bool]] = []  # (row, test, p, worse)
    for i, arch in zip(part.index[1:], part["arch"].iloc[1:], strict=True):
        a, b = accuracies.get(best, ()), accuracies.get(arch, ())
        if len(a) > 1 and len(b) > 1:
            p = welch(a, b)
            if not math.isnan(p):
                tests.append((i, "welch", p, float(np.mean(b)) < float(np.mean(a))))
        elif arch in correct and best in correct:
            t = mcnemar(correct[best], correct[arch])
            tests.append((i, "mcnemar", t.p_value, t.b_only < t.a_only))
    if not tests:
        return part
    for (i, name, _, worse), p in zip(tests, holm([t[2] for t in tests]), strict=True):
        part.at[i, "p_vs_best"] = p
        part.at[i, "test"] = name
        part.at[i, "below_best"] = "yes" if p < ALPHA and worse else "no"
    return part


def leaderboard(runs: pd.DataFrame, rank_by: str,
                correct: dict[str, dict[str, np.ndarray]] | None = None) -> pd.DataFrame:
    """Rank each dataset's archs by the mean of ``rank_by`` over their seeds; ties go to the
    lower mean test loss, then the smaller model.

    ``runs``: one row per dataset x arch x seed (:func:`collect`). Datasets keep their
    params.yaml order. ``correct`` ({dataset: {arch: bool [N]}}, :func:`read_correct`) gives
    the paired tests against each dataset's rank 1 where an arch has a single seed.
    """
    higher = RANKABLE[rank_by]
    df = aggregate(runs, rank_by)
    parts = []
    for ds in dict.fromkeys(df["dataset"]):
        part = df[df["dataset"] == ds].copy()
        keys, asc = [rank_by, "test_loss", "parameters"], [not higher, True, True]
        if rank_by == "test_loss":
            keys, asc = keys[1:], asc[1:]
        part = part.sort_values(keys, ascending=asc, kind="stable")
        part["rank"] = range(1, len(part) + 1)
        mine = runs[runs["dataset"] == ds]
        accuracies = {a: g["test_accuracy"].to_numpy() for a, g in mine.groupby("arch", sort=False)}
        parts.append(versus_best(part, (correct or {}).get(ds, {}), accuracies))
    return pd.concat(parts, ignore_index=True)[COLUMNS]


def pairwise(correct: dict[str, np.ndarray], archs: list[str], seed: int) -> pd.DataFrame:
    """McNemar's test of every pair of ``archs`` (in that order, e.g. by rank), Holm-adjusted together.

    ``correct``: each arch's run at ``seed`` (:func:`read_correct`). ``a_only``/``b_only``:
    test images only ``arch_a``/``arch_b`` gets right.
    """
    archs = [a for a in archs if a in correct]
    rows = []
    for i, a in enumerate(archs):
        for b in archs[i + 1:]:
            t = mcnemar(correct[a], correct[b])
            rows.append({"seed": seed, "arch_a": a, "arch_b": b, "a_only": t.a_only,
                         "b_only": t.b_only, "p_value": t.p_value})
    out = pd.DataFrame(rows, columns=PAIRWISE[:-1])
    out["p_holm"] = holm(out["p_value"].to_numpy())
    return out


def plot_pairwise(pairs: pd.DataFrame, archs: list[str], dataset: str, seed: int, path: Path
                  ) -> None:
    """The pairwise table as a heat map: Holm-adjusted p-value per pair (dark: strong evidence)."""
    archs = [a for a in archs if a in set(pairs["arch_a"]) | set(pairs["arch_b"])] or archs
    idx = {a: i for i, a in enumerate(archs)}
    m = np.full((len(archs), len(archs)), np.nan)
    for r in pairs.itertuples():
        m[idx[r.arch_a], idx[r.arch_b]] = m[idx[r.arch_b], idx[r.arch_a]] = r.p_holm
    side = 1.2 + 0.9 * len(archs)
    fig = plots.figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(-np.log10(np.clip(m, 1e-12, 1.0)), cmap="Blues", vmin=0, vmax=6)
    for (i, j), p in np.ndenumerate(m):
        if not np.isnan(p):
            ax.text(j, i, f"{p:.2g}", ha="center", va="center", fontsize=8,
                    color="white" if p < 1e-3 else "black")
    ax.set_xticks(range(len(archs)), archs, rotation=45, ha="right")
    ax.set_yticks(range(len(archs)), archs)
    ax.set_title(f"{dataset} (seed {seed}): McNemar p (Holm), α = {ALPHA}")
    fig.colorbar(im, ax=ax, label="-log10 p")
    plots.save(fig, path)


def to_markdown(board: pd.DataFrame) -> str:
    """The leaderboard as a GitHub Markdown table, numbers rounded for reading.

    The interval's two columns become one, ``accuracy_ci``: ``0.9912 [0.9893, 0.9928]``.
    With several seeds ``test_accuracy`` reads ``mean ± std``; with one seed per arch the
    columns that only say "one seed" (``seeds``, ``accuracy_std``, ``best_seed``, ``ci``:
    Wilson, ``test``: McNemar) are left out, as the page's header says.
    """
    fmt = board.copy()
    multi = bool((board["seeds"] > 1).any())
    fmt["test_accuracy"] = [f"{m:.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f}")
                            for m, sd in zip(board["test_accuracy"], board["accuracy_std"],
                                             strict=True)]
    for col in ("macro_f1", "best_val_accuracy", "test_loss"):
        fmt[col] = fmt[col].map(lambda v: f"{v:.4f}")
    fmt["epochs"] = board["epochs"].map(lambda v: f"{v:g}")
    fmt["parameters"] = fmt["parameters"].map(lambda v: f"{v:,}")
    fmt["train_seconds"] = fmt["train_seconds"].map(lambda v: f"{v:.1f}")
    fmt["images_per_second"] = fmt["images_per_second"].map(lambda v: f"{v:,.0f}")
    ci = [("—" if math.isnan(lo) else f"{acc:.4f} [{lo:.4f}, {hi:.4f}]") for acc, lo, hi in
          zip(board["test_accuracy"], board["accuracy_ci_low"], board["accuracy_ci_high"], strict=True)]
    fmt.insert(fmt.columns.get_loc("accuracy_ci_low"), "accuracy_ci", ci)
    fmt["test"] = board["test"].map(lambda v: v or "—")
    fmt["p_vs_best"] = board["p_vs_best"].map(lambda v: "—" if math.isnan(v) else f"{v:.2g}")
    fmt = fmt.drop(columns=["accuracy_std", "accuracy_ci_low", "accuracy_ci_high"])
    if multi:  # how many seeds beside the arch; how the interval and the test were made beside them
        fmt = fmt[["dataset", "rank", "arch", "seeds", "test_accuracy", "test_loss", "macro_f1",
                   "parameters", "train_seconds", "images_per_second", "epochs",
                   "best_val_accuracy", "accuracy_ci", "ci", "p_vs_best", "test", "below_best",
                   "best_seed"]]
    else:
        fmt = fmt.drop(columns=["seeds", "best_seed", "ci", "test"])
    return fmt.to_markdown(index=False, disable_numparse=True) + "\n"


def plot_curves(metrics_root: Path, dataset: str, archs: list[str], seeds: list[int],
                path: Path) -> None:
    """Validation accuracy and loss per epoch, every arch on the same axes (one colour per
    arch, one line per seed).

    The x axis is logarithmic: with ``train.min_steps`` the archs run from a few
    to over a hundred epochs, and a linear axis would squash the short runs.
    """
    fig = plots.figure(figsize=(12, 4.5), dpi=100)
    acc, loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, arch in enumerate(archs):
        for j, seed in enumerate(seeds):
            h = read_history(run_dir(metrics_root, dataset, arch, seed) / artifacts.HISTORY)
            # markers on short runs: a one-epoch run is a single point, invisible as a line
            style = {"lw": 1.5 if len(seeds) == 1 else 1.0, "marker": "o" if len(h) <= 12 else None,
                     "ms": 3, "color": f"C{k % 10}", "alpha": 1.0 if len(seeds) == 1 else 0.6,
                     "label": arch if j == 0 else None}
            acc.plot(h["epoch"], h["val_accuracy"], **style)
            loss.plot(h["epoch"], h["val_loss"], **style)
    for ax, name in ((acc, "validation accuracy"), (loss, "validation loss")):
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"{dataset}: {name}" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
        ax.grid(alpha=0.3, which="both")
    loss.set_yscale("log")
    acc.legend(fontsize=8, loc="lower right")
    plots.save(fig, path)


# --------------------------------------------------------------------------- model registry


@tracking.retry_locked
def _logged_model_uri(c, run_id: str) -> str:
    """URI of the model the train stage logged in ``run_id``.

    MLflow 3 keeps logged models as their own entities (``models:/<model_id>``);
    older servers only know ``runs:/<run_id>/model``.
    """
    run = c.get_run(run_id)
    search = getattr(c, "search_logged_models", None)
    if search is None:
        return f"runs:/{run_id}/model"
    found = search(experiment_ids=[run.info.experiment_id],
                   filter_string=f"source_run_id = '{run_id}'",
                   order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    models = [m for m in found if m.name == "model"]
    if not models:
        raise MnistlabError(f"MLflow run {run_id} has no logged model 'model' (re-run its train stage)")
    return f"models:/{models[0].model_id}"


@tracking.retry_locked
def register_champion(name: str, run_id: str, alias: str, tags: dict[str, str]) -> str:
    """Register ``run_id``'s model under ``name`` (reusing a version from that run) and alias it.

    Returns:
        The version that now carries ``alias``.
    """
    c = tracking.client()
    try:
        c.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a missing run
        if not tracking.missing(e):
            raise
        raise MnistlabError(f"MLflow run {run_id} not found in {tracking.redact(tracking.tracking_uri())} "
                            "(was it trained with another MLFLOW_TRACKING_URI?)") from None
    try:
        c.get_registered_model(name)
    except Exception as e:  # noqa: BLE001 - not registered yet
        if not tracking.missing(e):
            raise
        c.create_registered_model(name, description="Best mnistlab model for one dataset; "
                                                    "the alias marks the current champion.")
    existing = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:  # re-running compare with the same winner adds no version
        version = str(max(int(v.version) for v in existing))
    else:
        source = _logged_model_uri(c, run_id)
        kw = {"model_id": source.split("/", 1)[1]} if source.startswith("models:/") else {}
        # MLflow's sqlite registry resolves a models:/ source through the process-global
        # tracking URI (its own "TODO" says so), not this client's: pin it to our store,
        # or a URI left behind by other code in the process names a store without the model.
        with tracking.fluent_uri(tracking.tracking_uri()):
            try:
                mv = c.create_model_version(name, source, run_id=run_id, tags=tags, **kw)
            except TypeError:  # MLflow 2: no model_id argument
                mv = c.create_model_version(name, source, run_id=run_id, tags=tags)
        version = str(mv.version)
    c.set_registered_model_alias(name, alias, version)
    return version


def register_champions(board: pd.DataFrame, runs: pd.DataFrame, models_root: Path, prefix: str,
                       alias: str) -> dict[str, dict[str, Any]]:
    """Register each dataset's rank-1 model (its arch's ``best_seed`` run); return
    ``{dataset: {arch, seed, run_id, model, version, ...}}``.

    ``test_accuracy`` is the registered run's own; ``mean_test_accuracy`` the arch's mean
    over its seeds (what ranked it; the same number with one seed).
    """
    out = {}
    for row in board[board["rank"] == 1].itertuples():
        run = champion_run(board, runs, row.dataset)
        run_id = artifacts.read_run_id(
            run_dir(models_root, row.dataset, row.arch, run.seed) / artifacts.RUN)
        name = f"{prefix}-{row.dataset}"
        version = register_champion(name, run_id, alias, {
            "dataset": row.dataset, "arch": row.arch, "seed": str(run.seed),
            "test_accuracy": f"{run.test_accuracy:.6f}"})
        out[row.dataset] = {"arch": row.arch, "seed": int(run.seed), "run_id": run_id,
                            "registered_model": name, "version": version, "alias": alias,
                            "uri": f"models:/{name}@{alias}",
                            "test_accuracy": float(run.test_accuracy),
                            "mean_test_accuracy": float(row.test_accuracy), "seeds": int(row.seeds)}
        log.info("%s: champion %s seed %d (test_accuracy %.4f) -> %s version %s @%s", row.dataset,
                 row.arch, run.seed, run.test_accuracy, name, version, alias)
    return out


def champion_run(board: pd.DataFrame, runs: pd.DataFrame, dataset: str) -> Any:
    """The run a dataset's champion is: its rank-1 arch at that arch's ``best_seed``."""
    top = board[(board["dataset"] == dataset) & (board["rank"] == 1)].iloc[0]
    match = runs[(runs["dataset"] == dataset) & (runs["arch"] == top["arch"])
                 & (runs["seed"] == top["best_seed"])]
    return next(match.itertuples())


# --------------------------------------------------------------------------- the stage


def run_compare(params: dict[str, Any], paths: ComparePaths) -> pd.DataFrame:
    """Leaderboard, curves and champions for ``datasets`` x ``archs`` x ``seeds``; returns the
    leaderboard.

    Reads ``datasets``, ``archs``, ``seeds`` and the ``compare`` section of params.yaml.
    """
    s = CompareSettings.from_params(params)
    if s.register:
        tracking.check_reachable()  # before any compute is spent
    first = s.seeds[0]  # the paired (McNemar) tests need one run per arch: the first seed's
    correct = {ds: read_correct(paths.metrics, ds, list(s.archs), first) for ds in s.datasets}
    runs = collect(paths.metrics, list(s.datasets), list(s.archs), list(s.seeds))
    board = leaderboard(runs, s.rank_by, correct)

    # Every file is written to a staging folder and put in place at the end, champions.json
    # included, only when the registry and MLflow have taken everything: a failure anywhere
    # leaves the previous leaderboard, champions and exports as they were (not a new
    # leaderboard beside stale champions).
    with staged() as stage:
        board.to_csv(stage.path(paths.out / "leaderboard.csv"), index=False, float_format="%.6g",
                     quoting=csv.QUOTE_MINIMAL)
        runs.to_csv(stage.path(paths.out / "runs.csv"), index=False, float_format="%.6g")
        over = f", mean of {len(s.seeds)} seeds" if len(s.seeds) > 1 else ""
        stage.path(paths.out / "leaderboard.md").write_text(
            f"# Leaderboard (ranked by {s.rank_by}{over} within each dataset)\n\n"
            + to_markdown(board))
        for ds in s.datasets:
            plot_curves(paths.metrics, ds, list(s.archs), list(s.seeds),
                        stage.path(paths.curves / f"val-curves-{ds}.png"))
            ranked = board.loc[board["dataset"] == ds, "arch"].tolist()
            pairs = pairwise(correct[ds], ranked, first)
            if len(pairs):  # one arch (or one with predictions) makes no pair to draw
                plot_pairwise(pairs, ranked, ds, first,
                              stage.path(paths.curves / f"pairwise-{ds}.png"))
            # the table even with no rows: "no pairs" is an answer, and DVC warns of an
            # empty output folder
            if paths.pairwise is not None:
                pairs.to_csv(stage.path(paths.pairwise / f"{ds}.csv"), index=False,
                             float_format="%.6g")

        # ONNX first: an export that fails its check stops the stage before the registry changes.
        exported = export_champions(board, paths, stage) if paths.exports is not None else {}
        champions: dict[str, Any] = {}
        if s.register:
            champions = register_champions(board, runs, paths.models, s.registry_prefix, s.alias)
        for ds, onnx in exported.items():
            if ds in champions:
                tracking.log_artifacts(champions[ds]["run_id"], [onnx, onnx.with_suffix(".json")],
                                       "onnx")
                champions[ds]["onnx"] = str(paths.exports / ds / onnx.name)
        write_json(stage.path(paths.out / "champions.json"), champions)
    return board


def export_champions(board: pd.DataFrame, paths: ComparePaths, stage: Staging
                     ) -> dict[str, Path]:
    """Each dataset's rank-1 model → ``exports/<ds>/champion.onnx`` (+ ``.json``), checked
    against PyTorch on its test split, written to ``stage``; returns ``{dataset: staged file}``."""
    from mnistlab.export import export_onnx

    if paths.split is None or paths.exports is None:
        raise MnistlabError("compare: the ONNX export needs the split and exports folders")
    stage.folder(paths.exports)  # the DVC output exists even if empty
    out = {}
    for row in board[board["rank"] == 1].itertuples():
        final = paths.exports / row.dataset / "champion.onnx"
        onnx = stage.path(final)
        check = export_onnx(run_dir(paths.models, row.dataset, row.arch, row.best_seed)
                            / artifacts.MODEL, onnx, paths.split / row.dataset)["check"]
        log.info("%s: %s exported to %s (same class as PyTorch on %.2f%% of %d test images, "
                 "max |dp| %.1e)", row.dataset, row.arch, final, 100 * check["argmax_agreement"],
                 check["n"], check["max_abs_diff"])
        out[row.dataset] = onnx
    return out


# --------------------------------------------------------------------------- what the stage prints


def mlflow_pointer(uri: str) -> str:
    """How to look at the runs in ``uri``, with any credentials removed (:func:`tracking.redact`).

    A server (http/https/databricks) is opened as it is; a store (sqlite, file,
    postgresql...) is served with ``mlflow ui``, which binds 127.0.0.1 by default.
    """
    shown = tracking.redact(uri)
    if shown.partition(":")[0] in ("http", "https", "databricks"):
        line = f"open {shown}"
    else:
        line = f"mlflow ui --backend-store-uri {shlex.quote(shown)}"
    return line + ("  (credentials removed)" if shown != uri else "")


def where_to_look(board: pd.DataFrame, paths: ComparePaths,
                  champions: dict[str, dict[str, Any]]) -> str:
    """The block that ends the pipeline's output: where its results are and what to run next.

    Args:
        board: The ranked leaderboard (rank 1 of each dataset is its champion).
        paths: The stage's paths (leaderboard, curves, models).
        champions: ``champions.json``'s content: each registered champion's ``uri``
            (empty when ``compare.register`` is off: the champion's model.pt instead).
    """
    models = {}
    lines = ["", "Where to look:",
             f"  leaderboard  {paths.out / 'leaderboard.md'}  (curves: {paths.curves})"]
    for row in board[board["rank"] == 1].itertuples():
        models[row.dataset] = (champions.get(row.dataset, {}).get("uri")
                               or str(run_dir(paths.models, row.dataset, row.arch,
                                                        row.best_seed) / artifacts.MODEL))
        over = (f"mean test_accuracy {row.test_accuracy:.4f} over {row.seeds} seeds; seed "
                f"{row.best_seed}" if row.seeds > 1 else f"test_accuracy {row.test_accuracy:.4f}")
        lines.append(f"  champion     {row.dataset}: {row.arch} ({over}) -> {models[row.dataset]}")
    lines += [f"  MLflow       {mlflow_pointer(tracking.tracking_uri())}",
              "  DVC plots    dvc plots show  (writes dvc_plots/index.html)"]
    if models:
        first = next(iter(models.values()))
        lines.append(f"  predict      make predict ARGS=\"my-digit.png --model {first}\"")
    return "\n".join(lines) + "\n"


def report(params: dict[str, Any], paths: ComparePaths) -> str:
    """What ``stages/compare.py`` runs and prints: :func:`run_compare`, then the
    leaderboard and :func:`where_to_look` (compare is the last stage of ``dvc repro``)."""
    board = run_compare(params, paths)
    champions = artifacts.read_json(paths.out / "champions.json", "the compare stage")
    return to_markdown(board) + where_to_look(board, paths, champions)
