"""Use the champion: ``python -m mnistlab.predict`` on images, the registry model, the ONNX export.

No photographs of digits ship with the repo, so the inputs are made from the embedded
digits in MNIST's layout (helpers.champion): rendered larger, inverted, off-centre, as
JPEG and on a transparent canvas. A prediction on such a picture must match the one on
the original image, and a folder of the test images as PNGs must get the evaluate
stage's predictions. One small MLP, trained once for the module in seconds, answers.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.champion import (
    CLASSES,
    canonical_digits,
    evaluate_predictions,
    log_champion,
    render,
    reopened,
    train_model,
    write_split,
)
from PIL import Image, ImageDraw

from mnistlab import artifacts, predict, tracking
from mnistlab.data.idx import write_idx
from mnistlab.errors import MnistlabError, describe
from mnistlab.models import build_model, model_record, save_model
from mnistlab.utils import torch_save

MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The canonical digits split (as data/split/digits), a model trained on it (as
    models/digits/mlp/seed-1234/model.pt), its test images."""
    base = tmp_path_factory.mktemp("predict")
    images, labels = canonical_digits()
    split = write_split(base / "split" / "digits", images, labels)
    model = train_model(split, base / "models" / "digits" / "mlp" / "seed-1234" / "model.pt")
    test_images, test_labels = artifacts.load_split(split, "test")
    return SimpleNamespace(base=base, split=split, model=model, images=test_images,
                           labels=test_labels, evaluate=evaluate_predictions(model, test_images))


def write_pngs(folder: Path, images, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fmt = kw.pop("fmt", "PNG")
    for i, a in enumerate(images):
        render(a, **kw).save(folder / f"{i:04d}.{fmt.lower()}", fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return folder


def classes_of(folder_or_files, model) -> np.ndarray:
    names, images = predict.collect(folder_or_files if isinstance(folder_or_files, list) else [folder_or_files])
    p = predict.load_predictor(str(model)).probabilities(images)
    return p.argmax(1)


# --------------------------------------------------------------------------- preprocessing


def test_to_mnist_brings_a_photo_to_mnist_layout():
    """A dark, thick "7" drawn off-centre on a light RGB page: white on black, the box's
    longer side 20 px, centre of mass at (14, 14), background 0, ink up to 255."""
    page = Image.new("RGB", (300, 200), (235, 230, 220))
    ImageDraw.Draw(page).line([(40, 30), (120, 30), (70, 170)], fill=(20, 25, 40), width=14)
    out = predict.to_mnist(page).astype(float)
    assert out.shape == (28, 28) and out.max() == 255
    border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert border.max() < 16 and out[:3, :3].max() == out[-3:, -3:].max() == 0  # black page
    rows, cols = np.nonzero(out > 0.2 * 255)
    assert max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) in (20, 21)
    cy = (out.sum(1) * np.arange(28)).sum() / out.sum()
    cx = (out.sum(0) * np.arange(28)).sum() / out.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    with pytest.raises(ValueError, match="no digit found"):
        predict.to_mnist(Image.new("L", (50, 40), 250))


def test_an_image_already_in_mnist_layout_comes_out_unchanged(work):
    out = np.stack([predict.to_mnist(reopened(render(a))) for a in work.images])
    diff = np.abs(out.astype(int) - work.images.numpy())
    assert (diff.max(axis=(1, 2)) == 0).mean() >= 0.95 and diff.mean() < 0.5


def test_pictures_of_a_digit_predict_like_the_digit(work):
    """Other sizes, inverted, off-centre, JPEG, transparent: the same class as on the original
    for >= 99 % of all pictures (and >= 98 % of each kind)."""
    base = work.base / "variants"
    original = classes_of(write_pngs(base / "original", work.images), work.model)
    variants = {
        "larger": dict(size=100),
        "inverted": dict(size=64, invert=True),
        "off-centre, light page": dict(size=56, invert=True, canvas=(160, 120, 12, 50)),
        "jpeg, rgb": dict(size=80, invert=True, mode="RGB", fmt="JPEG"),
    }
    agree = {name: classes_of(write_pngs(base / name.replace(",", "").replace(" ", "-"),
                                         work.images, **kw), work.model) == original
             for name, kw in variants.items()}
    # a black digit on a transparent canvas (alpha = ink), as drawing programs export it
    folder = base / "transparent"
    folder.mkdir()
    for i, a in enumerate(work.images):
        ink = render(a, size=72)
        Image.merge("RGBA", (*Image.new("RGB", ink.size, (0, 0, 0)).split(), ink)).save(folder / f"{i:04d}.png")
    agree["transparent"] = classes_of(folder, work.model) == original
    rates = {k: float(v.mean()) for k, v in agree.items()}
    assert float(np.concatenate(list(agree.values())).mean()) >= MIN_AGREEMENT, rates
    assert min(rates.values()) >= 0.98, rates


# --------------------------------------------------------------------------- the command


def test_png_folder_of_test_images_gets_the_evaluate_predictions(work, tmp_path):
    """Done-when: the CLI on a folder of PNGs made from the test images agrees with the
    evaluate stage's predictions on >= 99 %; table, CSV and JSON say the same."""
    folder = write_pngs(tmp_path / "pngs", work.images)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "mnistlab.predict", str(folder), "--model", str(work.model),
                        "--csv", str(out / "p.csv"), "--json", str(out / "p.json"), "--top", "3"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    rows = list(csv.DictReader((out / "p.csv").open()))
    assert [r["file"] for r in rows] == [str(folder / f"{i:04d}.png") for i in range(len(work.images))]
    got = np.array([CLASSES.index(r["class"]) for r in rows])
    assert (got == work.evaluate).mean() >= MIN_AGREEMENT
    assert {"top3_class", "top3_probability"} <= set(rows[0])
    assert all(r["top1_class"] == r["class"] and 0 < float(r["probability"]) <= 1 for r in rows)

    doc = json.loads((out / "p.json").read_text())
    assert doc["classes"] == CLASSES and doc["model"] == str(work.model)
    assert [d["class"] for d in doc["predictions"]] == [r["class"] for r in rows]
    top = doc["predictions"][0]["top"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    assert sorted(os.listdir(out)) == ["p.csv", "p.json"]  # atomic writes leave no temp files

    lines = p.stdout.splitlines()
    assert lines[0].split() == ["file", "class", "probability", "top-3"]
    assert len(lines) == 2 + len(work.images)
    assert lines[2].split()[0] == rows[0]["file"] and lines[2].split()[1] == rows[0]["class"]


def test_real_mnist_test_images_as_pngs_get_the_evaluate_predictions(mnist_mini, tmp_path):
    """The same on MNIST itself (../shared/datasets/mnist-mini): its images are the layout."""
    train = predict.read_idx(mnist_mini / "train-images-idx3-ubyte.gz")
    with gzip.open(mnist_mini / "train-labels-idx1-ubyte.gz") as f:
        labels = torch.from_numpy(np.frombuffer(f.read()[8:], np.uint8).astype(np.int64))
    test = predict.read_idx(mnist_mini / "t10k-images-idx3-ubyte.gz")[:500]
    split = tmp_path / "split"
    artifacts.save_split(split, {"train": (train[:7500], labels[:7500]), "val": (train[7500:], labels[7500:]),
                                 "test": (test, torch.zeros(len(test), dtype=torch.long))},
                         {"classes": CLASSES})
    model = train_model(split, tmp_path / "model.pt", epochs=3, augment=None)
    got = classes_of(write_pngs(tmp_path / "pngs", test), model)
    assert (got == evaluate_predictions(model, test)).mean() >= MIN_AGREEMENT


def test_idx_files_plain_and_gzipped_go_in_as_they_are(work, tmp_path):
    plain = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(plain, work.images)
    gz = tmp_path / "copy-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    names, images = predict.collect([plain, gz])
    n = len(work.images)
    assert names[0] == f"{plain}[0]" and names[n] == f"{gz}[0]" and len(names) == 2 * n
    assert torch.equal(images[:n], work.images) and torch.equal(images[n:], work.images)
    got = predict.load_predictor(str(work.model)).probabilities(images).argmax(1)
    assert (got[:n] == work.evaluate).all() and (got[n:] == work.evaluate).all()


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad(work):
    """Broken inputs and models, each to be named in a one-line error."""
    d = work.base / "bad"
    d.mkdir()
    good = d / "good.png"
    render(work.images[0]).save(good)
    (d / "notes.png").write_text("not an image\n")
    (d / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("L", (50, 40), 250).save(d / "blank.png")
    write_idx(d / "wide-idx3-ubyte", torch.zeros(3, 32, 32, dtype=torch.uint8))
    (d / "empty").mkdir()
    torch_save({"weights": torch.zeros(3)}, d / "not-a-model.pt")
    save_model(d / "three-classes.pt", model_record("mlp", {"num_classes": 10}, build_model("mlp").state_dict(),
                                                    {"mean": 0.0, "std": 1.0}, ["a", "b", "c"]))
    return d


@pytest.mark.parametrize(("inputs", "model", "message"), [
    (["notes.png"], None, "notes.png: not an image Pillow can read, nor an IDX images file"),
    (["truncated.png"], None, "truncated.png: unreadable image"),
    (["blank.png"], None, "blank.png: no digit found (a blank image)"),
    (["wide-idx3-ubyte"], None, "wide-idx3-ubyte: images are 32x32, expected 28x28"),
    (["empty"], None, "empty: no PNG/JPG/JPEG images in this folder"),
    (["missing.png"], None, "missing.png: no such file or folder"),
    (["good.png"], "notes.png", "notes.png: refused to load (not a plain tensor file"),
    (["good.png"], "not-a-model.pt", "not-a-model.pt: not a model file (needs keys"),
    (["good.png"], "three-classes.pt", "three-classes.pt: 3 class names but the network has 10 outputs"),
    (["good.png"], "missing.pt", "missing.pt: file not found"),
])
def test_bad_inputs_and_models_are_one_line_errors(bad, work, capsys, inputs, model, message):
    argv = [str(bad / i) for i in inputs] + ["--model", str(bad / model) if model else str(work.model)]
    with pytest.raises(SystemExit) as e:
        predict.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_an_image_past_pillows_pixel_limit_is_one_line(bad, work, capsys, monkeypatch, recwarn):
    """Between Pillow's limit and twice it, Pillow only warns (a new user's 12,000 x 12,000
    PNG printed the warning and its source line); past twice it, it refuses. One line either
    way. The limit is lowered so a small image stands for a huge one."""
    Image.new("L", (100, 100), 0).save(bad / "huge.png")
    for limit in (6_000, 4_000):  # 10,000 pixels: warned about; refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(SystemExit):
            predict.main([str(bad / "huge.png"), "--model", str(work.model)])
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad / 'huge.png'}: unreadable image (Image size (10000 "
                              f"pixels) exceeds limit") and err.count("\n") == 1, err
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_command_exits_2_without_a_traceback(bad, work):
    p = subprocess.run([sys.executable, "-m", "mnistlab.predict", str(bad / "notes.png"), "--model",
                        str(work.model)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"error: {bad / 'notes.png'}: not an image Pillow can read, nor an IDX images file"]


# --------------------------------------------------------------------------- the registry


@pytest.fixture(scope="module")
def champion(work, mlflow_store):
    """The model logged as the train stage logs it and registered as mnistlab-digits@champion."""
    run_id = log_champion(work.model)
    artifacts.write_run(work.model.parent, run_id, "mnistlab/digits", mlflow_store)
    return run_id


def test_registry_and_run_uris_predict_like_the_model_file(work, champion, capsys):
    local = predict.load_predictor(str(work.model))
    want = local.probabilities(work.images[:50])
    for uri in ("models:/mnistlab-digits@champion", f"runs:/{champion}/model"):
        p = predict.load_predictor(uri)
        assert p.classes == CLASSES
        np.testing.assert_allclose(p.probabilities(work.images[:50]), want, atol=1e-5)
    png = work.base / "one.png"
    render(work.images[0], size=90, invert=True).save(png)
    predict.main([str(png), "--model", "models:/mnistlab-digits@champion"])
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[0] == str(png) and row[1] == CLASSES[int(local.probabilities(work.images[:1]).argmax())]


def test_registry_uri_that_does_not_resolve_is_one_line(bad, champion, capsys):
    with pytest.raises(SystemExit):
        predict.main([str(bad / "good.png"), "--model", "models:/mnistlab-nope@champion"])
    err = capsys.readouterr().err
    assert err.startswith("error: models:/mnistlab-nope@champion: cannot load it from MLflow store "
                          f"{tracking.tracking_uri()}") and err.count("\n") == 1, err


def test_a_uri_mlflow_cannot_load_says_what_is_expected(bad, champion, capsys):
    """MLflow's own reason for an http URL is "not enough values to unpack (expected 2,
    got 1)" (found by a new user): the line also says which model URIs work."""
    with pytest.raises(SystemExit):
        predict.main([str(bad / "good.png"), "--model", "http://127.0.0.1:1/x"])
    err = capsys.readouterr().err
    assert err.startswith("error: http://127.0.0.1:1/x: cannot load it from MLflow store ") and \
        err.endswith("; expected models:/<name>@<alias>, models:/<name>/<version> or "
                     "runs:/<run id>/model\n") and err.count("\n") == 1, err


def test_a_registry_uri_outside_the_project_makes_no_store(bad, tmp_path, monkeypatch, capsys):
    """Found by a new user: predict run from another folder said the model was not found
    and left an empty mlflow.db there (MLflow creates the default store to look it up)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit):
        predict.main([str(bad / "good.png"), "--model", "models:/mnistlab-digits@champion"])
    err = capsys.readouterr().err
    assert err == (f"error: models:/mnistlab-digits@champion: no MLflow store at {elsewhere}/mlflow.db "
                   f"(the default is mlflow.db where the command runs: run it from the project's "
                   f"folder, or set MLFLOW_TRACKING_URI)\n")
    assert list(elsewhere.iterdir()) == []


def test_a_model_logged_without_the_serving_flavor_is_named(work, mlflow_store):
    from mnistlab.stages.compare import register_champion

    run_id = tracking.start_run("digits", "mlp", 1234, {}, {"dvc_stage": "test"})
    tracking.log_pytorch_model(run_id, build_model("mlp"), np.zeros((2, 1, 28, 28), np.float32))
    register_champion("mnistlab-plain", run_id, "champion", {})
    with pytest.raises(MnistlabError, match="not a raw-image classifier"):
        predict.load_predictor("models:/mnistlab-plain@champion")


def test_default_model_is_the_champion_of_params_first_dataset(params_file, tmp_path):
    assert predict.default_model(params_file) == "models:/mnistlab-digits@champion"
    assert predict.default_model(tmp_path / "none.yaml") == "models:/mnistlab-mnist@champion"


# --------------------------------------------------------------------------- ONNX


def test_onnx_export_agrees_with_pytorch_on_the_test_split(work, tmp_path):
    import onnx
    import onnxruntime as ort

    from mnistlab.export import export_onnx

    out = tmp_path / "champion.onnx"
    report = export_onnx(work.model, out, work.split)
    check = report["check"]
    assert check["n"] == len(work.images) and check["argmax_agreement"] >= 0.999
    assert check["max_abs_diff"] < 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["classes"] == CLASSES
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["mnistlab.classes"]) == CLASSES
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want = predict.load_predictor(str(work.model)).probabilities(work.images[:5])
    for n in (1, 5):  # the batch dimension is dynamic
        got = session.run(None, {"pixels": work.images[:n].unsqueeze(1).float().numpy()})[0]
        np.testing.assert_allclose(got, want[:n], atol=1e-5)


def test_an_export_that_misses_the_check_is_not_written(work, tmp_path, monkeypatch):
    from mnistlab import export

    monkeypatch.setattr(export, "MAX_DIFF", 0.0)  # no export can be that close
    out = tmp_path / "champion.onnx"
    with pytest.raises(MnistlabError, match=r"champion.onnx: the ONNX export disagrees with PyTorch "
                                            r"on .*max \|probability difference\|"):
        export.export_onnx(work.model, out, work.split)
    assert list(tmp_path.iterdir()) == []


def test_an_export_to_a_folder_names_it_and_leaves_no_report(work, tmp_path):
    """Found by a new user: `python -m mnistlab.export model.pt some_folder` failed on the
    rename naming the hidden temp file, and wrote some_folder.json all the same."""
    from mnistlab.export import export_onnx

    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        export_onnx(work.model, tmp_path / "taken", work.split)
    assert describe(e.value) == f"{tmp_path / 'taken'}: Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no .json, no temp file


def test_compare_exports_the_champion_and_logs_it_to_its_run(work, champion, tmp_path):
    """The compare stage: exports/<ds>/champion.onnx from the rank-1 model, logged to its run."""
    from mnistlab.stages.compare import ComparePaths, run_compare

    metrics = tmp_path / "metrics" / "digits" / "mlp" / "seed-1234"
    metrics.mkdir(parents=True)
    (metrics / "train.json").write_text(json.dumps({
        "parameters": 397510, "train_seconds": 1.0, "train_images_per_second": 1000.0,
        "epochs": 60, "best_val_accuracy": 0.9}))
    (metrics / "test.json").write_text(json.dumps({"test_accuracy": 0.9, "test_loss": 0.3,
                                                   "macro_f1": 0.9}))
    (metrics / "history.csv").write_text("epoch,val_accuracy,val_loss\n1,0.8,0.5\n2,0.9,0.3\n")
    params = {"datasets": ["digits"], "archs": ["mlp"], "seeds": [1234],
              "compare": {"rank_by": "test_accuracy", "register": True, "registry_prefix": "mnistlab",
                          "alias": "champion"}}
    paths = ComparePaths(tmp_path / "metrics", work.base / "models", tmp_path / "reports",
                         tmp_path / "curves", work.split.parent, tmp_path / "exports")
    run_compare(params, paths)
    onnx_file = tmp_path / "exports" / "digits" / "champion.onnx"
    assert onnx_file.is_file() and (tmp_path / "exports" / "digits" / "champion.json").is_file()
    champions = json.loads((tmp_path / "reports" / "champions.json").read_text())
    assert champions["digits"]["onnx"] == str(onnx_file) and champions["digits"]["run_id"] == champion
    assert champions["digits"]["seed"] == 1234
    logged = {a.path for a in tracking.client().list_artifacts(champion, "onnx")}
    assert logged == {"onnx/champion.onnx", "onnx/champion.json"}
