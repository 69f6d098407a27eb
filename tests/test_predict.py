"""serving/predict.py: score a posts table, account for every row, and give the same output
on 2 processes (torchrun, gloo) as on 1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.artifact import CONFIG_FILE, read_config
from serving import predict
from tests.tiny_posts import write_images, write_posts, write_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(featured_model_dir) -> Path:
    """serving_fixtures.build_artifact with features: followers, platform; 80% interval +-0.7."""
    return featured_model_dir


ROWS = [  # image, caption, followers, platform, engagement; None image -> missing_path
    (0, "Sunset at the beach! #travel", "1200", "instagram", "40"),
    (1, "", "", "tiktok", "3"),
    (None, "no image", "5", "x", "1"),
    (2, "bad followers", "lots", "x", "2"),
    (3, "ok", "10", "", "not a number"),  # scored, left out of the metrics
    ("images/missing.jpg", "file gone", "10", "x", "5"),
    (4, "WOW 😍!!", "98000", "x", "900"),
]


def write_rows(root: Path) -> Path:
    """ROWS as ``root/posts.csv`` with their images."""
    return write_posts(root, ROWS, ["image_path", "description", "followers", "platform", "engagement"],
                       size=(300, 240))


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("predict_table"))


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def one_process(model_dir, table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_out") / "pred.csv"
    assert predict.main(["--model", str(model_dir), "--input", str(table), "--out", str(out), "--batch-size", "2",
                         "--num-workers", "1", "--max-reject-frac", "0.5", "--no-progress"]) == 0
    return out


def test_every_row_is_scored_or_rejected_with_a_reason(one_process):
    rows = _read(one_process)
    assert [int(r["row"]) for r in rows] == [0, 1, 4, 6]
    with open(one_process.with_name("pred.csv.rejects.csv"), newline="") as fh:
        rejects = {int(r["row"]): (r["reason"], r["image_path"]) for r in csv.DictReader(fh)}
    assert rejects == {2: ("missing_path", ""), 3: ("invalid_feature", rejects[3][1]),
                       5: ("not_found", "images/missing.jpg")}
    summary = json.loads(one_process.with_name("pred.csv.metrics.json").read_text())
    assert (summary["rows_read"], summary["kept"], summary["rejected"]) == (7, 4, 3)
    assert rows[2]["label"] == ""  # "not a number": scored, but no label for the metrics
    labelled = [r for r in rows if r["label"]]
    covered = np.mean([float(r["low_0.8"]) <= float(r["label"]) <= float(r["high_0.8"]) for r in labelled])
    assert summary["coverage"]["0.8"] == pytest.approx(covered)


def test_intervals_and_contributions(one_process):
    for r in _read(one_process):
        score = float(r["pred_score"])
        assert float(r["pred_engagement"]) == pytest.approx(np.expm1(score), rel=1e-9)
        assert float(r["high_0.8"]) == pytest.approx(np.expm1(score + 0.7), rel=1e-6)
        contrib = [float(r[f"contrib_{g}"]) for g in ("image", "caption", "sentiment", "followers", "platform")]
        assert sum(contrib) == pytest.approx(score - float(r["reference_score"]), abs=1e-5)


def test_matches_load_model_on_the_same_posts(one_process, model_dir, table):
    from data_preprocessing.posts import prepare_post
    from models.artifact import load_model

    loaded = load_model(model_dir)
    posts = [prepare_post(table.parent / "images/000.jpg", "Sunset at the beach! #travel",
                          {"followers": "1200", "platform": "instagram"}, loaded.prepare)]
    score, _ = loaded.predict_batch(loaded.batcher(posts))
    assert float(_read(one_process)[0]["pred_score"]) == pytest.approx(float(score[0]), rel=1e-6, abs=1e-6)


def test_missing_feature_column_is_a_clear_error(model_dir, tmp_path):
    posts = write_table(tmp_path / "p.csv", ["image_path", "description"], [["x.jpg", "hi"]])
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(model_dir), "--input", str(posts), "--out", str(tmp_path / "o.csv")])
    # Both feature columns at once; the label is optional when scoring.
    assert e.value.code.startswith("error: p.csv: 2 columns not found: 'followers' (a feature column of the "
                                   "model), 'platform' (a feature column of the model).")


@pytest.mark.parametrize("rows, n, want", [(7, 2, ["top 2", 6, 5, "bottom 2", 1, 0]),
                                           (3, 3, ["all 3", 2, 1, 0]), (4, 2, ["all 4", 3, 2, 1, 0])])
def test_show_lists_each_post_once(capsys, rows, n, want):
    """``--show N``: top and bottom N by prediction; a table of at most 2N rows, each row once, ranked."""
    kept = [{"row": str(i), "pred_engagement": str(10.0 * i), "low_0.8": "1", "high_0.8": "2",
             "contrib_image": str(i - 3.0), "contrib_caption": "0.5"} for i in range(rows)]
    predict.print_extremes(kept, n)
    lines = capsys.readouterr().out.splitlines()
    got = [int(ln.split()[1].rstrip(":")) if ln.startswith("  row") else " ".join(ln.split()[:2]) for ln in lines]
    assert got == want
    assert "main driver image -3.00" in lines[-1] and "80% interval 1-2" in lines[-1]

def _cli(nproc: int, model_dir: Path, table: Path, out: Path) -> None:
    """The script under torchrun with one thread per process: the thread count is the one thing
    that may change float results in the last digits, so both runs use the same."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(REPO / "serving" / "predict.py"), "--model", str(model_dir), "--input", str(table), "--out", str(out),
         "--batch-size", "2", "--num-workers", "0", "--max-reject-frac", "0.5", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_give_the_same_output(model_dir, table, tmp_path):
    _cli(1, model_dir, table, tmp_path / "one.csv")
    _cli(2, model_dir, table, tmp_path / "two.csv")
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert _read(tmp_path / "two.csv.rejects.csv") == _read(tmp_path / "one.csv.rejects.csv")
    assert len(_read(tmp_path / "two.csv")) == 4


# ---------------------------------------------------------------------------------------
# A model trained on a table with its own column names: remembered, and honest metrics
# ---------------------------------------------------------------------------------------

OWN_HEADER = ["post_id", "photo", "caption", "likes"]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, model_dir):
    """A semicolon table with its own column names, preprocessed and trained for one epoch
    (starting from the tiny CLIP inside the session's artifact: no second build)."""
    from data_preprocessing import preprocess
    from models.artifact import CLIP_SUBDIR
    from training import train_torch

    root = tmp_path_factory.mktemp("own")
    rows = [[f"p{i}", i, f"=1+{i} formula-looking caption" if i == 5 else f"post number {i} #fun", 3 * i]
            for i in range(30)]
    table = write_posts(root, rows, OWN_HEADER, image_cols=["photo"], name="train.csv", sep=";")
    assert preprocess.main(["--input", str(table), "--out", str(root / "data"), "--image-col", "photo",
                            "--text-col", "caption", "--label-col", "likes", "--val-frac", "0.2",
                            "--test-frac", "0.2", "--workers", "1", "--no-progress"]) == 0
    from data_preprocessing.records import RecordReader

    in_train = RecordReader(root / "data" / "train.pkl")[0].row
    clip = model_dir / CLIP_SUBDIR
    assert train_torch.main(["--data", str(root / "data"), "--out", str(root / "run"), "--clip-model", str(clip),
                             "--frozen-epochs", "1", "--finetune-epochs", "0", "--batch-size", "8",
                             "--eval-batch-size", "16", "--num-workers", "0", "--head-hidden", "32"]) == 0
    # To score: every training-table row, four new posts, and a copy of a train post (same image
    # and caption, another id).
    new = [[f"n{i}", 30 + i, f"a new post {i}", 7 * i] for i in range(4)]
    scored = write_posts(root, rows + new + [["copy", *rows[in_train][1:]]], OWN_HEADER, image_cols=["photo"],
                         name="score.csv", sep=";")  # writes images 0-29 again, byte for byte
    return root, scored


def test_a_table_of_the_training_shape_needs_no_column_flags(own_run, capsys):
    from data_preprocessing.records import RecordReader

    root, scored = own_run
    out = root / "scored.csv"
    assert predict.main(["--model", str(root / "run" / "model"), "--input", str(scored), "--out", str(out),
                         "--keep-cols", "post_id,caption", "--num-workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(scored, newline="") as fh:
        table = list(csv.DictReader(fh, delimiter=";"))
    got = _read(out)
    assert list(got[0])[:5] == ["row", "post_id", "caption", "seen_in_training", "label"]
    assert [r["post_id"] for r in got] == [t["post_id"] for t in table]  # carried through, in row order
    assert got[5]["caption"] == "'=1+5 formula-looking caption"  # escaped: text to a spreadsheet
    assert all(float(r[k]) == float(r[k]) for r in got for k in r if k.startswith(("pred_", "contrib_", "low_")))

    fitted = {rec.row for split in ("train", "val") for rec in RecordReader(root / "data" / f"{split}.pkl")}
    seen = {int(r["row"]) for r in got if r["seen_in_training"] == "true"}
    assert seen == fitted | {34}  # the train and val posts, and the copy of a train post
    summary = json.loads(out.with_name("scored.csv.metrics.json").read_text())
    n_unseen = len(table) - len(seen)
    assert (summary["rows_seen_in_training"], summary["rows_in_metrics"]) == (len(seen), n_unseen)
    assert f"metrics on {n_unseen} unseen rows; {len(seen)} rows were in training or validation" in printed
    unseen = [r for r in got if r["seen_in_training"] == "false"]
    z = np.log1p([float(r["label"]) for r in unseen])
    residual = z - np.array([float(r["pred_score"]) for r in unseen])
    r2 = 1 - (residual ** 2).sum() / ((z - z.mean()) ** 2).sum()
    assert summary["metrics_model_scale"]["r2"] == pytest.approx(r2, rel=1e-6, abs=1e-9)


def test_training_records_the_schema_and_the_fingerprints(own_run):
    from models.artifact import artifact_fingerprints, artifact_table

    root, _ = own_run
    model = root / "run" / "model"
    assert artifact_table(model) == {"columns": {"image": ["photo"], "text": "caption", "label": "likes",
                                                 "features": []},
                                     "dialect": {"format": "csv", "encoding": "utf-8-sig", "sep": ";"}}
    saved = np.load(root / "data" / "fingerprints.npz")
    assert artifact_fingerprints(model).tolist() == sorted(set(saved["train"].tolist() + saved["val"].tolist()))
    assert not set(saved["test"].tolist()) & set(artifact_fingerprints(model).tolist())


def test_missing_columns_fail_before_the_model_loads(own_run, tmp_path):
    """A model dir with only config.json: loading it fails, so only a check made before the
    load can answer with the missing columns."""
    root, scored = own_run
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text((root / "run" / "model" / CONFIG_FILE).read_text())
    with pytest.raises((OSError, ValueError, SystemExit)) as e:  # what loading this model does
        predict.main(["--model", str(broken), "--input", str(scored), "--out", str(tmp_path / "o.csv")])
    assert "not found: 'caption'" not in str(e.value)
    table = write_table(tmp_path / "t.csv", ["post_id", "photo", "text", "likes"], [["a", "images/000.jpg", "x", 1]])
    with pytest.raises(SystemExit) as e:
        predict.main(["--model", str(broken), "--input", str(table), "--out", str(tmp_path / "o.csv")])
    assert e.value.code.startswith("error: t.csv: 1 column not found: 'caption' (--text-col).")
    with pytest.raises(SystemExit) as e:  # a flag overrides the remembered name
        predict.main(["--model", str(broken), "--input", str(table), "--out", str(tmp_path / "o.csv"),
                      "--text-col", "text", "--keep-cols", "post_id,shop"])
    assert e.value.code.startswith("error: t.csv: 1 column not found: 'shop' (--keep-cols).")


# ---------------------------------------------------------------------------------------
# Timestamps and image URLs, as preprocessing reads them
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datetime_model_dir(model_dir, tmp_path_factory) -> Path:
    """The featured artifact with its two columns (5 inputs) swapped for one timestamp column
    of the same width: posted_at in New York time, hour and weekday (2 + 2) and the missing flag."""
    import shutil

    from data_preprocessing.features import FeatureColumn, FeatureSchema

    out = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("datetime_model") / "model"))
    column = FeatureColumn("posted_at", "datetime", timezone="America/New_York")
    schema = FeatureSchema.fit([column], {"posted_at": [1.74e9 + 3600 * 7 * i for i in range(10)]})
    config = read_config(out)
    assert schema.width == config["prepare"]["features"]["width"] == 5
    config["prepare"]["features"] = schema.to_dict()
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return out


def test_timestamps_and_url_images_are_read_as_preprocessing_reads_them(datetime_model_dir, tmp_path):
    from datetime import datetime

    from tests.image_server import LoopbackServer, static

    names = write_images(tmp_path / "images", 2, size=(64, 48))
    server = LoopbackServer({"/p/1.jpg": static((tmp_path / "images" / names[1]).read_bytes(), "image/jpeg")})
    iso = "2025-03-05T23:30:00+0000"
    unix = str(int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()))
    rows = [[f"images/{names[0]}", "same post", iso, 5], [f"images/{names[0]}", "same post", unix, 5],
            [f"images/{names[0]}", "a bad time", "yesterday", 5], [f"images/{names[0]}", "no time", "", 5],
            [server.url("/p/1.jpg"), "from a URL", iso, 7], [server.url("/gone.jpg"), "a dead link", iso, 7]]
    table = write_table(tmp_path / "posts.csv", ["image_path", "description", "posted_at", "engagement"], rows)

    def score(out: Path) -> tuple[list[dict], dict]:
        assert predict.main(["--model", str(datetime_model_dir), "--input", str(table), "--out", str(out),
                             "--image-cache", str(tmp_path / "cache"), "--num-workers", "0",
                             "--max-reject-frac", "0.5", "--no-progress"]) == 0
        with open(out.with_name(out.name + ".rejects.csv"), newline="") as fh:
            return _read(out), {int(r["row"]): r["reason"] for r in csv.DictReader(fh)}

    try:
        got, rejects = score(tmp_path / "live.csv")
    finally:
        server.stop()
    assert rejects == {2: "invalid_datetime", 5: "download_failed"}
    assert [int(r["row"]) for r in got] == [0, 1, 3, 4]
    assert got[0]["pred_score"] == got[1]["pred_score"]  # the same instant, as ISO 8601 and as Unix seconds
    assert got[0]["pred_score"] != got[2]["pred_score"]  # a missing time is imputed, not ignored
    # The server is gone: the cached image scores the same.
    again, rejects = score(tmp_path / "cached.csv")
    assert again == got and rejects == {2: "invalid_datetime", 5: "download_failed"}


def test_the_default_model_is_runs_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = write_table(tmp_path / "p.csv", ["image_path", "description"], [["x.jpg", "hi"]])
    with pytest.raises(SystemExit) as e:
        predict.main(["--input", str(table), "--out", str(tmp_path / "o.csv")])
    assert e.value.code.startswith("error: no model at runs/latest/model (the default --model")
    assert "training/train_torch.py" in e.value.code and "--model RUN_DIR/model" in e.value.code


@pytest.mark.parametrize("script", ["serving/predict.py", "data_preprocessing/preprocess.py", "test_preprocessing.py"])
def test_help_imports_no_torch(script):
    """--help answers before torch (seconds to import) is loaded."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert {"numpy", "data_preprocessing.records"} & imported  # the listing was read
    assert not {m for m in imported if m == "torch" or m.startswith(("torch.", "transformers"))}
