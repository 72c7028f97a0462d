"""``make exps``: ``dvc exp show`` cut to the columns that compare runs, with short column names.

    python -m mnistlab.exps DVC_EXP_SHOW_ARGS...

DVC names a run's metric by its file (``metrics/digits/cnn_32_64/seed-1234/test.json:test_accuracy``,
~60 characters without a space to wrap at) and cuts its table at 1,024 characters: with six
archs, every column after the third arch's was silently left out, the changed params with
them. So the same ``dvc exp show`` (the Makefile's filters and the user's ``ARGS``) runs
here as CSV and is printed with a two-line header: what varies of dataset, arch and seed on
the first line (``cnn_32_64``), the metric on the second (``test acc``). With an output
format of DVC's own among the arguments (``--csv``, ``--json``, ``--md``), DVC's output is
passed through unchanged.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

from mnistlab.errors import MnistlabError, exit_after, run_stage

FORMATS = ("--csv", "--json", "--md")
# metrics/<ds>/<arch>/seed-<seed>/<file>.json:<key>, as dvc.yaml's train and evaluate stages write them
RUN_METRIC = re.compile(r"^metrics/(?P<ds>[^/]+)/(?P<arch>[^/]+)/seed-(?P<seed>[^/]+)/\w+\.json:(?P<key>.+)$")
SHORT = {"test_accuracy": "test acc", "best_val_accuracy": "best val acc",
         "train_seconds": "train s"}
NAME_COLUMNS = ("Experiment", "rev")


def headers(columns: list[str]) -> list[str]:
    """Each column's two-line header: ``<what varies of ds/arch/seed>\\n<metric>`` for a run's
    metric; a param keeps its name (without ``params.yaml:``), on the second line."""
    runs = [m.groupdict() for c in columns if (m := RUN_METRIC.match(c))]
    varying = [k for k in ("ds", "arch", "seed") if len({r[k] for r in runs}) > 1] or ["arch"]
    out = []
    for c in columns:
        if m := RUN_METRIC.match(c):
            who = "/".join(m[k] for k in varying)
            out.append(f"{who}\n{SHORT.get(m['key'], m['key'])}")
        else:
            name = c.removeprefix("params.yaml:")
            out.append(f"\n{SHORT.get(name, name)}")
    return out


def cell(key: str, value: str) -> str:
    """A CSV value of metric or param ``key`` as shown: accuracies to 4 decimals, seconds to 1,
    anything else as DVC wrote it."""
    try:
        number = float(value)
    except ValueError:
        return value
    if key.endswith("_seconds"):
        return f"{number:.1f}"
    return f"{number:.4f}" if "accuracy" in key else value


def table(text: str) -> str:
    """``dvc exp show --csv``'s output as a plain-text table (the experiment named by ``rev``
    where it has no name: the workspace and the baseline commit)."""
    from tabulate import tabulate

    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return ""
    columns, body = rows[0], rows[1:]
    runs = [RUN_METRIC.match(c) for c in columns]
    keys = [m["key"] if m else c for m, c in zip(runs, columns, strict=True)]
    named = [i for i, c in enumerate(columns) if c in NAME_COLUMNS]
    rest = [i for i in range(len(columns)) if i not in named]
    # each run's metrics together, in SHORT's order (DVC puts train.json's before test.json's)
    order, first = list(SHORT), {}
    for i in rest:
        if m := runs[i]:
            first.setdefault((m["ds"], m["arch"], m["seed"]), i)

    def place(i: int) -> tuple[int, int]:
        if not (m := runs[i]):
            return i, -1
        return (first[m["ds"], m["arch"], m["seed"]],
                order.index(m["key"]) if m["key"] in order else len(order))

    rest = sorted(rest, key=place)
    shown = [[next((r[i] for i in named if r[i]), "")] + [cell(keys[i], r[i]) for i in rest]
             for r in body]
    return tabulate(shown, ["\nExperiment", *headers([columns[i] for i in rest])],
                    tablefmt="simple", disable_numparse=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv

    def run() -> int:
        cmd = ["dvc", "exp", "show", *args]
        try:
            if any(a in FORMATS for a in args):
                return subprocess.run(cmd).returncode
            p = subprocess.run([*cmd, "--csv"], capture_output=True, text=True)
        except FileNotFoundError:
            raise MnistlabError("dvc not found on PATH: run `make exps` (it sets up .venv)") from None
        if p.returncode != 0:
            sys.stderr.write(p.stderr)  # DVC's own error line
            return p.returncode
        print(table(p.stdout))
        return 0

    run_stage(run)


if __name__ == "__main__":
    exit_after(main)
