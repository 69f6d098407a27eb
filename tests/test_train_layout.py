"""train_torch.py's default layout and its messages, without training anything.

The bare script reads data/processed/ and writes runs/<timestamp>/ with runs/latest
pointing at the newest finished run (training/layout.py); what it says when the data is
missing; --help without torch; the baseline verdict; what metrics.json repeats from the
data's meta.json (the split rule, the label expression). The runs themselves are in
test_train.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

from training.baselines import beaten_by, beaten_message
from training.data import LEGACY_SPLIT, label_expression, split_rule
from training.layout import new_run_dir, publish_latest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_torch.py"


def _script(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_parsing_the_arguments_imports_no_torch():
    """--help and usage errors answer before the seconds torch, transformers and accelerate take."""
    code = ("import sys\n"
            "from common.config import parse_config\n"
            "from training import train_torch\n"
            "cfg = parse_config(train_torch.TrainConfig, ['--frozen-epochs', '1'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    help_text = _script(REPO, "--help")
    assert help_text.returncode == 0 and "runs/<timestamp>" in help_text.stdout


def test_bare_run_without_data_says_where_to_put_the_table(tmp_path):
    out = _script(tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "no preprocessed data in data/processed/" in out.stderr
    assert "data/posts.csv" in out.stderr and "--data DIR" in out.stderr
    assert 'section "On your own data"' in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_missing_data_given_by_flag_names_the_flag(tmp_path):
    out = _script(tmp_path, "--data", "elsewhere")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--data elsewhere: no meta.json there" in out.stderr
    assert "preprocess.py --out elsewhere" in out.stderr


def test_resume_needs_the_run_dir(tmp_path):
    out = _script(tmp_path, "--resume")
    assert out.returncode == 2 and "--resume needs --out RUN_DIR" in out.stderr


def test_new_run_dirs_are_timestamps_and_never_shared(tmp_path):
    now = datetime(2026, 12, 7, 18, 30, 0)
    first, second = new_run_dir(tmp_path / "runs", now), new_run_dir(tmp_path / "runs", now)
    assert (first.name, second.name) == ("20261207-183000", "20261207-183000-2")
    assert first.is_dir() and second.is_dir()


def test_latest_is_a_relative_link_replaced_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old, new = new_run_dir("runs", datetime(2026, 1, 1)), new_run_dir("runs", datetime(2026, 1, 2))
    assert publish_latest(old) == Path("runs/latest")
    assert os.readlink("runs/latest") == old.name  # relative: the runs folder can move
    assert publish_latest(new) == Path("runs/latest")
    assert os.readlink("runs/latest") == new.name
    assert Path("runs/latest").resolve() == new.resolve()
    assert sorted(p.name for p in Path("runs").iterdir()) == sorted([old.name, new.name, "latest"])  # no temp link


def test_a_run_outside_runs_leaves_latest_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = new_run_dir("runs", datetime(2026, 1, 1))
    publish_latest(kept)
    elsewhere = tmp_path / "runs" / "demo" / "run"
    elsewhere.mkdir(parents=True)
    assert publish_latest(elsewhere) is None
    assert os.readlink("runs/latest") == kept.name


def test_latest_that_is_a_real_directory_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    run = new_run_dir("runs", datetime(2026, 1, 1))
    assert publish_latest(run) is None
    assert (tmp_path / "runs" / "latest").is_dir() and not (tmp_path / "runs" / "latest").is_symlink()
    assert "could not point runs/latest" in caplog.text
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []


def test_baseline_verdict_names_the_baseline_and_both_r2():
    baselines = {"mean": {"r2": -0.01}, "sentiment_linear": {"r2": 0.05},
                 "frozen_clip_ridge": {"r2": 0.31}, "features_only": {"r2": 0.52}}
    assert beaten_by(0.4, baselines) == ["features_only"]
    text = beaten_message(0.4, baselines)
    assert text.startswith("baseline features_only beats the kept model on test: R² 0.5200 against the kept "
                           "model's 0.4000 (model scale). The feature columns alone do better")
    assert "Also ahead" not in text
    # several: the best first, the others named with their R²
    assert beaten_by(0.0, baselines) == ["features_only", "frozen_clip_ridge", "sentiment_linear"]
    assert beaten_message(0.0, baselines).endswith(
        "Also ahead of it: frozen_clip_ridge (R² 0.3100), sentiment_linear (R² 0.0500).")
    assert beaten_message(0.6, baselines) is None
    assert beaten_message(float("nan"), baselines) is None  # no verdict without a test R² (one test post)
    assert beaten_message(0.6, {"mean": {"r2": float("nan")}}) is None


def test_split_rule_repeats_the_datas_split_summary():
    from data_preprocessing.splits import SplitPlan, SplitRule, describe_split, split_summary

    times = np.arange(10, dtype=float) * 86_400 + 1_735_689_600
    plan = SplitPlan(SplitRule("time", "posted_at"), np.array([0] * 6 + [1] * 2 + [2] * 2, dtype=np.int8), {},
                     times=times)
    summary = split_summary(plan, 0.2, 0.2)
    rule = split_rule({"split": summary})
    assert rule == {"description": describe_split(summary), "summary": summary}
    assert rule["description"].startswith("split time:posted_at: train 60.0%, val 20.0%, test 20.0%; train "
                                          "2025-01-01T00:00:00+00:00 .. 2025-01-06T00:00:00+00:00")
    # data written before split rules were recorded: what preprocessing always did
    assert split_rule({"counts": {}}) == {"description": LEGACY_SPLIT, "summary": None}
    assert LEGACY_SPLIT == "random split (seeded shuffle)"


def test_label_expression_comes_from_meta():
    from data_preprocessing.label_expr import LabelExpr

    summed = LabelExpr(("like_count", "comments_count")).to_dict()
    assert label_expression({"label": summed}) == summed
    assert label_expression({"table": {"columns": {"label": "likes+comments"}}})["columns"] == ["likes", "comments"]
    assert label_expression({"table": {"columns": {"label": "engagement"}}})["description"] == \
        "the post's 'engagement' count"
    assert label_expression({}) is None


def test_the_features_baseline_without_the_posting_time_shows_what_the_time_adds():
    """With a timestamp column, a second features-only baseline leaves its inputs out; on a label
    made of the time inputs it must do worse than features_only, and it exists only with them."""
    import numpy as np

    from training.baselines import baseline_metrics

    rng = np.random.default_rng(0)

    def split(n):
        features = rng.normal(size=(n, 4))  # inputs 0-1: an account column; 2-3: the time's (sin, cos)
        return {"img": rng.normal(size=(n, 3)), "txt": rng.normal(size=(n, 3)), "sentiment": rng.normal(size=n),
                "features": features, "z": features[:, 0] + 2 * features[:, 2] + 0.1 * rng.normal(size=n)}

    train, test = split(400), split(200)
    time_inputs = np.array([False, False, True, True])
    out = baseline_metrics(train, test, time_inputs)
    assert out["features_only"]["r2"] > 0.95 and out["features_without_time"]["r2"] < 0.3
    assert "features_without_time" not in baseline_metrics(train, test)
