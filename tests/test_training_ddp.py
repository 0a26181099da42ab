"""fit() under torchrun: two CPU processes with gloo train in lockstep; only rank 0 writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from training import load_checkpoint
from training_toy import fresh_mlflow_store

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_trains_identical_replicas_and_only_rank0_writes(tmp_path):
    from mlflow import MlflowClient

    out_dir, run_dir = tmp_path / "out", tmp_path / "run"
    out_dir.mkdir()
    fresh_mlflow_store(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "training_toy.py"), str(out_dir), str(run_dir)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reports = [json.loads((out_dir / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    # each rank drew its own data (seed + rank) ...
    assert reports[0]["first_batch_sums"][0] != reports[1]["first_batch_sums"][0]
    # ... yet the replicas stayed identical, through the resume from last.pt that both ranks loaded
    weights = [torch.load(out_dir / f"weights_rank{r}.pt") for r in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    for r in reports:
        assert (r["first_last_step"], r["second_resumed_from"], r["second_last_step"]) == (4, 4, 6)
        assert r["history_steps"] == [2, 4, 6]
    assert reports[0]["best_metric"] == reports[1]["best_metric"]  # rank 0's validation, shared

    # only rank 0 wrote checkpoints and tracked
    assert reports[1]["saves"] == [] and not reports[1]["tracker_enabled"]
    assert "last.pt" in reports[0]["saves"] and "best.pt" in reports[0]["saves"]
    assert load_checkpoint(out_dir / "last.pt")["step"] == 6
    assert len(load_checkpoint(out_dir / "last.pt")["rng"]) == 2  # one random state per rank
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/dice")] == [2, 4, 6]
