"""train_torch.py under `torchrun --nproc_per_node 2` on CPU (gloo): sharding, gathering, artifact.

Two processes train a tiny CLIP on 48 posts. The run must see every test post exactly
once in order, build the phase-1 cache shard-wise (its baselines equal a one-process
run's), and leave an artifact that load_model reads and that predicts what the run wrote.
It runs without --out, so rank 0 names the new runs/<timestamp> for both ranks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.artifact import load_model
from tiny_posts import write_tiny_posts
from training import train_torch
from training.data import Collator, EngagementDataset
from training.run import RUN_CONFIG_FILE

REPO = Path(__file__).resolve().parents[1]


def test_two_process_run_writes_a_loadable_artifact(tmp_path):
    from models.tiny_clip import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    # Odd split sizes, so Accelerate has to pad the last batches and drop the repeats again.
    posts = write_tiny_posts(tmp_path / "posts", counts=(("train", 27), ("val", 7), ("test", 9)))
    common = ["--data", str(posts), "--clip-model", str(clip), "--frozen-epochs", "1", "--finetune-epochs", "1",
              "--batch-size", "4", "--eval-batch-size", "4", "--num-workers", "0", "--head-hidden", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "training" / "train_torch.py"), *common],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]  # one dir for both ranks
    out = tmp_path / "runs" / "latest"
    assert out.resolve() == run.resolve()
    assert json.loads((run / RUN_CONFIG_FILE).read_text())["args"]["out"] == f"runs/{run.name}"

    m = json.loads((out / "metrics.json").read_text())
    assert m["num_processes"] == 2
    assert [h["phase"] for h in m["history"]] == ["frozen", "finetune"]
    test = EngagementDataset(posts, "test")
    records = [test[i] for i in range(len(test))]
    with open(out / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == [r.row for r in records]  # each post once, in order
    assert [float(r["label"]) for r in rows] == [r.label for r in records]

    loaded = load_model(out / "model")
    assert loaded.config["training"]["num_processes"] == 2
    score, _ = loaded.predict_batch(Collator(loaded.batcher)(records))
    np.testing.assert_allclose(score.numpy(), [float(r["pred_score"]) for r in rows], rtol=1e-5, atol=1e-5)

    # The cache gathered from two shards is the one-process cache: same baselines.
    single = tmp_path / "single"
    assert train_torch.main(common + ["--out", str(single), "--finetune-epochs", "0"]) == 0
    ref = json.loads((single / "metrics.json").read_text())["baselines"]
    for name, metrics in m["baselines"].items():
        for k, v in metrics.items():
            assert v == pytest.approx(ref[name][k], rel=1e-4, abs=1e-5), (name, k)
