"""training/train_torch.py on a tiny random CLIP and 48 posts: phases, cache, resume, artifact.

The tiny CLIP and the posts are built once per session; one straight 2+2-epoch run is
shared by the tests that only read its outputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from common.metrics import regression_metrics
from models.artifact import load_model, read_config
from models.clip_regressor import CLIPRegressor, HeadConfig, TargetTransform
from tiny_posts import write_tiny_posts
from data_preprocessing.posts import Record
from common.config import parse_config
from training import data as train_data
from training import train_torch
from training.config import TrainConfig
from training.run import RUN_CONFIG_FILE
from training.data import Collator, EngagementDataset, make_loader
from training.loop import NonFiniteGuard, start_phase, train_one_epoch

KEYS = {"rmse", "mae", "r2", "pearson", "spearman"}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from models.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def posts(tmp_path_factory):
    return write_tiny_posts(tmp_path_factory.mktemp("posts"))


def small(clip, *extra) -> list[str]:
    """Small and fast: 4 train batches of 8, a narrow head, no worker processes."""
    return ["--clip-model", str(clip), "--batch-size", "8", "--eval-batch-size", "16", "--num-workers", "0",
            "--head-hidden", "32", "--clip-lr", "1e-4", *extra]


def args(posts, out, clip, *extra) -> list[str]:
    return ["--data", str(posts), "--out", str(out), *small(clip, *extra)]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, posts, tiny_clip):
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "2", "--finetune-epochs", "2")) == 0
    return out


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def _checkpoint_history(run_dir):
    state = torch.load(run_dir / "checkpoint" / "training_state.pt", weights_only=True)
    return state["state"]["history"]


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_smoke_outputs(straight_run):
    m = _metrics(straight_run)
    assert set(m["test"]) == KEYS and set(m["test_after_frozen"]) == KEYS
    assert set(m["test_label_units"]) == {"rmse", "mae"}
    assert set(m["baselines"]) == {"mean", "sentiment_linear", "frozen_clip_ridge"}
    assert all(set(b) == KEYS for b in m["baselines"].values())
    assert [(h["epoch"], h["phase"]) for h in m["history"]] == [
        (1, "frozen"), (2, "frozen"), (3, "finetune"), (4, "finetune")]
    assert {"train_loss", "val_rmse", "val_r2", "lr_head", "seconds"} <= set(m["history"][0])
    assert "lr_clip" in m["history"][2] and "lr_clip" not in m["history"][0]
    assert m["timings"]["embedding_cache_build_seconds"] > 0
    assert m["timings"]["embedding_cache_used"] is True
    for png in ("learning_curves.png", "pred_vs_actual.png"):
        assert (straight_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((straight_run / RUN_CONFIG_FILE).read_text())["args"]["frozen_epochs"] == 2
    art = read_config(straight_run / "model")
    assert art["training"]["args"]["clip_lr"] == 1e-4 and "git_commit" in art["training"]
    assert art["metrics"]["test"] == m["test"]
    assert art["target_transform"]["kind"] == "log1p" and art["target_transform"]["std"] > 0
    assert (straight_run / "model" / "clip" / "model.safetensors").is_file()
    assert (straight_run / "model" / "head.safetensors").is_file()


def test_collator_matches_batcher(posts, tiny_clip):
    from transformers import CLIPConfig, CLIPProcessor

    from models.clip_regressor import PostBatcher

    processor = CLIPProcessor.from_pretrained(tiny_clip)
    batcher = PostBatcher.from_clip(processor, CLIPConfig.from_pretrained(tiny_clip))
    ds = EngagementDataset(posts, "val")
    records = [ds[i] for i in range(4)]
    target = TargetTransform.fit([r.label for r in records])
    batch = Collator(batcher, target)(records)
    plain = batcher(records)
    for k, v in plain.items():
        assert torch.equal(batch[k], v)
    assert batch["label"].dtype == torch.float64 and batch["target"].dtype == torch.float32
    assert torch.allclose(batch["target"].double(), (torch.log1p(batch["label"]) - target.mean) / target.std)
    assert set(Collator(batcher)(records)) == set(plain)


def test_resume_equals_straight_run(tmp_path, posts, tiny_clip, straight_run):
    from safetensors.torch import load_file
    from transformers import CLIPModel

    out = tmp_path / "resumed"
    base = args(posts, out, tiny_clip, "--frozen-epochs", "2", "--finetune-epochs", "2")
    # Interrupted mid phase 1, then mid phase 2 (across the boundary), then finished.
    assert train_torch.main(base + ["--stop-after-epochs", "1"]) == 0
    assert not (out / "metrics.json").exists()
    # After a frozen epoch every CLIP weight is still the pretrained one.
    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    original = CLIPModel.from_pretrained(tiny_clip).state_dict()
    assert all(torch.equal(weights[f"clip.{k}"], v) for k, v in original.items())
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        train_torch.main(base)
    with pytest.raises(SystemExit, match="head_lr"):
        train_torch.main(base + ["--resume", "--head-lr", "0.5"])
    assert train_torch.main(base + ["--resume", "--stop-after-epochs", "3"]) == 0
    assert len(_checkpoint_history(out)) == 3
    assert train_torch.main(base + ["--resume"]) == 0

    a, b = _metrics(straight_run), _metrics(out)
    assert _without_seconds(a["history"]) == _without_seconds(b["history"])
    for key in ("test", "test_after_frozen", "baselines", "test_label_units", "best"):
        assert a[key] == b[key], key
    head_a = load_file(str(straight_run / "model" / "head.safetensors"))
    head_b = load_file(str(out / "model" / "head.safetensors"))
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)


def test_embedding_cache_matches_recomputing(tmp_path, posts, tiny_clip, straight_run):
    out = tmp_path / "nocache"
    assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "2", "--finetune-epochs", "0",
                                 "--no-embedding-cache")) == 0
    cached, recomputed = _metrics(straight_run), _metrics(out)
    assert recomputed["timings"]["embedding_cache_used"] is False
    for h_c, h_r in zip(cached["history"][:2], recomputed["history"]):
        for k in ("train_loss", "val_rmse", "val_mae", "val_r2", "val_pearson"):
            assert h_r[k] == pytest.approx(h_c[k], rel=1e-5, abs=1e-6), k
    for k in KEYS:
        assert recomputed["test_after_frozen"][k] == pytest.approx(cached["test_after_frozen"][k], rel=1e-5, abs=1e-6)


def test_gradient_flow_through_phases(tmp_path, posts, tiny_clip, caplog):
    from accelerate import Accelerator
    from transformers import CLIPProcessor

    from models.clip_regressor import PostBatcher

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = CLIPRegressor.from_pretrained(tiny_clip, HeadConfig(hidden=32, dropout=0.0))
    batcher = PostBatcher.from_clip(CLIPProcessor.from_pretrained(tiny_clip), model.clip.config)
    train = EngagementDataset(posts, "train")
    loader = make_loader(train, 8, Collator(batcher, TargetTransform.fit(train.labels())), shuffle_seed=0)
    cfg = TrainConfig(data=str(posts), out=str(tmp_path), clip_model=str(tiny_clip), head_lr=1e-2, clip_lr=1e-3,
                      frozen_epochs=1, finetune_epochs=1, warmup_frac=0.0)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(loader)

    def snapshot(module):
        return {k: p.detach().clone() for k, p in module.named_parameters()}

    clip0, head0 = snapshot(model.clip), snapshot(model.head)
    step, opt, sched = start_phase("frozen", model, accelerator, cfg, len(loader))
    train_one_epoch(step, loader, opt, sched, accelerator, NonFiniteGuard(3), max_grad_norm=1.0, desc="frozen")
    assert all(torch.equal(p, clip0[k]) for k, p in model.clip.named_parameters())
    assert all(not torch.equal(p, head0[k]) for k, p in model.head.named_parameters())

    step, opt, sched = start_phase("finetune", model, accelerator, cfg, len(loader))
    train_one_epoch(step, loader, opt, sched, accelerator, NonFiniteGuard(3), max_grad_norm=1.0, desc="finetune")
    unchanged = [k for k, p in model.clip.named_parameters() if torch.equal(p, clip0[k])]
    assert unchanged == ["logit_scale"]  # the contrastive temperature is not on the regression path
    # Each phase logs what it trains: the head alone, then everything but the temperature.
    logged = [tuple(int(n.replace(",", "")) for n in m.groups()) for r in caplog.records
              if (m := re.search(r"([\d,]+) of ([\d,]+) parameters trainable", r.getMessage()))]
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert logged[-2:] == [(head, total), (total - model.clip.logit_scale.numel(), total)]


def test_artifact_round_trip(straight_run, posts):
    loaded = load_model(straight_run / "model")
    test = EngagementDataset(posts, "test")
    records = [test[i] for i in range(len(test))]
    score, likes = loaded.predict_batch(Collator(loaded.batcher)(records))
    with open(straight_run / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == [r.row for r in records]
    in_memory = np.array([float(r["pred_score"]) for r in rows])
    np.testing.assert_allclose(score.numpy(), in_memory, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(likes.numpy(), [float(r["pred_engagement"]) for r in rows], rtol=1e-4)
    truth = np.log1p([r.label for r in records])
    assert regression_metrics(truth, score.numpy())["r2"] == pytest.approx(_metrics(straight_run)["test"]["r2"],
                                                                           abs=1e-4)


def _nan_head(monkeypatch, first_n: int | None):
    """Make training (grad-enabled) head outputs NaN: the first ``first_n`` calls, or all."""
    original = CLIPRegressor.head_forward
    calls = {"n": 0}

    def head_forward(self, *args):
        out = original(self, *args)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if first_n is None or calls["n"] <= first_n:
                return out * float("nan")
        return out

    monkeypatch.setattr(CLIPRegressor, "head_forward", head_forward)


def test_nonfinite_loss_is_skipped(tmp_path, posts, tiny_clip, monkeypatch, capsys):
    _nan_head(monkeypatch, first_n=2)
    out = tmp_path / "nan"
    assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "0")) == 0
    m = _metrics(out)
    assert m["history"][0]["nonfinite_steps"] == 2
    assert np.isfinite(m["history"][0]["train_loss"]) and np.isfinite(m["test"]["rmse"])
    # logged by main's handler, once per check: here the end-of-epoch one
    assert "non-finite loss at epoch 1/1 frozen: 2 update(s) skipped" in capsys.readouterr().err


def test_nonfinite_loss_aborts(tmp_path, posts, tiny_clip, monkeypatch):
    _nan_head(monkeypatch, first_n=None)
    # The guard reads its device-side counters at the end of the epoch: all 4 batches were non-finite.
    with pytest.raises(SystemExit, match="4 consecutive non-finite losses"):
        train_torch.main(args(posts, tmp_path / "nan", tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "0",
                              "--max-nonfinite-steps", "3"))


@pytest.mark.parametrize("change, message", [
    ({"cleaning_version": "0"}, "cleaning version"),
    ({"image_size_policy": {"shortest_edge": 100, "resample": 3}}, "upsampled"),
])
def test_refuses_mismatched_data(tmp_path, posts, tiny_clip, change, message):
    data = tmp_path / "data"
    shutil.copytree(posts, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(SystemExit, match=message):
        train_torch.main(args(data, tmp_path / "run", tiny_clip))
    assert not (tmp_path / "run" / "checkpoint").exists()


# ---------------------------------------------------------------------------------------
# Feature columns
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def featured_run(tmp_path_factory, tiny_clip):
    posts = write_tiny_posts(tmp_path_factory.mktemp("featured_posts"), features=True)
    out = tmp_path_factory.mktemp("runs") / "featured"
    assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "2", "--finetune-epochs", "1")) == 0
    return posts, out


def test_features_reach_the_head_and_the_artifact(featured_run):
    posts, out = featured_run
    art = read_config(out / "model")
    schema = art["prepare"]["features"]
    assert [f["column"]["name"] for f in schema["features"]] == ["followers", "platform"]
    assert schema["features"][0]["transform"] == "log1p"  # a skewed count
    width = 2 + len(schema["features"][1]["categories"]) + 1  # value + missing flag, one-hot + unknown
    assert art["architecture"]["n_features"] == schema["width"] == width
    loaded = load_model(out / "model")  # rebuilt from config.json alone
    d = loaded.model.clip.config.projection_dim
    assert loaded.model.head.in_features == 3 * d + 1 + width
    # The served batch carries the encoded features, and they change the prediction.
    records = [EngagementDataset(posts, "test")[i] for i in range(4)]
    batch = Collator(loaded.batcher)(records)
    assert batch["features"].shape == (4, width)
    more = [Record(**{**vars(r), "features": {**r.features, "followers": 1e6}}) for r in records]
    score, _ = loaded.predict_batch(batch)
    score_more, _ = loaded.predict_batch(Collator(loaded.batcher)(more))
    assert not torch.allclose(score, score_more)


def test_features_only_baseline_and_feature_aware_baselines(featured_run):
    _, out = featured_run
    m = _metrics(out)
    assert set(m["baselines"]) == {"mean", "sentiment_linear", "frozen_clip_ridge", "features_only"}
    # followers drive the tiny set's label: the features alone already explain much of it
    assert m["baselines"]["features_only"]["r2"] > m["baselines"]["mean"]["r2"] + 0.2


# ---------------------------------------------------------------------------------------
# Phase 0 linear probe, WiSE-FT, checkpoints, trackers
# ---------------------------------------------------------------------------------------


def test_fit_ridge_matches_sklearn_and_picks_the_penalty_on_val():
    from sklearn.linear_model import Ridge

    from training.probe import fit_ridge

    rng = np.random.default_rng(0)
    w_true = rng.normal(size=20)
    x = rng.normal(size=(120, 20))
    y = x @ w_true + rng.normal(0, 2.0, 120)
    xt, yt, xv, yv = (torch.from_numpy(a) for a in (x[:80], y[:80], x[80:], y[80:]))
    fit = fit_ridge(xt, yt, xv, yv, alphas=(0.1, 10.0, 1000.0))
    assert fit.alpha == min(fit.val_mse, key=fit.val_mse.get)
    ref = Ridge(alpha=fit.alpha).fit(x[:80], y[:80])
    np.testing.assert_allclose(fit.weight.numpy(), ref.coef_, rtol=1e-4, atol=1e-5)
    assert fit.bias == pytest.approx(ref.intercept_, abs=1e-5)


def test_phase1_starts_at_the_probe_and_never_ends_below_it(straight_run):
    m = _metrics(straight_run)
    probe = m["probe"]
    assert probe["alpha"] > 0 and set(probe["val"]) == KEYS and set(probe["test"]) == KEYS
    frozen_val = [h["val_rmse"] for h in m["history"] if h["phase"] == "frozen"]
    # The best frozen-phase model is the probe unless a frozen epoch beat it on val.
    best_frozen = min([probe["val"]["rmse"], *frozen_val])
    assert m["wise_ft"]["curve"][0]["alpha"] == 0.0
    assert m["wise_ft"]["curve"][0]["val_rmse"] == pytest.approx(best_frozen, rel=1e-5)
    # The probe is at least as good as the ridge baseline on the same frozen embeddings (on val it is
    # chosen; on test allow the noise of 8 posts).
    assert probe["test"]["r2"] >= m["baselines"]["frozen_clip_ridge"]["r2"] - 0.15


def test_wise_ft_keeps_the_best_interpolation_on_val(straight_run):
    m = _metrics(straight_run)
    wise = m["wise_ft"]
    assert [p["alpha"] for p in wise["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    best = min(wise["curve"], key=lambda p: p["val_rmse"])
    assert wise["chosen_alpha"] == best["alpha"]
    # alpha = 1 is the end of fine-tuning: the last epoch's validation
    assert wise["curve"][-1]["val_rmse"] == pytest.approx(m["history"][-1]["val_rmse"], rel=1e-5)
    art = read_config(straight_run / "model")
    assert art["training"]["wise_ft_alpha"] == wise["chosen_alpha"]


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, posts, tiny_clip):
    """No WiSE-FT, with the TensorBoard tracker: the best epoch is kept."""
    out = tmp_path_factory.mktemp("runs") / "plain"
    assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "2",
                                 "--wise-ft-alphas", "none", "--report-to", "tensorboard")) == 0
    return out


def test_without_wise_ft_the_best_epoch_is_kept(plain_run, posts):
    m = _metrics(plain_run)
    assert m["wise_ft"] is None
    best = m["best"]
    values = {0: m["probe"]["val"]["rmse"], **{h["epoch"]: h["val_rmse"] for h in m["history"]}}
    assert best["epoch"] == min(values, key=values.get)


def test_tensorboard_logs_epochs_lrs_and_the_phase_boundary(plain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(plain_run.rglob("events.out.tfevents.*"))
    assert events, list(plain_run.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val_rmse", "train_loss", "lr_head", "lr_clip", "phase"} <= tags
    assert [e.step for e in acc.Scalars("val_rmse")] == [1, 2, 3]
    assert [(e.step, e.value) for e in acc.Scalars("phase")] == [(0, 1.0), (1, 2.0)]


def test_old_checkpoint_format_is_refused(tmp_path, posts, tiny_clip):
    out = tmp_path / "old"
    base = args(posts, out, tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "1")
    assert train_torch.main(base + ["--stop-after-epochs", "1"]) == 0
    state_path = out / "checkpoint" / "training_state.pt"
    saved = torch.load(state_path, weights_only=True)
    torch.save({**saved, "format": 1}, state_path)
    with pytest.raises(SystemExit, match="checkpoint of format 1, written by an older train_torch.py"):
        train_torch.main(base + ["--resume"])


def test_progress_bars_are_quiet_off_a_terminal():
    import io

    from tqdm.auto import tqdm

    from common.config import bar_disabled

    pipe = io.StringIO()  # what CI or `| tee` gives: not a TTY
    list(tqdm(range(50), file=pipe, disable=bar_disabled(True)))
    assert pipe.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    list(tqdm(range(50), file=tty, disable=bar_disabled(True)))
    assert "50/50" in tty.getvalue()


def test_artifact_explains_predictions_with_intervals_and_contributions(straight_run, posts):
    m = _metrics(straight_run)
    iv = m["intervals"]
    assert iv["n_calibration"] == 8 and set(iv["levels"]) == {"0.8"}
    # 8 val residuals: ceil(9 * 0.8) = 8th smallest, the largest one
    loaded = load_model(straight_run / "model")
    assert loaded.calibration.half_widths == iv["levels"]
    records = [EngagementDataset(posts, "test")[i] for i in range(8)]
    batch = Collator(loaded.batcher)(records)
    out = loaded.explain_batch(batch)
    score, likes = loaded.predict_batch(batch)
    np.testing.assert_allclose(out.score.numpy(), score.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.contributions.sum(1).numpy(), (out.score - out.reference_score).numpy(), atol=1e-5)
    assert out.groups == ["image", "caption", "sentiment"]
    low, high = out.intervals["0.8"]
    q = iv["levels"]["0.8"]
    np.testing.assert_allclose(torch.log1p(high).numpy(), (out.score + q).numpy(), rtol=1e-6)
    assert torch.all(low <= likes) and torch.all(likes <= high)
    truth = torch.log1p(torch.tensor([r.label for r in records], dtype=torch.float64))
    covered = float(((truth - out.score).abs() <= q).double().mean())
    assert iv["coverage_test"]["0.8"] == pytest.approx(covered)


def test_uint8_pixels_match_the_processors_float_path(posts, tiny_clip):
    from transformers import CLIPProcessor

    from models.clip_regressor import PostBatcher

    processor = CLIPProcessor.from_pretrained(tiny_clip)
    model = CLIPRegressor.from_pretrained(tiny_clip).eval()
    records = [EngagementDataset(posts, "val")[i] for i in range(4)]
    batch = PostBatcher.from_clip(processor, model.clip.config)(records)
    assert batch["pixel_values"].dtype == torch.uint8  # a quarter of float32's bytes
    floats = processor.image_processor(images=[r.image for r in records], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        a = model(**{**batch, "pixel_values": floats})  # the processor normalising on the host
        b = model(**batch)  # uint8, normalised by the model
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert not torch.equal(batch["pixel_values"].float(), floats)  # the two paths really differ in input


@pytest.mark.parametrize("at_edge", [True, False])
def test_pre_resized_images_skip_only_an_identity_resize(tiny_clip, at_edge):
    """Posts already at the processor's shortest edge (as records and served posts are) skip
    its resize and get the very pixels the resize gives; one other size and all are resized."""
    from PIL import Image
    from transformers import CLIPProcessor

    from data_preprocessing.posts import Post
    from models.clip_regressor import PostBatcher

    processor = CLIPProcessor.from_pretrained(tiny_clip)
    edge = processor.image_processor.size.shortest_edge
    shapes = [(edge, edge * 5 // 4), (edge * 4 // 3, edge), (edge, edge)] + ([] if at_edge else [(480, 640)])
    rng = np.random.default_rng(0)
    posts = [Post(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "a caption", 0.0, {})
             for h, w in shapes]
    batcher = PostBatcher(processor, 77)
    assert batcher.already_resized([p.image for p in posts]) is at_edge
    resized = processor.image_processor(images=[p.image for p in posts], do_rescale=False, do_normalize=False,
                                        return_tensors="pt")["pixel_values"].to(torch.uint8)
    assert torch.equal(batcher(posts)["pixel_values"], resized)


@pytest.mark.parametrize("modes", [("RGB",), ("RGB", "RGBA"), ("RGB", "L"), ("RGB", "P")])
def test_crop_only_batches_equal_the_processors_pixels(tiny_clip, modes, monkeypatch):
    """RGB posts at the shortest edge (records, served posts) are only cropped, by PostBatcher
    itself, to the processor's own pixels, odd margins included; any other mode in the batch
    goes through the processor, which converts it."""
    from PIL import Image
    from transformers import CLIPProcessor

    from data_preprocessing.posts import Post
    from models.clip_regressor import PostBatcher

    processor = CLIPProcessor.from_pretrained(tiny_clip)
    edge = processor.image_processor.size.shortest_edge
    rng = np.random.default_rng(0)
    shapes = [(edge, edge + 3), (edge + 5, edge), (edge, edge), (edge, edge * 5 // 4)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    images[1:len(modes)] = [im.convert(m) for im, m in zip(images[1:], modes[1:])]
    expected = processor.image_processor(images=images, do_rescale=False, do_normalize=False,
                                         return_tensors="pt")["pixel_values"].to(torch.uint8)
    batcher = PostBatcher(processor, 77)
    assert batcher.only_crops(images) is (modes == ("RGB",))
    if modes == ("RGB",):  # the processor is not called at all
        monkeypatch.setattr(type(processor.image_processor), "__call__", lambda *a, **k: 1 / 0)
    got = batcher([Post(im, "a caption", 0.0, {}) for im in images])["pixel_values"]
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, expected)


def test_optional_number_flags_parse_as_numbers():
    """``float | None`` fields (e.g. --finetune-head-lr) take a number from the command line,
    not the string that __post_init__ then fails to compare."""
    cfg = parse_config(TrainConfig, ["--data", "d", "--out", "o", "--finetune-head-lr", "1e-5"])
    assert cfg.finetune_head_lr == 1e-5
    assert parse_config(TrainConfig, ["--data", "d", "--out", "o"]).finetune_head_lr == cfg.head_lr / 10


def test_label_units_are_never_negative_counts():
    """A log1p score below 0 means no engagement, not negative likes; the round trip holds."""
    t = TargetTransform("log1p", 2.0, 1.0)
    z = torch.tensor([-0.5, 0.0, 3.0], dtype=torch.float64)
    assert t.to_label_units(z).tolist() == [0.0, 0.0, pytest.approx(math.expm1(3.0))]
    y = torch.tensor([0.0, 5.0, 120.0], dtype=torch.float64)
    assert torch.allclose(t.to_label_units(t.to_model_scale(y)), y)
    assert TargetTransform("none").to_label_units(z).tolist() == z.tolist()  # not a count: untouched


def test_compile_flag_compiles_the_train_step_and_changes_no_result(tmp_path, posts, tiny_clip):
    """--compile wraps each phase's prepared TrainStep in torch.compile,
    and a compiled step computes what the eager one does."""
    from accelerate.utils import is_compiled_module
    from transformers import CLIPProcessor

    from models.clip_regressor import PostBatcher
    from training.run import make_accelerator

    torch.manual_seed(0)
    model = CLIPRegressor.from_pretrained(tiny_clip, HeadConfig(hidden=32, dropout=0.0))
    batcher = PostBatcher.from_clip(CLIPProcessor.from_pretrained(tiny_clip), model.clip.config)
    train = EngagementDataset(posts, "train")
    batch = Collator(batcher, TargetTransform.fit(train.labels()))([train[i] for i in range(4)])
    steps = {}
    for compiled in (False, True):
        cfg = TrainConfig(data=str(posts), out=str(tmp_path / str(compiled)), clip_model=str(tiny_clip),
                          compile=compiled)
        accelerator, _ = make_accelerator(cfg, tmp_path)
        steps[compiled] = start_phase("finetune", model, accelerator, cfg, 4)[0]
        assert is_compiled_module(steps[compiled]) == compiled
    model.eval()  # no dropout: both see the same function
    with torch.no_grad():
        assert torch.allclose(steps[True](batch), steps[False](batch), atol=1e-5)


@pytest.mark.parametrize("cuda, cpus, processes, threads, workers", [
    (False, 2, 1, 2, 0),  # the CPU step's threads use both cores: prepare in the main process
    (False, 16, 1, 12, 4),  # --torch-threads 12 leaves 4 cores to workers
    (False, 64, 1, 16, 8),  # at most 8
    (True, 16, 1, 16, 8), (True, 16, 4, 16, 3), (True, 1, 1, 1, 1)])  # GPU: CPUs per process - 1, 1 to 8
def test_default_num_workers_leaves_the_step_its_cores(monkeypatch, cuda, cpus, processes, threads, workers):
    monkeypatch.setattr(train_data.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(train_data.torch, "get_num_threads", lambda: threads)
    assert train_data.default_num_workers(cuda, processes) == workers


def test_num_workers_is_resolved_only_when_not_given(monkeypatch):
    class Accelerator:
        device, num_processes = torch.device("cpu"), 1

    monkeypatch.setattr(train_data, "default_num_workers", lambda cuda, processes: 5 if not cuda else -1)
    cfg = parse_config(TrainConfig, ["--data", "d", "--out", "o"])
    assert cfg.num_workers is None and train_data.resolve_num_workers(cfg, Accelerator()) == cfg.num_workers == 5
    given = parse_config(TrainConfig, ["--data", "d", "--out", "o", "--num-workers", "2"])
    assert train_data.resolve_num_workers(given, Accelerator()) == given.num_workers == 2


# ---------------------------------------------------------------------------------------
# Small data, the bare script's layout, what the figures mean, timestamp features
# ---------------------------------------------------------------------------------------


def test_an_empty_split_is_refused_with_a_message(tmp_path, tiny_clip):
    """As preprocessing can leave it when rejects empty val: a message and exit status 1,
    not torch.cat's traceback at the end of the first epoch."""
    data = write_tiny_posts(tmp_path / "data", counts=(("train", 8), ("val", 0), ("test", 4)))
    with pytest.raises(SystemExit) as refused:
        train_torch.main(args(data, tmp_path / "run", tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "0"))
    message = refused.value.code
    assert isinstance(message, str)  # SystemExit(str): printed, exit status 1
    assert f"{data} has no posts in its val split (train 8, val 0, test 4)" in message
    assert "--val-frac" in message and "rejects.csv" in message
    assert not (tmp_path / "run").exists()


@dataclass
class BareRuns:
    """``python training/train_torch.py`` with no --data/--out, twice, in a repo-like folder."""

    root: Path  # the current directory of both runs
    data: Path  # root/data/processed: posts with a posted_at feature, a time split, a summed label
    after_interrupted: list[str]  # runs/ after the first run, stopped after one epoch
    log: str  # the second, finished run's log


@pytest.fixture(scope="session")
def bare_runs(tmp_path_factory, tiny_clip) -> BareRuns:
    from data_preprocessing.label_expr import LabelExpr

    root = tmp_path_factory.mktemp("repo")
    data = write_tiny_posts(root / "data" / "processed", posted_at=True)
    meta = json.loads((data / "meta.json").read_text())
    meta["split"] = _time_split_summary(data)
    meta["label"] = LabelExpr(("likes", "comments")).to_dict()
    (data / "meta.json").write_text(json.dumps(meta))
    epochs = ("--frozen-epochs", "1", "--finetune-epochs", "1")
    cwd, log = os.getcwd(), io.StringIO()
    os.chdir(root)
    try:
        assert train_torch.main(small(tiny_clip, *epochs, "--stop-after-epochs", "1")) == 0
        after_interrupted = sorted(p.name for p in (root / "runs").iterdir())
        with contextlib.redirect_stderr(log):  # setup_logging logs to sys.stderr as main finds it
            assert train_torch.main(small(tiny_clip, *epochs)) == 0
    finally:
        os.chdir(cwd)
    return BareRuns(root, data, after_interrupted, log.getvalue())


def _time_split_summary(data) -> dict:
    """meta.json's split summary for the tiny set's splits, which are in time order."""
    from data_preprocessing.splits import SplitPlan, SplitRule, split_summary

    times, split = [], []
    for i, name in enumerate(("train", "val", "test")):
        records = list(EngagementDataset(data, name))
        times += [r.features["posted_at"] for r in records]
        split += [i] * len(records)
    plan = SplitPlan(SplitRule("time", "posted_at"), np.array(split, dtype=np.int8), {}, times=np.array(times))
    return split_summary(plan, 8 / 48, 8 / 48)


def test_the_bare_script_writes_a_timestamped_run_and_points_latest_at_it(bare_runs, monkeypatch):
    from serving.settings import ServingSettings

    runs = bare_runs.root / "runs"
    stamp = re.compile(r"\d{8}-\d{6}(-\d+)?")
    # The interrupted run wrote its run dir but did not become latest.
    assert len(bare_runs.after_interrupted) == 1 and stamp.fullmatch(bare_runs.after_interrupted[0])
    finished = [p.name for p in runs.iterdir() if p.name not in ("latest", *bare_runs.after_interrupted)]
    assert len(finished) == 1 and stamp.fullmatch(finished[0])
    assert sorted(p.name for p in runs.iterdir()) == sorted([*bare_runs.after_interrupted, finished[0], "latest"])
    assert os.readlink(runs / "latest") == finished[0]  # relative
    m = _metrics(runs / "latest")
    assert m["data"]["dir"] == "data/processed"
    config = json.loads((runs / finished[0] / RUN_CONFIG_FILE).read_text())["args"]
    assert config["out"] == f"runs/{finished[0]}"
    # The server's default MODEL_DIR is the model this run wrote.
    monkeypatch.delenv("MODEL_DIR", raising=False)
    model_dir = bare_runs.root / ServingSettings().model_dir
    assert model_dir.resolve() == (runs / finished[0] / "model").resolve()
    assert load_model(model_dir).config["training"]["args"]["out"] == f"runs/{finished[0]}"
    assert f"runs/latest -> {finished[0]}" in bare_runs.log


def test_metrics_and_the_end_of_the_log_say_how_the_test_posts_were_chosen(bare_runs, straight_run):
    from data_preprocessing.splits import describe_split

    m = _metrics(bare_runs.root / "runs" / "latest")
    summary = json.loads((bare_runs.data / "meta.json").read_text())["split"]
    assert m["split"] == {"description": describe_split(summary), "summary": summary}
    assert m["split"]["description"].startswith("split time:posted_at: train 66.7%, val 16.7%, test 16.7%; ")
    lines = bare_runs.log.splitlines()
    table = next(i for i, line in enumerate(lines) if "test R² (model scale) and RMSE" in line)
    assert [line for line in lines[table:] if "test posts: " in line] == [
        next(line for line in lines if line.endswith(f"test posts: {m['split']['description']}"))]
    art = read_config(bare_runs.root / "runs" / "latest" / "model")
    assert art["training"]["split"] == m["split"]
    # Data from before split rules were recorded: preprocessing's seeded shuffle.
    assert _metrics(straight_run)["split"] == {"description": "random split (seeded shuffle)", "summary": None}


def test_the_artifact_records_the_label_expression(bare_runs, straight_run):
    art = read_config(bare_runs.root / "runs" / "latest" / "model")
    assert art["label"] == {"expression": "likes+comments", "columns": ["likes", "comments"], "combine": "sum",
                            "description": "the sum of the post's 'likes' + 'comments' counts"}
    assert _metrics(bare_runs.root / "runs" / "latest")["data"]["label"] == art["label"]
    assert read_config(straight_run / "model")["label"] is None  # no table, no label


def test_a_baseline_that_beats_the_kept_model_ends_the_log(tmp_path, posts, tiny_clip):
    """A head that has barely moved from its init (no probe, one frozen epoch at a tiny LR)
    against baselines fit in closed form: they beat it, and the log ends saying so."""
    from training.baselines import beaten_message

    out, log = tmp_path / "untrained", io.StringIO()
    with contextlib.redirect_stderr(log):
        assert train_torch.main(args(posts, out, tiny_clip, "--frozen-epochs", "1", "--finetune-epochs", "0",
                                     "--no-linear-probe-init", "--head-lr", "1e-9")) == 0
    m = _metrics(out)
    assert m["test"]["r2"] < 0.0 < m["baselines"]["frozen_clip_ridge"]["r2"]
    assert m["beaten_by"] == sorted((n for n, b in m["baselines"].items() if b["r2"] > m["test"]["r2"]),
                                    key=lambda n: -m["baselines"][n]["r2"])
    best = m["beaten_by"][0]
    last = log.getvalue().rstrip().splitlines()[-1]
    assert " WARNING " in last and last.endswith(beaten_message(m["test"]["r2"], m["baselines"]))
    assert f"baseline {best} beats the kept model on test: R² {m['baselines'][best]['r2']:.4f} against the kept " \
           f"model's {m['test']['r2']:.4f}" in last


def test_a_timestamp_feature_trains_and_serves_end_to_end(bare_runs):
    from tiny_posts import POSTED_AT, local_hour

    model_dir = bare_runs.root / "runs" / "latest" / "model"
    art = read_config(model_dir)
    (spec,) = art["prepare"]["features"]["features"]
    assert spec["column"] == {**POSTED_AT.to_dict(), "parts": ["hour", "weekday"]}
    assert spec["transform"] == "cyclic"
    inputs = ["posted_at__hour_sin", "posted_at__hour_cos", "posted_at__weekday_sin", "posted_at__weekday_cos",
              "posted_at__missing"]
    assert art["prepare"]["features"]["inputs"] == inputs
    assert art["architecture"]["n_features"] == art["prepare"]["features"]["width"] == len(inputs)
    loaded = load_model(model_dir)
    d = loaded.model.clip.config.projection_dim
    assert loaded.model.head.in_features == 3 * d + 1 + len(inputs)
    # What the served batch carries for a post is its local (New York) hour and weekday on circles.
    records = list(EngagementDataset(bare_runs.data, "test"))[:4]
    batch = Collator(loaded.batcher)(records)
    assert batch["features"].shape == (4, len(inputs))
    for row, r in zip(batch["features"].numpy(), records):
        hour = local_hour(r.features["posted_at"])
        np.testing.assert_allclose(row[:2], [math.sin(2 * math.pi * hour / 24), math.cos(2 * math.pi * hour / 24)],
                                   atol=1e-6)
        assert row[4] == 0.0
    # Twelve hours later is another prediction; no time at all is the missing flag.
    later = [Record(**{**vars(r), "features": {"posted_at": r.features["posted_at"] + 12 * 3600}}) for r in records]
    missing = [Record(**{**vars(r), "features": {"posted_at": None}}) for r in records]
    score, _ = loaded.predict_batch(batch)
    assert not torch.allclose(score, loaded.predict_batch(Collator(loaded.batcher)(later))[0])
    missing_batch = Collator(loaded.batcher)(missing)
    assert missing_batch["features"][:, 4].tolist() == [1.0] * 4
    assert torch.isfinite(loaded.predict_batch(missing_batch)[0]).all()
