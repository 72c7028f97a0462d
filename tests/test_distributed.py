"""DDP under torchrun: 2 gloo processes on CPU match single-process training with the same global batch."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.repo import committed_params

from mnistlab.data.digits import write_digits
from mnistlab.data.split import split as split_dataset
from mnistlab.utils import torch_load

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Stated tolerance: DDP all-reduces per-rank gradient sums in another order than a
# single process sums them, so weights agree to float32 rounding, not bit for bit.
ATOL = 1e-5


def _train(tmp: Path, params: dict, launcher: list[str], arch: str = "mlp") -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(ROOT / "stages" / "train.py"), "--dataset", "digits", "--arch", arch,
           "--seed", "1234", "--split", str(tmp.parent / "split"), "--model-dir", str(tmp / "model"),
           "--metrics-dir", str(tmp / "metrics"), "--checkpoint", str(tmp / "ckpt" / "last.pt"),
           "--params", str(tmp / "params.yaml")]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_single_process(tmp_path: Path):
    raw, split = tmp_path / "raw", tmp_path / "split"
    write_digits(raw)
    split_dataset(raw, split, [str(i) for i in range(10)], 0.1, 0.2, 1234, "digits")

    params = committed_params()
    # fp32: the comparison is about DDP's gradient averaging, not bf16 rounding.
    params["train"].update(min_steps=0, device="cpu", bf16=False)
    # No dropout or BatchNorm in the MLP: the two runs see exactly the same batches.
    params["hparams"]["mlp"].update(epochs=2, batch_size=100)

    single = _train(tmp_path / "single", copy.deepcopy(params), [str(BIN / "python")])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _train(tmp_path / "ddp", copy.deepcopy(params),
                 [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    a = torch_load(tmp_path / "single" / "model" / "model.pt")["state_dict"]
    b = torch_load(tmp_path / "ddp" / "model" / "model.pt")["state_dict"]
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |single - ddp| weight difference: {worst:.3g}")
    assert worst < ATOL, f"max |single - ddp| = {worst}"
    assert worst > 0 or all(torch.equal(a[k], b[k]) for k in a)

    ha = json.loads((tmp_path / "single" / "metrics" / "train.json").read_text())
    hb = json.loads((tmp_path / "ddp" / "metrics" / "train.json").read_text())
    assert hb["epochs"] == ha["epochs"] == 2
    assert abs(hb["final_val_accuracy"] - ha["final_val_accuracy"]) <= 1 / 144 + 1e-9

    # Only rank 0 logged: one MLflow run, recording the world size.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ddp' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_batch_not_divisible_by_world_is_a_one_line_error(tmp_path: Path):
    raw, split = tmp_path / "raw", tmp_path / "split"
    write_digits(raw)
    split_dataset(raw, split, [str(i) for i in range(10)], 0.1, 0.2, 1234, "digits")
    params = committed_params()
    params["train"].update(min_steps=0, device="cpu")
    params["hparams"]["mlp"].update(epochs=1, batch_size=101)
    p = _train(tmp_path / "ddp", params, [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"])
    assert p.returncode != 0
    assert "error: hparams.mlp.batch_size: 101 is not divisible by the 2 torchrun processes" in p.stderr
    assert not (tmp_path / "ddp" / "model" / "model.pt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_torchrun_nccl_two_gpus(tmp_path: Path):
    raw, split = tmp_path / "raw", tmp_path / "split"
    write_digits(raw)
    split_dataset(raw, split, [str(i) for i in range(10)], 0.1, 0.2, 1234, "digits")
    params = committed_params()
    params["train"].update(min_steps=0, device="cuda")
    params["hparams"]["resnet_bn"].update(epochs=1)
    p = _train(tmp_path / "ddp", params, [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
               arch="resnet_bn")
    assert p.returncode == 0, p.stderr[-3000:]
