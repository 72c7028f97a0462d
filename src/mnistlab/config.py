"""Reading params.yaml and validating the sections stages use.

Every error names the exact params key, e.g. ``hparams.mlp.lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mnistlab.errors import MnistlabError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, refusing a key given twice in one mapping.

    Why the floats: PyYAML follows YAML 1.1, where a float needs a dot, so ``1e-06`` (which
    ``dvc exp run -S hparams.mlp.lr=1e-6`` writes, and DVC itself reads as a
    float) would arrive here as a string. Why the keys: PyYAML keeps the last of two
    ``seed:`` lines without a word, while DVC refuses the file; a stage run by hand would
    then use a value that ``dvc repro`` never accepts.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<:`` may override, by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                pass
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text as params.yaml is parsed (safe, with YAML 1.2 floats)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


# Every top-level key of params.yaml. Why a closed set: a typo such as ``hparam:`` would
# otherwise be ignored without a word (its section's defaults, or another error, would
# apply). A new setting is added here and to params.yaml together; dvc.yaml's
# ``${...}`` templates and ci/profile.yaml's overrides read only keys of this set.
PARAMS_KEYS = ("seed", "seeds", "datasets", "archs", "paths", "sources", "download", "split", "train",
               "hparams", "evaluate", "features", "compare")


def exp_origin(cwd: Path | None = None) -> Path | None:
    """The repo a queued or ``--temp`` DVC experiment runs for, when ``cwd`` is its throwaway copy.

    ``dvc exp run --queue`` / ``--temp`` run the stages in ``<repo>/.dvc/tmp/exps/<...>/``,
    a copy of the repo's tracked files that is deleted afterwards. There, what params.yaml
    or a default names relative to the repo root but outside its tracked files (a source
    folder such as ``../shared/datasets/mnist``, the default ``mlflow.db``) is found from
    ``<repo>``, as in the workspace. Returns None anywhere else (the working directory is
    the repo root, where DVC runs every stage).
    """
    for d in (cwd or Path.cwd()).absolute().parents:
        if d.name == "exps" and d.parent.name == "tmp" and d.parent.parent.name == ".dvc":
            return d.parent.parent.parent
    return None


def local_path(path: str) -> Path:
    """A local path from params.yaml: ``~`` expanded; a relative one from the repo root,
    also inside a queued or ``--temp`` experiment's copy (:func:`exp_origin`)."""
    p = Path(path).expanduser()
    origin = None if p.is_absolute() else exp_origin()
    return (origin / p).resolve() if origin is not None else p


def load_params(path: str | Path = "params.yaml", what: str = "params file",
                keys: tuple[str, ...] | None = PARAMS_KEYS) -> dict[str, Any]:
    """Load a YAML mapping such as params.yaml (a user error if missing, unreadable, not UTF-8,
    not YAML, not a mapping, or with a top-level key outside ``keys``).

    ``what`` names the file in the not-found message (e.g. "CI profile"); ``keys=None``
    for a file that is not params.yaml or an override of it (e.g. ci/gate.yaml).
    """
    path = Path(path)
    try:
        params = load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise MnistlabError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise MnistlabError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start}; save it as UTF-8)") from None
    except OSError as e:
        raise MnistlabError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise MnistlabError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise MnistlabError(f"{path}: expected a mapping at the top level")
    unknown = sorted(map(str, set(params) - set(keys))) if keys is not None else []
    if unknown:
        raise MnistlabError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                            f"(valid: {', '.join(keys)})")
    if keys is not None and "paths" in params:  # every stage writes there (check_paths)
        check_paths(params)
    return params


# The folders of params.yaml's ``paths``: where the stages write, all inside the repository.
PATH_KEYS = ("raw", "split", "models", "checkpoints", "metrics", "reports", "features", "exports")
# Names no class may have: the columns of the served model's answer (mnistlab.serving) besides
# one per class.
RESERVED_CLASS_NAMES = ("class", "probability")


def check_paths(params: dict[str, Any]) -> dict[str, str]:
    """params.yaml's ``paths``: keys of :data:`PATH_KEYS` only, each a relative folder inside
    the repository. (One that is missing is named by the stage that needs it.)

    Why: every stage writes there, and DVC deletes a stage's outputs before it runs it. An
    empty value would put ``raw/<ds>`` at the filesystem root (``/digits``), an absolute or
    ``..`` one outside the repository, where DVC refuses to track it only after the stage has
    written there; a number or null stops DVC itself with a traceback.
    """
    paths = params.get("paths")
    if not isinstance(paths, dict):
        raise MnistlabError("params.yaml: paths must map each of "
                            f"{', '.join(PATH_KEYS)} to a folder")
    unknown = sorted(map(str, set(paths) - set(PATH_KEYS)))
    if unknown:
        raise MnistlabError(f"params.yaml: paths: unknown key(s) {', '.join(unknown)} "
                            f"(valid: {', '.join(PATH_KEYS)})")
    for key, value in paths.items():
        if not isinstance(value, str) or not value.strip():
            raise MnistlabError(f"params.yaml: paths.{key} must be a folder name (got {value!r})")
        p = Path(value)
        if p.is_absolute() or ".." in p.parts or value.startswith("~"):
            raise MnistlabError(f"params.yaml: paths.{key}: {value!r} must be a relative folder "
                                "inside the repository (DVC tracks only those as outputs)")
    return paths


def get(params: dict[str, Any], key: str) -> Any:
    """``get(p, "a.b")`` → ``p["a"]["b"]``, or an error naming the missing key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise MnistlabError(f"params.yaml: missing key {key!r}")
        node = node[part]
    return node


def positive(key: str, value: Any, kind: type = float) -> Any:
    """Check ``value`` is a finite number > 0 (an int if ``kind`` is int)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise MnistlabError(f"params.yaml: {key} must be {what} (got {value!r})")
    return kind(value)


def non_negative(key: str, value: Any) -> float:
    """Check ``value`` is a finite number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
            or not math.isfinite(value)):
        raise MnistlabError(f"params.yaml: {key} must be a number >= 0 (got {value!r})")
    return float(value)


def number(key: str, value: Any) -> float:
    """Check ``value`` is a finite number (any sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MnistlabError(f"params.yaml: {key} must be a number (got {value!r})")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    """Check ``value`` is a YAML boolean (``"yes"`` as a string would silently be truthy)."""
    if not isinstance(value, bool):
        raise MnistlabError(f"params.yaml: {key} must be true or false (got {value!r})")
    return value


def choice(key: str, value: Any, valid: tuple[str, ...]) -> str:
    """Check ``value`` is one of ``valid``; the error lists them."""
    if value not in valid:
        raise MnistlabError(
            f"params.yaml: {key}: unknown value {value!r} (valid: {', '.join(valid)})"
        )
    return value


def mapping(key: str, value: Any, known: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check ``value`` is a mapping (``None`` counts as empty) with only ``known`` keys.

    Why reject unknown keys: a typo such as ``augment: {rotation: 10}`` would
    otherwise be ignored without a word, and the run would silently differ.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MnistlabError(f"params.yaml: {key} must be a mapping (got {value!r})")
    if known is not None:
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise MnistlabError(
                f"params.yaml: {key}: unknown key(s) {', '.join(map(str, unknown))} "
                f"(valid: {', '.join(known)})"
            )
    return dict(value)


def _seed(key: str, seed: Any) -> int:
    """An integer in [0, 2**32): numpy and scikit-learn take ``random_state`` only there."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise MnistlabError(f"params.yaml: {key} must be an integer in [0, 2**32) (got {seed!r})")
    return seed


def seed_of(params: dict[str, Any]) -> int:
    """The data ``seed``: the split and the t-SNE subsample (one for every run of a dataset)."""
    return _seed("seed", get(params, "seed"))


def seeds_of(params: dict[str, Any]) -> tuple[int, ...]:
    """The training ``seeds``: one train/evaluate/features stage and MLflow run per seed.

    A non-empty list of distinct integers in [0, 2**32). Why distinct: two stages of one
    seed would write the same folder.
    """
    seeds = get(params, "seeds")
    if not isinstance(seeds, list) or not seeds:
        raise MnistlabError(f"params.yaml: seeds must be a non-empty list of integers (got {seeds!r})")
    out = tuple(_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds))
    twice = sorted({s for s in out if out.count(s) > 1})
    if twice:
        raise MnistlabError(f"params.yaml: seeds: {', '.join(map(str, twice))} listed more than once")
    return out


def run_key(dataset: str, arch: str, seed: int) -> str:
    """``digits/mlp/seed-1234``: one training run's folder under models/, metrics/, reports/...

    Also its name in the CI gate and the leaderboard's runs table. Why ``seed-`` and not the
    bare number: a folder called ``1234`` beside nothing says nothing in a file browser.
    """
    return f"{dataset}/{arch}/seed-{seed}"


def stage_name(group: str, dataset: str, arch: str, seed: int) -> str:
    """``train@digits-mlp-1234``: DVC's name for one item of dvc.yaml's dataset x arch x seed matrix."""
    return f"{group}@{dataset}-{arch}-{seed}"


def pipeline_outputs(params: dict[str, Any]) -> list[str]:
    """What the pipeline writes inside the repository: ``dvc.lock`` and every ``paths`` folder.

    Some of it is tracked by git (dvc.lock, metrics/, reports/), so that a run that follows
    another leaves the checkout modified: not a change of code or settings (see
    :func:`mnistlab.utils.git_info`).
    """
    return ["dvc.lock", *(str(v) for v in (params.get("paths") or {}).values())]


def run_dir(root: Path, dataset: str, arch: str, seed: int) -> Path:
    """``root/<ds>/<arch>/seed-<seed>`` (:func:`run_key`)."""
    return Path(root) / run_key(dataset, arch, seed)


def seed_arg(text: str) -> int:
    """A stage's ``--seed`` (one item of ``seeds``, put there by dvc.yaml's matrix)."""
    try:
        value = int(text)
    except ValueError:
        raise MnistlabError(f"--seed: not an integer: {text!r} (from params.yaml seeds)") from None
    return _seed("seeds", value)


def device_name(key: str, value: Any) -> str:
    """A device setting (auto, cpu, cuda, cuda:N, mps) as a string; its meaning is checked on use."""
    if not isinstance(value, str) or not value.strip():
        raise MnistlabError(f"params.yaml: {key} must be a string such as auto, cpu or cuda:0 "
                            f"(got {value!r})")
    return value


def thread_setting(key: str, value: Any) -> int | str:
    """A thread-count setting: ``auto`` (:mod:`mnistlab.threads` decides) or a positive integer."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MnistlabError(f"params.yaml: {key} must be auto or a positive integer (got {value!r})")
    return value


# "always": the train stage draws its progress bar on stderr even when that is not a terminal.
# `make run` (mnistlab.repro) sends each chain's output to a log and shows the bars from there.
PROGRESS_ENV = "MNISTLAB_PROGRESS"

# torch.compile's modes (train.compile may also be true/false).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Settings shared by every train stage (``train`` in params.yaml)."""

    device: str = "auto"
    deterministic: bool = True
    min_steps: int = 0
    # The floor applies only to training sets smaller than this (see training.step_floor).
    min_steps_below: int = 50_000
    bf16: bool = True
    channels_last: bool = False
    # torch.compile the step model: false, true (= "default"), or a mode ("reduce-overhead":
    # CUDA graphs, for the small nets whose GPU steps are launch-bound; "max-autotune", ...).
    compile: bool | str = False
    # On CUDA, replay each training step as one CUDA graph (training.StepGraph): same results,
    # a launch per step instead of dozens. Ignored on CPU, under torchrun and with compile.
    cuda_graph: bool = True
    eval_batch_size: int = 2000
    checkpoint_every: int = 1
    # Read by dvc.yaml's train command only: "python", or e.g.
    # "torchrun --standalone --nproc_per_node 2" to train each stage with DDP.
    launcher: str = "python"
    # Torch threads per run: "auto" (usable cores / concurrent runs; mnistlab.threads) or N.
    threads: int | str = "auto"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainSettings:
        """Validate the ``train`` section; every problem names its key."""
        s = mapping("train", params.get("train"), tuple(f.name for f in dataclasses.fields(cls)))
        ms = s.get("min_steps", 0)
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise MnistlabError(f"params.yaml: train.min_steps must be an integer >= 0 (got {ms!r})")
        device_name("train.device", s.get("device", "auto"))
        if not isinstance(s.get("launcher", "python"), str) or not s.get("launcher", "python").strip():
            raise MnistlabError("params.yaml: train.launcher must be a command such as python or "
                                f"'torchrun --standalone --nproc_per_node 2' (got {s['launcher']!r})")
        if "threads" in s:
            thread_setting("train.threads", s["threads"])
        for flag in ("deterministic", "bf16", "channels_last", "cuda_graph"):
            if flag in s:
                boolean(f"train.{flag}", s[flag])
        if isinstance(s.get("compile"), str):
            choice("train.compile", s["compile"], COMPILE_MODES)
        elif "compile" in s:
            boolean("train.compile", s["compile"])
        for count in ("eval_batch_size", "checkpoint_every", "min_steps_below"):
            if count in s:
                s[count] = positive(f"train.{count}", s[count], int)
        return cls(**s)


# Leaderboard keys compare may rank by, and whether higher is better.
RANKABLE = {"test_accuracy": True, "macro_f1": True, "test_loss": False, "best_val_accuracy": True}


def count(key: str, value: Any) -> int:
    """A positive integer (a size or a count)."""
    return positive(key, value, int)


def names(key: str, value: Any) -> tuple[str, ...]:
    """A non-empty list of distinct names (``datasets``, ``archs``).

    Why distinct: a name listed twice would be trained once (DVC names the stage after
    it) but ranked twice in the leaderboard.
    """
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v.strip() for v in value)):
        raise MnistlabError(f"params.yaml: {key} must list at least one name (got {value!r})")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise MnistlabError(f"params.yaml: {key}: {', '.join(map(repr, twice))} listed more than once")
    return tuple(value)


# MLflow refuses a registered model name with '/' or ':' or one a path would normalise
# (leading '.', '..'), and an alias outside [A-Za-z0-9_-] or shaped like a version (v3)
# or "latest". We allow a clear subset for the prefix (names are <prefix>-<dataset> and
# also appear in models:/ URIs): a letter or digit, then letters, digits, '_', '-', '.'.
REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ALIAS_NAME = re.compile(r"[A-Za-z0-9_-]+")


def registry_name(key: str, value: Any) -> str:
    """A registered-model name prefix MLflow accepts."""
    if not isinstance(value, str) or not REGISTRY_NAME.fullmatch(value):
        raise MnistlabError(f"params.yaml: {key} must be a letter or digit followed by letters, "
                            f"digits, '_', '-' or '.' (an MLflow registered model name; got {value!r})")
    return value


def alias_name(key: str, value: Any) -> str:
    """A registered-model alias MLflow accepts (not ``latest``, not a version such as ``v3``)."""
    if (not isinstance(value, str) or not ALIAS_NAME.fullmatch(value) or value.lower() == "latest"
            or re.fullmatch(r"[vV]\d+", value)):
        raise MnistlabError(f"params.yaml: {key} must be letters, digits, '_' or '-', and neither "
                            f"'latest' nor a version such as v3 (an MLflow model alias; got {value!r})")
    return value


def section(params: dict[str, Any], name: str, fields: dict[str, Callable[[str, Any], Any]]
            ) -> dict[str, Any]:
    """Validate the mapping ``params[name]``: exactly ``fields``' keys, each through its validator.

    The one way a flat settings section is read: unknown keys are refused (a typo would
    otherwise be ignored), missing ones named, and each value checked under its full key.
    """
    mapping(name, get(params, name), tuple(fields))
    return {k: check(f"{name}.{k}", get(params, f"{name}.{k}")) for k, check in fields.items()}


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """``evaluate`` in params.yaml: the evaluate stage's device and sizes."""

    device: str
    batch_size: int
    channels_last: bool
    max_misclassified: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EvaluateSettings:
        return cls(**section(params, "evaluate", {
            "device": device_name, "batch_size": count, "channels_last": boolean,
            "max_misclassified": count}))


TSNE_MIN_ITER = 250  # scikit-learn's floor: its early-exaggeration phase alone is 250 iterations


def tsne_iterations(key: str, value: Any) -> int:
    """t-SNE's iteration count: an integer >= :data:`TSNE_MIN_ITER`."""
    if positive(key, value, int) < TSNE_MIN_ITER:
        raise MnistlabError(f"params.yaml: {key} must be at least {TSNE_MIN_ITER} (scikit-learn's "
                            f"early exaggeration alone takes {TSNE_MIN_ITER}; got {value!r})")
    return int(value)


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """``features`` in params.yaml (the t-SNE subsample is seeded by the global ``seed``)."""

    device: str
    max_channels: int
    max_units: int
    tsne_max_points: int
    tsne_perplexity: float
    tsne_max_iter: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FeatureSettings:
        """Validate ``features`` in params.yaml; every problem names its key."""
        return cls(**section(params, "features", {
            "device": device_name, "max_channels": count, "max_units": count,
            "tsne_max_points": count, "tsne_perplexity": positive, "tsne_max_iter": tsne_iterations}))


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """``datasets``, ``archs``, ``seeds`` and ``compare`` in params.yaml: what the leaderboard ranks, and how."""

    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    seeds: tuple[int, ...]
    rank_by: str
    register: bool
    registry_prefix: str
    alias: str

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CompareSettings:
        datasets, archs = names("datasets", get(params, "datasets")), names("archs", get(params, "archs"))
        s = section(params, "compare", {
            "rank_by": lambda k, v: choice(k, v, tuple(RANKABLE)), "register": boolean,
            "registry_prefix": registry_name, "alias": alias_name})
        return cls(datasets=datasets, archs=archs, seeds=seeds_of(params), **s)


# --------------------------------------------------------------------------- download settings
# (moved here from the former mnistlab/data.py; used by mnistlab.data.download.fetch)


@dataclasses.dataclass(frozen=True)
class DownloadSettings:
    """``download`` in params.yaml: per-request timeout, attempts per mirror and file, backoff."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DownloadSettings:
        d = params.get("download") or {}
        if not isinstance(d, dict):
            raise MnistlabError("params.yaml: download must be a mapping")
        unknown = sorted(set(d) - {"timeout", "retries", "backoff"})
        if unknown:
            raise MnistlabError(
                f"params.yaml: download: unknown key(s) {', '.join(map(str, unknown))} "
                "(valid: timeout, retries, backoff)"
            )
        return cls(
            timeout=positive("download.timeout", d.get("timeout", cls.timeout)),
            retries=positive("download.retries", d.get("retries", cls.retries), int),
            backoff=non_negative("download.backoff", d.get("backoff", cls.backoff)),
        )
