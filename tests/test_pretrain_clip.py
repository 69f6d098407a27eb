"""Tests for training/pretrain_clip.py: contrastive pretraining of the offline CLIP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from data_preprocessing.posts import Post
from data_preprocessing.table import ColumnMap, read_table
from models.clip_regressor import PostBatcher
from models.tiny_clip import build_tiny_clip
from training import pretrain_clip
from tests.tiny_posts import write_posts
from training.pretrain_clip import (PretrainConfig, caption_texts, clip_inputs, evaluate, load_posts, main,
                                    split_posts)

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "stripe", "dot", "frame")


def make_posts(folder: Path, n: int = 40, broken: bool = True) -> Path:
    """A tiny posts table: coloured JPEGs with a shape, captions naming both.

    With ``broken`` two extra rows point at a missing and a corrupt file, which loading
    must reject rather than crash on.
    """
    images, rows = {}, []
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        im = Image.new("RGB", (320 + 8 * (i % 5), 256), COLOURS[colour])  # not square: exercises crop
        draw = ImageDraw.Draw(im)
        box = (100, 60, 220, 180)
        {"circle": lambda: draw.ellipse(box, fill=(128, 128, 128)),
         "square": lambda: draw.rectangle(box, fill=(128, 128, 128)),
         "stripe": lambda: draw.rectangle((0, 110, 330, 140), fill=(128, 128, 128)),
         "dot": lambda: draw.ellipse((150, 110, 170, 130), fill=(128, 128, 128)),
         "frame": lambda: draw.rectangle(box, outline=(128, 128, 128), width=12)}[shape]()
        images[f"{i}.jpg"] = im
        caption = f"A {colour.upper()} photo with a grey {shape} #{colour}Vibes 😍 https://x.co/{i}"
        rows.append([f"images/{i}.jpg", caption, float(i)])
    if broken:
        images["corrupt.jpg"] = b"not an image at all"
        rows += [["images/missing.jpg", "gone", 1.0], ["images/corrupt.jpg", "bad bytes", 2.0]]
    return write_posts(folder, rows, images=images)


# Pretraining as the tests run it: 40 posts, 10 held out (chance top-1 = 1/10), 10 short epochs
# (no early stop: the curve and step counts below are for all 10).
PRETRAIN_ARGS = ["--max-epochs", "10", "--patience", "0", "--batch-size", "8", "--lr", "1e-3",
                 "--heldout-fraction", "0.25", "--minutes", "5"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def posts_csv(tmp_path_factory) -> Path:
    return make_posts(tmp_path_factory.mktemp("posts"))


@pytest.fixture(scope="module")
def posts_table(posts_csv):
    """The posts table as pretraining reads it (data_preprocessing.table, no label)."""
    return read_table(posts_csv, ColumnMap(label=None))


@pytest.fixture(scope="module")
def pretrained(posts_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "clip"
    main(["--out", str(out), "--input", str(posts_csv), *PRETRAIN_ARGS])
    return out


def batcher_of(clip_dir: Path) -> PostBatcher:
    return PostBatcher.from_clip(CLIPProcessor.from_pretrained(clip_dir), CLIPConfig.from_pretrained(clip_dir))


def scripted_config(tmp_path: Path, posts_csv: Path, **kw) -> PretrainConfig:
    return PretrainConfig(out=str(tmp_path / "unused"), input=str(posts_csv), batch_size=8, **kw)


def test_batches_equal_the_processor_on_the_posts(tiny_dir, posts_table):
    # PostBatcher's uint8 pixels, normalised in torch as CLIPRegressor does, are the processor's
    # own tensors (to float32 rounding: numpy and torch may order the multiply-add differently).
    batcher = batcher_of(tiny_dir)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    rows = (3, 0, 7, 5)
    ours = clip_inputs(batcher, [posts[i] for i in rows])
    direct = batcher.processor(text=[posts[i].text for i in rows], images=[posts[i].image for i in rows],
                               return_tensors="pt", padding=True, truncation=True)
    assert set(ours) == set(direct)
    assert ours["pixel_values"].dtype == direct["pixel_values"].dtype == torch.float32
    assert torch.allclose(ours["pixel_values"], direct["pixel_values"], rtol=0, atol=1e-6)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours[key], direct[key]), key


def test_retrieval_ranks_all_posts_and_counts_shared_captions(tiny_dir):
    batcher = batcher_of(tiny_dir)
    side = CLIPConfig.from_pretrained(tiny_dir).vision_config.image_size
    captions = ["sunset", "dog", "sunset", "pizza"]  # posts 0 and 2 share a caption
    posts = [Post(Image.new("RGB", (side, side)), c, 0.0) for c in captions]

    class Scripted(torch.nn.Module):
        """Embeds image i as ``image_rows[i]`` and caption j as ``text_rows[j]``."""

        def __init__(self, image_rows, text_rows):
            super().__init__()
            self.image_rows, self.text_rows, self.seen = image_rows, text_rows, 0

        def forward(self, pixel_values, input_ids, attention_mask, return_loss):
            b = len(pixel_values)
            rows = slice(self.seen, self.seen + b)
            self.seen += b
            return SimpleNamespace(loss=torch.tensor(1.0), image_embeds=self.image_rows[rows],
                                   text_embeds=self.text_rows[rows])

    eye = torch.eye(4)
    assert evaluate(Scripted(eye, eye), batcher, posts, batch_size=2) == {
        "loss": 1.0, "retrieval_top1": 1.0, "rank_score": 1.0, "n": 4}
    # Image i is nearest caption i+2 (another batch of 2), then its own. Ranking all 4 captions:
    # images 0 and 2 retrieve each other's caption, which is the same text (hits), 1 and 3 miss
    # and rank their own caption above 2 of the 3 others. Ranking within batches would give
    # top-1 1.0; counting only the exact post would give 0.0.
    crossed = evaluate(Scripted(eye[[2, 3, 0, 1]] + 0.5 * eye, eye), batcher, posts, batch_size=2)
    assert (crossed["retrieval_top1"], crossed["rank_score"]) == (0.5, round((1 + 2 / 3 + 1 + 2 / 3) / 4, 4))
    # A model that embeds everything alike ranks at chance: every other caption ties, counted half.
    assert evaluate(Scripted(torch.ones(4, 4), torch.ones(4, 4)), batcher, posts, 2)["rank_score"] == 0.5


def test_pretrain_keeps_the_best_heldout_epoch(tmp_path, tiny_dir, posts_table, monkeypatch):
    model, batcher = CLIPModel.from_pretrained(tiny_dir), batcher_of(tiny_dir)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    cfg = scripted_config(tmp_path, posts_table.path, max_epochs=3, lr=1e-3)
    # Scripted held-out scores: epochs 2 and 3 tie on rank score, epoch 2 has the lower loss.
    scores = iter([(0.6, 1.0), (0.8, 1.5), (0.8, 1.7)])
    weights = []

    def scripted_evaluate(model, batcher, posts, batch_size):
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        rank_score, loss = next(scores)
        return {"loss": loss, "retrieval_top1": 0.0, "rank_score": rank_score, "n": len(posts)}

    monkeypatch.setattr(pretrain_clip, "evaluate", scripted_evaluate)
    run = pretrain_clip.pretrain(model, batcher, posts[:8], posts[8:12], cfg)
    assert [row["epoch"] for row in run["curve"]] == [1, 2, 3] and run["best"]["epoch"] == 2
    assert run["steps"] == 3 == len(run["losses"])  # 8 posts, one batch of 8 per epoch
    final = model.state_dict()
    assert all(torch.equal(final[k], weights[1][k]) for k in final)  # epoch 2's weights, restored
    assert not all(torch.equal(final[k], weights[2][k]) for k in final)  # not the last epoch's


def test_pretrain_stops_after_patience_epochs_without_a_better_one(tmp_path, tiny_dir, posts_table, monkeypatch):
    # Epoch 2 is the best of epochs 2-5 (none beats 0.8), so patience 3 stops after epoch 5 and
    # keeps epoch 2; epoch 6's 0.9 is never reached. Without the stop all 6 epochs run and 6 is kept.
    model, batcher = CLIPModel.from_pretrained(tiny_dir), batcher_of(tiny_dir)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    cfg = scripted_config(tmp_path, posts_table.path, max_epochs=6, patience=3)
    scores = iter([0.6, 0.8, 0.7, 0.75, 0.8, 0.9])

    def scripted_evaluate(model, batcher, posts, batch_size):
        return {"loss": 1.0, "retrieval_top1": 0.0, "rank_score": next(scores), "n": len(posts)}

    monkeypatch.setattr(pretrain_clip, "evaluate", scripted_evaluate)
    run = pretrain_clip.pretrain(model, batcher, posts[:8], posts[8:12], cfg)
    assert [row["epoch"] for row in run["curve"]] == [1, 2, 3, 4, 5] and run["best"]["epoch"] == 2
    assert run["stopped_by"] == "patience" and run["steps"] == 5


def test_pretrain_cap_on_an_epoch_boundary_adds_no_empty_epoch(tmp_path, tiny_dir, posts_table, monkeypatch):
    # The minutes cap passes during epoch 2's evaluation, so epoch 3 stops before its first step.
    # Evaluating and logging that epoch anyway gave a curve row with a NaN train loss (strict JSON refuses it).
    model, batcher = CLIPModel.from_pretrained(tiny_dir), batcher_of(tiny_dir)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    cfg = scripted_config(tmp_path, posts_table.path, max_epochs=5, minutes=1.0)
    clock, evaluated = [0.0], []

    def scripted_evaluate(model, batcher, posts, batch_size):
        evaluated.append(1)
        if len(evaluated) == 2:
            clock[0] = 3600.0  # an hour later: past the 1-minute cap
        return {"loss": 1.0, "retrieval_top1": 0.0, "rank_score": 0.5 + 0.1 * len(evaluated), "n": len(posts)}

    monkeypatch.setattr(pretrain_clip, "evaluate", scripted_evaluate)
    monkeypatch.setattr(pretrain_clip, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    run = pretrain_clip.pretrain(model, batcher, posts[:8], posts[8:12], cfg)
    assert run["stopped_by"] == "minutes" and run["steps"] == 2 and len(evaluated) == 2
    assert [row["epoch"] for row in run["curve"]] == [1, 2] and run["best"]["epoch"] == 2
    json.dumps(run, allow_nan=False)  # every figure finite


def test_pretrain_retrieves_above_chance_and_records_its_choice(pretrained, posts_table):
    record = json.loads((pretrained / "pretrain.json").read_text())
    assert record["data"]["rows"] == 42 and record["data"]["usable"] == 40
    assert record["data"]["rejected"] == {"not_found": 1, "unsupported_format": 1}
    assert record["data"]["heldout"] == 10 and record["data"]["train"] == 30
    assert record["training"]["steps"] == 10 * (30 // 8) == len(record["losses"])
    assert all(math.isfinite(x) for x in record["losses"])

    # The kept epoch is the curve's best by the rule, and is what "after" reports.
    sel, held = record["selection"], record["heldout"]
    curve = sel["curve"]
    assert [row["epoch"] for row in curve] == list(range(1, 11))
    top = max(row["heldout_rank_score"] for row in curve)
    best = min((row for row in curve if row["heldout_rank_score"] == top), key=lambda row: row["heldout_loss"])
    assert sel["best_epoch"] == best["epoch"] and sel["best"] == held["after"] == best
    assert held["last"] == curve[-1]

    # Retrieval works: the untrained model is at chance (top-1 1 in 10, rank score 0.5 give or
    # take), the kept epoch is clearly above it on both.
    n = record["data"]["heldout"]
    assert held["before"]["retrieval_top1"] <= 1 / n and abs(held["before"]["rank_score"] - 0.5) < 0.15
    assert held["after"]["heldout_top1"] >= 3 / n > held["before"]["retrieval_top1"]
    assert held["after"]["heldout_rank_score"] >= 0.65  # 0.71 when written; the untrained model 0.47

    # The saved weights are the kept epoch's: re-scoring them on the same held-out split matches.
    model, batcher = CLIPModel.from_pretrained(pretrained), batcher_of(pretrained)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    cfg = PretrainConfig(**record["config"])
    _, held_posts = split_posts(posts, cfg)
    rescored = evaluate(model, batcher, held_posts, cfg.batch_size)
    assert (rescored["rank_score"], rescored["retrieval_top1"], rescored["loss"]) == (
        best["heldout_rank_score"], best["heldout_top1"], best["heldout_loss"])


def test_pretrain_lowers_contrastive_loss(pretrained, posts_table, tmp_path):
    # The untrained start is reproducible: same tokenizer texts, same seed.
    before_dir = build_tiny_clip(tmp_path / "before", seed=0, texts=caption_texts(posts_table))
    batcher = batcher_of(pretrained)
    posts, _ = load_posts(posts_table, batcher.processor.image_processor)
    batch = clip_inputs(batcher, posts[:16])
    losses = {}
    for name, path in (("before", before_dir), ("after", pretrained)):
        model = CLIPModel.from_pretrained(path).eval()
        with torch.no_grad():
            losses[name] = float(model(**batch, return_loss=True).loss)
    assert losses["after"] < losses["before"] - 0.05, losses


def test_pretrain_is_reproducible_for_a_seed(tmp_path, posts_csv, posts_table):
    # Two epochs of two steps (20 posts train, batches of 10): the second epoch's shuffle counts too.
    args = ["--input", str(posts_csv), "--max-epochs", "2", "--batch-size", "10", "--lr", "1e-3",
            "--heldout-fraction", "0.5"]
    weights = []
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), *args])
        weights.append((tmp_path / run / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    # ...and the weights did change from the random init, so the equality is not vacuous.
    init = build_tiny_clip(tmp_path / "init", seed=0, texts=caption_texts(posts_table))
    assert (init / "model.safetensors").read_bytes() != weights[0]



def test_cli_runs_as_script_and_module(tmp_path, posts_csv):
    env = {**os.environ, "PYTHONPATH": ""}  # the script must find the repo root by itself
    helped = subprocess.run([sys.executable, "training/pretrain_clip.py", "--help"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    help_text = " ".join(helped.stdout.split())  # argparse wraps at the terminal width
    assert "--patience" in help_text and "kept apart from the test split" in help_text

    out = tmp_path / "cli"
    ran = subprocess.run([sys.executable, "-m", "training.pretrain_clip", "--out", str(out), "--input",
                          str(posts_csv), "--max-epochs", "1", "--batch-size", "8"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert json.loads((out / "pretrain.json").read_text())["selection"]["best_epoch"] == 1

    bad = subprocess.run([sys.executable, "-m", "training.pretrain_clip", "--out", str(out), "--input",
                          str(tmp_path / "nope.csv")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_pretraining_reads_its_table_like_preprocessing(posts_csv, posts_table, tiny_dir, tmp_path):
    """--image-col/--text-col and a spreadsheet's dialect: the same posts as the plain table."""
    from common.config import parse_config
    from tests.tiny_posts import write_table

    processor = CLIPProcessor.from_pretrained(tiny_dir)
    plain = pd.read_csv(posts_csv)
    renamed = write_table(tmp_path / "export.csv", ["photo", "caption"],
                          [[str(posts_csv.parent / p), c] for p, c in zip(plain["image_path"], plain["description"])],
                          sep=";", encoding="utf-8-sig")
    cfg = parse_config(PretrainConfig, ["--out", str(tmp_path / "o"), "--input", str(renamed),
                                        "--image-col", "photo", "--text-col", "caption"])
    table = pretrain_clip.read_pretrain_table(cfg)
    assert table.dialect.sep == ";" and caption_texts(table) == caption_texts(posts_table)
    got, counts = load_posts(table, processor.image_processor)
    want, _ = load_posts(posts_table, processor.image_processor)
    assert counts["usable"] == len(want) == 40
    assert [(p.text, p.image.tobytes()) for p in got] == [(p.text, p.image.tobytes()) for p in want]


def test_pretraining_on_a_table_without_the_columns_is_one_line(posts_csv, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--input", str(posts_csv), "--text-col", "caption"])
    assert e.value.code.startswith("error: --input: posts.csv: 1 column not found: 'caption' (--text-col).")
    assert "\n" not in e.value.code and not (tmp_path / "o").exists()  # refused before anything is built


def test_pretraining_reads_image_urls_through_the_download_cache(posts_csv, posts_table, tiny_dir, tmp_path):
    """URL cells are fetched once into --image-cache (a real loopback server), then read from
    the cache with the server gone: the same posts as the table of local files."""
    from common.config import parse_config
    from tests.image_server import LoopbackServer, static
    from tests.tiny_posts import write_table

    processor = CLIPProcessor.from_pretrained(tiny_dir)
    plain = pd.read_csv(posts_csv)
    server = LoopbackServer({f"/{p}": static((posts_csv.parent / p).read_bytes(), "image/jpeg")
                             for p in plain["image_path"] if (posts_csv.parent / p).is_file()})  # else a 404
    urls = write_table(tmp_path / "urls.csv", ["image_path", "description"],
                       [[server.url(f"/{p}"), c] for p, c in zip(plain["image_path"], plain["description"])])
    cfg = parse_config(PretrainConfig, ["--out", str(tmp_path / "o"), "--input", str(urls),
                                        "--image-cache", str(tmp_path / "cache"), "--download-workers", "4"])
    want, _ = load_posts(posts_table, processor.image_processor)
    try:
        fetched, counts = load_posts(pretrain_clip.read_pretrain_table(cfg), processor.image_processor,
                                     cfg.download_config())
    finally:
        server.stop()
    assert counts["usable"] == len(want) and sum(server.hits.values()) == len(plain)
    cached, _ = load_posts(pretrain_clip.read_pretrain_table(cfg), processor.image_processor, cfg.download_config())
    for got in (fetched, cached):
        assert [(p.text, p.image.tobytes()) for p in got] == [(p.text, p.image.tobytes()) for p in want]


@pytest.fixture(scope="module")
def data_dir(posts_csv, tmp_path_factory) -> Path:
    """posts.csv through preprocess.py: train, val and test records (the broken rows rejected)."""
    from data_preprocessing import preprocess

    out = tmp_path_factory.mktemp("data") / "data"
    preprocess.main(["--input", str(posts_csv), "--out", str(out), "--val-frac", "0.2", "--test-frac", "0.2",
                     "--workers", "1", "--max-reject-frac", "0.5"])
    return out


def test_pretraining_on_records_reads_the_train_split_only(data_dir, tmp_path):
    """--data: the train records are the posts (no image decoded again), val and test never
    shape the CLIP: the tokenizer learns from the train captions alone."""
    from data_preprocessing.records import iter_records

    train = list(iter_records(data_dir / "train.pkl"))
    held = [r.text for s in ("val", "test") for r in iter_records(data_dir / f"{s}.pkl")]
    assert train and held
    posts, texts, counts = pretrain_clip.read_train_records(str(data_dir))
    assert [(p.text, p.image.tobytes()) for p in posts] == [(r.text, r.image.tobytes()) for r in train]
    assert texts == [r.text for r in train] and counts["rows"] == counts["usable"] == len(train)

    out = tmp_path / "clip"
    main(["--out", str(out), "--data", str(data_dir), "--max-epochs", "1", "--batch-size", "8"])
    record = json.loads((out / "pretrain.json").read_text())
    assert record["data"]["split"] == "train" and record["data"]["rows"] == len(train)
    assert record["data"]["train"] + record["data"]["heldout"] == len(train)
    assert record["data"]["tokenizer_texts"] == len(train) != len(train) + len(held)


def test_pretraining_needs_one_source_and_refuses_records_the_clip_would_blur(data_dir, posts_csv, tmp_path):
    for args in ([], ["--data", str(data_dir), "--input", str(posts_csv)]):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "o"), *args])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--data", str(tmp_path)])
    assert e.value.code == 2

    # Records pre-resized below the processor's 224 px would reach the CLIP upsampled.
    from data_preprocessing import preprocess

    small = tmp_path / "small"
    preprocess.main(["--input", str(posts_csv), "--out", str(small), "--workers", "1", "--max-reject-frac", "0.5",
                     "--resize-shortest-edge", "64"])
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--data", str(small), "--max-epochs", "1"])
    assert str(e.value.code).startswith("error: --data: ") and "--resize-shortest-edge 224" in e.value.code
    assert not (tmp_path / "o").exists()
