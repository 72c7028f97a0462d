"""dvc.yaml's code deps equal the real import graph, and the check catches a drift.

In a DVC project a module boundary is a cache boundary: a stage must re-run
after an edit to any module it runs, and only then.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers.repo import ROOT

from mnistlab import codegraph
from mnistlab.ci import deps


def test_every_stage_lists_exactly_the_modules_it_runs():
    assert deps.problems(ROOT) == []


@pytest.fixture
def copy(tmp_path):
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return tmp_path


def test_a_removed_dep_is_named_and_fix_restores_it(copy):
    text = (copy / "dvc.yaml").read_text()
    assert "      - src/mnistlab/training.py\n" in text
    (copy / "dvc.yaml").write_text(text.replace("      - src/mnistlab/training.py\n", "", 1))
    found = deps.problems(copy)
    assert len(found) == 1 and "stage 'train'" in found[0] and "missing src/mnistlab/training.py" in found[0]
    deps.fix(copy)
    assert deps.problems(copy) == []
    assert (copy / "dvc.yaml").read_text() == text  # comments and order as written


def test_an_extra_dep_is_named(copy):
    text = (copy / "dvc.yaml").read_text()
    # the training modules are no dependency of the data stages
    stages = yaml.safe_load(text)["stages"]
    assert "src/mnistlab/models.py" not in stages["split"]["do"]["deps"]
    a = text.index("  split:")
    b = text.index("        - src/mnistlab/", a)  # split is a foreach stage: deps under do:
    (copy / "dvc.yaml").write_text(text[:b] + "        - src/mnistlab/models.py\n" + text[b:])
    found = deps.problems(copy)
    assert found == ["dvc.yaml stage 'split': not run by stages/split.py: src/mnistlab/models.py"]


def test_a_new_import_makes_a_missing_dep(copy):
    mod = copy / "src" / "mnistlab" / "artifacts.py"
    mod.write_text(mod.read_text() + "\nfrom mnistlab import plots  # noqa\n")
    found = deps.problems(copy)
    # every stage that reads split files now runs plots.py too; those that did not list it say so
    assert any("stage 'split'" in p and "missing src/mnistlab/plots.py" in p for p in found)


def test_closure_follows_lazy_imports_and_parent_packages(tmp_path):
    src = tmp_path / "mnistlab"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("")
    (src / "sub" / "a.py").write_text("def f():\n    from mnistlab import b  # lazy\n")
    (src / "b.py").write_text("import os\n")
    (src / "c.py").write_text("")
    script = tmp_path / "run.py"
    script.write_text("from mnistlab.sub.a import f\n")
    got = {p.relative_to(src).as_posix() for p in codegraph.closure(script, src)}
    assert got == {"__init__.py", "sub/__init__.py", "sub/a.py", "b.py"}


def test_data_code_is_no_dependency_of_training():
    """Editing download code re-runs only download/split (issue: module boundaries = cache boundaries)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate", "features", "compare"):
        listed = stages[name]["deps"]
        assert not any(d.startswith("src/mnistlab/data/") for d in listed), name
    for name in ("download", "split"):
        listed = stages[name]["do"]["deps"]
        assert not any(d in listed for d in ("src/mnistlab/training.py", "src/mnistlab/models.py",
                                              "src/mnistlab/tracking.py")), name


def test_checkpoint_fingerprint_covers_the_train_closure_minus_recording():
    from mnistlab.checkpoint import RECORDING_ONLY

    files = codegraph.closure(codegraph.SRC / "stages" / "train.py")
    names = {f.name for f in files}
    assert {"training.py", "models.py", "inference.py", "checkpoint.py", "config.py"} <= names
    assert set(RECORDING_ONLY) <= names  # the exclusions are real modules the stage runs
