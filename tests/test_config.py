"""params.yaml parsing details: YAML 1.2 floats and the per-arch step floor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mnistlab.config import TrainSettings, load_params, load_yaml
from mnistlab.errors import MnistlabError
from mnistlab.hparams import HParams
from mnistlab.training import effective_epochs

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_exponent_floats_are_floats(tmp_path):
    # `dvc exp run -S hparams.mlp.lr=1e-6` writes 1e-06; YAML 1.1 would read a string.
    assert load_yaml("lr: 1e-06\nwd: 5E-4\nn: 10\nname: 1e5x") == {
        "lr": 1e-06, "wd": 5e-4, "n": 10, "name": "1e5x"}
    text = PARAMS.read_text()
    assert "    lr: 0.001\n    epochs: 5" in text  # mlp's entry
    p = tmp_path / "params.yaml"
    p.write_text(text.replace("    lr: 0.001\n    epochs: 5", "    lr: 1e-06\n    epochs: 5", 1))
    assert HParams.from_params(load_params(p), "mlp").lr == 1e-06


def test_arch_min_steps_overrides_the_shared_floor():
    params = load_params(PARAMS)
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
    params = load_params(PARAMS)
    params["hparams"]["mlp"]["min_steps"] = bad
    with pytest.raises(MnistlabError, match=r"hparams\.mlp\.min_steps must be an integer >= 0"):
        HParams.from_params(params, "mlp")
