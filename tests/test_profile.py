"""`make run PROFILE=<name>`: profiles/<name>.yaml as `dvc exp run -S` arguments."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.repo import committed_params

from mnistlab import profile
from mnistlab.config import get
from mnistlab.errors import MnistlabError

ROOT = Path(__file__).resolve().parents[1]


def test_nested_keys_become_dotted_set_args_with_yaml_values(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "train: {min_steps: 1500}\nhparams: {mlp: {lr: 0.01, args: {hidden: 64}}}\ndatasets: [digits, mnist]\n")
    assert profile.set_args(tmp_path / "p.yaml") == [
        "-S", "train.min_steps=1500", "-S", "hparams.mlp.lr=0.01", "-S", "hparams.mlp.args.hidden=64",
        "-S", "datasets=[digits, mnist]"]


def test_an_unknown_profile_names_the_file_and_the_known_ones(tmp_path):
    (tmp_path / "quick.yaml").write_text("train: {min_steps: 10}\n")
    with pytest.raises(MnistlabError, match=r"nope\.yaml: no such profile \(profiles: quick\)"):
        profile.set_args(tmp_path / "nope.yaml")


def test_a_profile_with_a_key_params_yaml_does_not_have_is_refused(tmp_path):
    (tmp_path / "typo.yaml").write_text("trian: {min_steps: 10}\n")
    with pytest.raises(MnistlabError, match="trian"):
        profile.set_args(tmp_path / "typo.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_sets_existing_keys_to_new_values(path):
    params = committed_params()
    args = profile.set_args(path)
    assert args
    for key, value in (a.split("=", 1) for a in args[1::2]):
        assert get(params, key) is not None, f"{path.name}: {key} is not in params.yaml"
        assert str(get(params, key)) != value, f"{path.name}: {key}={value} changes nothing"


def test_the_command_line_prints_shell_quoted_args():
    out = subprocess.run([sys.executable, "-m", "mnistlab.profile", "thorough"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == ["-S", "train.min_steps=1500"]
