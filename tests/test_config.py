"""params.yaml parsing details: YAML 1.2 floats and the per-arch step floor; bad settings and
bad stage files as one-line errors naming the key or the file (issue #10, round 2)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.repo import ROOT, committed_params, committed_params_text

from mnistlab import artifacts, errors
from mnistlab.config import (
    PARAMS_KEYS,
    CompareSettings,
    TrainSettings,
    load_params,
    load_yaml,
    run_dir,
    run_key,
    seed_arg,
    seeds_of,
    stage_name,
)
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.models import ARGS, REGISTRY, Size, build_model, register
from mnistlab.stages.evaluate import EvalPaths, run_evaluation
from mnistlab.stages.features import FeaturePaths, run_features
from mnistlab.training import effective_epochs
from mnistlab.utils import pick_device


def test_exponent_floats_are_floats(tmp_path):
    # `dvc exp run -S hparams.mlp.lr=1e-6` writes 1e-06; YAML 1.1 would read a string.
    assert load_yaml("lr: 1e-06\nwd: 5E-4\nn: 10\nname: 1e5x") == {
        "lr": 1e-06, "wd": 5e-4, "n": 10, "name": "1e5x"}
    text = committed_params_text()
    assert "    lr: 0.001\n    epochs: 5" in text  # mlp's entry
    p = tmp_path / "params.yaml"
    p.write_text(text.replace("    lr: 0.001\n    epochs: 5", "    lr: 1e-06\n    epochs: 5", 1))
    assert HParams.from_params(load_params(p), "mlp").lr == 1e-06


def test_arch_min_steps_overrides_the_shared_floor():
    params = committed_params()
    del params["hparams"]["lenet5"]["min_steps"]  # params.yaml gives lenet5 a floor of its own
    hp = HParams.from_params(params, "lenet5")  # batch 256
    assert hp.min_steps is None
    floor = {n: TrainSettings(min_steps=n) for n in (0, 100)}
    assert effective_epochs(hp, floor[100], 1280) == max(hp.epochs, 20)  # 5 steps/epoch
    own = copy.deepcopy(params)
    own["hparams"]["lenet5"]["min_steps"] = 1500
    hp = HParams.from_params(own, "lenet5")
    assert effective_epochs(hp, floor[100], 1280) == 300
    assert effective_epochs(hp, floor[0], 1280) == 300
    own["hparams"]["lenet5"]["min_steps"] = 0
    assert effective_epochs(HParams.from_params(own, "lenet5"), floor[100], 1280) == hp.epochs


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True])
def test_bad_arch_min_steps_names_the_key(bad):
    params = committed_params()
    params["hparams"]["mlp"]["min_steps"] = bad
    with pytest.raises(MnistlabError, match=r"hparams\.mlp\.min_steps must be an integer >= 0"):
        HParams.from_params(params, "mlp")


# --------------------------------------------------------------------------- bad settings (issue #10)


@functools.cache
def _parsed_params() -> dict:
    return committed_params()


def fresh_params() -> dict:
    """The committed params.yaml parsed once (parsing costs ~0.3 s), a fresh copy per call."""
    return copy.deepcopy(_parsed_params())


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(("arch", "arg", "value", "must"), [
    ("mlp", "hidden", -5, "an integer >= 1"),      # was a RuntimeError traceback from torch
    ("mlp", "hidden", "500", "an integer >= 1"),   # was a TypeError traceback (YAML string)
    ("mlp", "hidden", 0, "an integer >= 1"),       # was a silently useless model
    ("mlp", "hidden", 2.5, "an integer >= 1"),
    ("mlp", "hidden", True, "an integer >= 1"),
    ("cnn_16_32", "c2", 0, "an integer >= 1"),
    ("cnn_4_8", "dropout", 1.0, "a number in [0, 1)"),
    ("cnn_4_8", "dropout", -0.1, "a number in [0, 1)"),
    ("cnn_4_8", "dropout", "0.5", "a number in [0, 1)"),
    ("resnet_bn", "width", -1, "an integer >= 1"),
])
def test_arch_args_are_typed_and_ranged(arch, arg, value, must):
    params = fresh_params()
    params["hparams"][arch].setdefault("args", {})[arg] = value
    with pytest.raises(MnistlabError) as e:
        HParams.from_params(params, arch)
    assert one_line(e) == f"params.yaml: hparams.{arch}.args.{arg}: must be {must} (got {value!r})"


def test_arch_args_in_range_pass_and_build():
    params = fresh_params()
    params["hparams"]["cnn_4_8"]["args"].update(hidden=1, dropout=0)  # the edges: 1 and 0 are valid
    hp = HParams.from_params(params, "cnn_4_8")
    assert build_model("cnn_4_8", **hp.args) is not None


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_builder_has_a_schema_of_its_signature(arch):
    """The schema is the builder's signature: every argument, its default valid."""
    sig = inspect.signature(REGISTRY[arch])
    assert list(ARGS[arch].model_fields) == list(sig.parameters)
    ARGS[arch].model_validate({n: p.default for n, p in sig.parameters.items()})


def test_a_builder_without_ranged_types_is_refused_at_registration():
    def unranged_net(num_classes: int = 10, width: Size = 8) -> torch.nn.Module:
        raise AssertionError("never built")

    with pytest.raises(TypeError, match="'num_classes' needs a default and a ranged type"):
        register(unranged_net)
    assert "unranged_net" not in REGISTRY and "unranged_net" not in ARGS


@pytest.mark.parametrize(("edit", "fragment"), [
    ({"lr": 0}, "hparams.mlp.lr must be a positive number (got 0)"),
    ({"lr": "0.01"}, "hparams.mlp.lr must be a positive number (got '0.01')"),
    ({"epochs": 1.5}, "hparams.mlp.epochs must be a positive integer (got 1.5)"),
    ({"batch_size": True}, "hparams.mlp.batch_size must be a positive integer (got True)"),
    ({"optimizer": "sgd", "momentum": 1.0}, "hparams.mlp.momentum must be < 1 (got 1.0)"),
    ({"weight_decay": -1}, "hparams.mlp.weight_decay must be a number >= 0 (got -1)"),
    ({"label_smoothing": 1}, "hparams.mlp.label_smoothing must be < 1"),
    ({"augment": {"scale": 1.0}}, "hparams.mlp.augment.scale must be < 1"),
    ({"normalize": {"std": 0}}, "hparams.mlp.normalize.std must be a positive number (got 0)"),
    ({"schedule": "linear"}, "hparams.mlp.schedule: unknown value 'linear'"),
    ({"epoch": 3}, "hparams.mlp: unknown key(s) epoch"),
])
def test_the_other_hparams_are_typed_and_ranged(edit, fragment):
    params = fresh_params()
    params["hparams"]["mlp"].update(edit)
    with pytest.raises(MnistlabError) as e:
        HParams.from_params(params, "mlp")
    assert fragment in one_line(e)


def test_an_hparams_section_of_no_registered_arch_is_refused():
    params = fresh_params()
    params["hparams"]["cnn_16_23"] = params["hparams"]["cnn_16_32"]  # a typo of an arch name
    with pytest.raises(MnistlabError) as e:
        HParams.from_params(params, "mlp")
    assert one_line(e).startswith("params.yaml: hparams: unknown key(s) cnn_16_23 (valid: mlp,")


def test_an_unknown_top_level_key_is_refused_listing_the_valid_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text().replace("\nhparams:\n", "\nhparam:\n", 1))
    with pytest.raises(MnistlabError) as e:
        load_params(path)
    assert one_line(e) == (f"{path}: unknown top-level key(s) hparam (valid: {', '.join(PARAMS_KEYS)})")


def test_the_known_top_level_keys_are_those_params_yaml_and_its_overrides_use():
    """params.yaml holds every known key (none is dead), ci/profile.yaml and ci/reproduce.yaml's
    overrides only known ones, and dvc.yaml's ${...} templates read only known ones."""
    assert set(fresh_params()) == set(PARAMS_KEYS)
    assert set(load_params(ROOT / "ci" / "profile.yaml", keys=None)) <= set(PARAMS_KEYS)
    repro = load_params(ROOT / "ci" / "reproduce.yaml", what="reproduction config", keys=None)
    assert set(repro.get("overrides") or {}) <= set(PARAMS_KEYS)
    used = {m.split(".")[0] for m in re.findall(r"\$\{([^}]+)\}", (ROOT / "dvc.yaml").read_text())}
    assert used - {"item"} <= set(PARAMS_KEYS)


@pytest.mark.parametrize(("section", "settings"), [
    ("train", TrainSettings), ("evaluate", None), ("features", None), ("compare", CompareSettings),
    ("download", None),
])
def test_an_unknown_key_in_a_section_is_refused(section, settings):
    from mnistlab import config

    read = settings or {"evaluate": config.EvaluateSettings, "features": config.FeatureSettings,
                        "download": config.DownloadSettings}[section]
    params = fresh_params()
    params[section]["typo_key"] = 1
    with pytest.raises(MnistlabError) as e:
        read.from_params(params)
    assert f"{section}: unknown key(s) typo_key (valid: " in one_line(e)


@pytest.mark.parametrize("key", ["archs", "datasets"])
def test_a_name_listed_twice_is_refused(key):
    params = fresh_params()
    params[key] = [*params[key], params[key][0]]  # was: ranked twice in the leaderboard
    with pytest.raises(MnistlabError) as e:
        CompareSettings.from_params(params)
    assert one_line(e) == f"params.yaml: {key}: {params[key][0]!r} listed more than once"


@pytest.mark.parametrize(("key", "value"), [
    ("registry_prefix", "bad/name?"),  # was an MlflowException traceback at registration
    ("registry_prefix", "a:b"), ("registry_prefix", "../up"), ("registry_prefix", ""),
    ("registry_prefix", 7), ("alias", "latest"), ("alias", "v3"), ("alias", "my alias"),
])
def test_registry_names_follow_mlflow_rules(key, value):
    params = fresh_params()
    params["compare"][key] = value
    with pytest.raises(MnistlabError) as e:
        CompareSettings.from_params(params)
    msg = one_line(e)
    assert msg.startswith(f"params.yaml: compare.{key} must be ") and msg.endswith(f"got {value!r})")


def test_valid_registry_names_pass():
    params = fresh_params()
    params["compare"].update(registry_prefix="Team.mnist_lab-2", alias="champion_v2")
    assert CompareSettings.from_params(params).registry_prefix == "Team.mnist_lab-2"


@pytest.mark.parametrize(("stage", "run", "paths"), [
    ("evaluate", run_evaluation, EvalPaths), ("features", run_features, FeaturePaths)])
def test_a_stage_device_error_names_that_stage_key(monkeypatch, tmp_path, stage, run, paths):
    """Was: ``train.device`` named whatever stage asked (the default key of pick_device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = fresh_params()
    params[stage]["device"] = "cuda"
    missing = paths(**{f.name: tmp_path / f.name for f in dataclasses.fields(paths)})
    with pytest.raises(MnistlabError) as e:
        run(params, "digits", "mlp", 1234, missing)
    assert one_line(e) == f"params.yaml: {stage}.device: 'cuda' requested but CUDA is not available"
    assert inspect.signature(pick_device).parameters["key"].default is inspect.Parameter.empty


@pytest.mark.parametrize(("text", "fragment"), [
    ("[]", "missing or invalid (run the split stage)"),   # was a TypeError traceback
    ('{"classes": "0123"}', "classes must be a non-empty list of names"),
    ('{"classes": []}', "classes must be a non-empty list of names"),
    ('{"classes": [0, 1]}', "classes must be a non-empty list of names"),
    ("{not json", "missing or invalid (run the split stage)"),
])
def test_a_bad_split_summary_is_one_line_naming_it(tmp_path, text, fragment):
    (tmp_path / artifacts.SUMMARY).write_text(text)
    with pytest.raises(MnistlabError) as e:
        artifacts.load_classes(tmp_path)
    assert one_line(e).startswith(f"{tmp_path / artifacts.SUMMARY}: {fragment}")


@pytest.mark.parametrize(("name", "body", "fragment"), [
    ("train.json", {"parameters": "n/a"}, "parameters must be an integer (got 'n/a'; re-run its train stage)"),
    ("train.json", {"epochs": 2.5}, "epochs must be an integer (got 2.5"),
    ("train.json", {"train_seconds": None}, "train_seconds must be a number (got None"),
    ("train.json", {"best_val_accuracy": True}, "best_val_accuracy must be a number (got True"),
    ("train.json", {"parameters": None, "drop": "parameters"}, "missing key 'parameters' (re-run its train stage)"),
    ("test.json", {"test_accuracy": "0.9"}, "test_accuracy must be a number (got '0.9'; re-run its evaluate stage)"),
    ("test.json", {"test_accuracy_ci_low": "n/a"}, "test_accuracy_ci_low must be a number"),
    ("test.json", [], "expected a JSON object (got list"),
])
def test_a_bad_metrics_file_is_one_line_naming_it(tmp_path, name, body, fragment):
    good = {"train.json": {"parameters": 10, "epochs": 1, "train_seconds": 0.5,
                           "train_images_per_second": 9.0, "best_val_accuracy": 0.5},
            "test.json": {"test_accuracy": 0.9, "test_loss": 0.3, "macro_f1": 0.8, "test_samples": 9,
                          "test_accuracy_ci_low": 0.8, "test_accuracy_ci_high": 0.95}}[name]
    path = tmp_path / name
    path.write_text(json.dumps(good))
    assert artifacts.read_json(path) == good  # the control
    if isinstance(body, dict):
        obj = {**good, **body}
        obj.pop(body.get("drop", ""), None)
        obj.pop("drop", None)
    else:
        obj = body
    path.write_text(json.dumps(obj))
    with pytest.raises(MnistlabError) as e:
        artifacts.read_json(path)
    assert one_line(e).startswith(f"{path}: {fragment}")


def test_a_non_utf8_params_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(committed_params_text().encode() + b"# caf\xe9\n")  # a Latin-1 editor's save
    with pytest.raises(MnistlabError) as e:
        load_params(path)
    assert one_line(e).startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset ")


def test_an_unknown_split_key_stops_the_split_script(tmp_path, monkeypatch, capsys):
    """The split script reads its section through config.section (in-process: no outputs made)."""
    params = fresh_params()
    params["split"]["val_frac"] = 0.1
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["split.py", "--dataset", "digits", "--raw", "raw", "--out", "out"])
    # a script's top level ends its process (errors.run_script); here, the SystemExit instead
    monkeypatch.setattr(errors, "exit_process", lambda code=0: sys.exit(code))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "stages" / "split.py"), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "error: params.yaml: split: unknown key(s) val_frac (valid: val_fraction, test_fraction)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "mode"), [
    (False, None), (True, None), ("default", "default"), ("reduce-overhead", "reduce-overhead"),
    ("max-autotune", "max-autotune")])
def test_train_compile_takes_a_flag_or_a_torch_compile_mode(value, mode, monkeypatch):
    params = fresh_params()
    params["train"]["compile"] = value
    settings = TrainSettings.from_params(params)
    assert settings.compile == value
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    from mnistlab.training import build
    build(HParams.from_params(params, "mlp"), settings, num_classes=10, n_train=100,
          device=torch.device("cpu"), seed=0)
    assert seen == ([] if value is False else [mode])


def test_deterministic_eager_leaves_inductor_unloaded_and_compile_sets_its_flag(tmp_path):
    """seed_everything skips the Inductor import (~1.5 s a train stage) that
    torch.use_deterministic_algorithms makes; a compiled run still gets Inductor's flag."""
    code = """if True:
        import sys, torch
        from mnistlab.config import TrainSettings, load_params
        from mnistlab.hparams import HParams
        from mnistlab.training import build
        from mnistlab.utils import seed_everything
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert "torch._inductor" not in sys.modules, "Inductor imported"
        params = load_params(sys.argv[1])
        params["train"]["compile"] = True
        torch.compile = lambda model, mode=None: model
        build(HParams.from_params(params, "mlp"), TrainSettings.from_params(params),
              num_classes=10, n_train=100, device=torch.device("cpu"), seed=0)
        import torch._inductor.config as inductor
        assert inductor.deterministic is True and torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)  # Inductor loaded: both flags follow
        assert inductor.deterministic is False and not torch.are_deterministic_algorithms_enabled()
    """
    import subprocess

    params = tmp_path / "params.yaml"
    params.write_text(committed_params_text())
    done = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("value", "fragment"), [
    ("fast", "train.compile: unknown value 'fast' (valid: default, reduce-overhead, max-autotune,"),
    (1, "train.compile must be true or false (got 1)")])
def test_bad_train_compile_names_the_key_and_the_modes(value, fragment):
    params = fresh_params()
    params["train"]["compile"] = value
    with pytest.raises(MnistlabError) as e:
        TrainSettings.from_params(params)
    assert fragment in one_line(e)


# --------------------------------------------------------------------------- seeds


def test_seeds_default_to_one_and_are_read_in_order():
    assert fresh_params()["seeds"] == [1234] and fresh_params()["seed"] == 1234
    assert seeds_of({"seeds": [5, 1, 3]}) == (5, 1, 3)  # the first is the paired tests' seed
    assert CompareSettings.from_params({**fresh_params(), "seeds": [2, 1]}).seeds == (2, 1)


@pytest.mark.parametrize(("seeds", "message"), [
    ([], "params.yaml: seeds must be a non-empty list of integers (got [])"),
    (7, "params.yaml: seeds must be a non-empty list of integers (got 7)"),
    ("1,2", "params.yaml: seeds must be a non-empty list of integers (got '1,2')"),
    ([1, 2.5], "params.yaml: seeds[1] must be an integer in [0, 2**32) (got 2.5)"),
    ([True], "params.yaml: seeds[0] must be an integer in [0, 2**32) (got True)"),
    ([-1], "params.yaml: seeds[0] must be an integer in [0, 2**32) (got -1)"),
    ([2**32], f"params.yaml: seeds[0] must be an integer in [0, 2**32) (got {2**32})"),
    ([3, 1, 3], "params.yaml: seeds: 3 listed more than once"),
])
def test_bad_seeds_are_one_line_naming_the_key(seeds, message):
    with pytest.raises(MnistlabError) as e:
        seeds_of({"seeds": seeds})
    assert one_line(e) == message
    with pytest.raises(MnistlabError):  # what the compare stage reads first
        CompareSettings.from_params({**fresh_params(), "seeds": seeds})


def test_a_stage_seed_argument_is_checked_and_named():
    assert seed_arg("0") == 0 and seed_arg(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(MnistlabError) as e:
        seed_arg("x1")
    assert one_line(e) == "--seed: not an integer: 'x1' (from params.yaml seeds)"
    with pytest.raises(MnistlabError) as e:
        seed_arg("-3")
    assert one_line(e) == "params.yaml: seeds must be an integer in [0, 2**32) (got -3)"


def test_run_paths_and_stage_names_agree_with_dvc_yaml():
    """The one naming rule (config.run_key, stage_name) is what dvc.yaml's templates spell out."""
    assert run_key("digits", "mlp", 7) == "digits/mlp/seed-7"
    assert run_dir(Path("metrics"), "digits", "mlp", 7) == Path("metrics/digits/mlp/seed-7")
    assert stage_name("train", "digits", "mlp", 7) == "train@digits-mlp-7"
    text = (ROOT / "dvc.yaml").read_text()
    assert text.count("${item.dataset}/${item.arch}/seed-${item.seed}") >= 15
    assert "${item.dataset}/${item.arch}/" not in text.replace(
        "${item.dataset}/${item.arch}/seed-${item.seed}", "")
    stages = yaml.safe_load(text)["stages"]
    for name in ("train", "evaluate", "features"):
        assert stages[name]["matrix"] == {"dataset": "${datasets}", "arch": "${archs}",
                                          "seed": "${seeds}"}
    # a seed added to `seeds` leaves the other seeds' train stages cached: no seed param dep
    assert not {"seed", "seeds"} & set(stages["train"]["params"])
    assert "seeds" in stages["compare"]["params"]
