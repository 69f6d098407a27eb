"""Train/serve parity: for the same posts, the server feeds the model exactly the tensors
that training's EngagementDataset + Collator build from preprocess.py's records, and
returns the prediction that load_model + Collator + predict_batch give offline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.serving_fixtures import ModelSpy, encode, jpeg_bytes, numbered, photo_array, png_bytes, serving_client
from tests.tiny_posts import write_posts

MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "sentiment", "features")


def _exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(photo_array(400, 300, seed=7))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display; load_image must apply it
    return encode(im, "JPEG", quality=92, exif=exif)


# (file name, bytes, caption, likes). Sizes above and below the 224 shortest edge, alpha,
# EXIF rotation; captions with hashtags, mentions, URLs, emoji, HTML entities, mojibake
# and an empty one (kept by preprocessing, accepted by the server).
POSTS = [
    ("beach.jpg", jpeg_bytes(640, 480, seed=1), "Sunset at the beach! #travel", 120),
    ("alpha.png", png_bytes(300, 260, seed=2), "I LOVE it!!! 😍 @bob https://x.co/abc", 45),
    # VADER scores this raw caption 0.0 but its cleaned form ("... <3 TBT") 0.44: a server
    # that scored the cleaned caption would fail here.
    ("rotated.jpg", _exif_rotated_jpeg(), "Tom &amp; Jerry at the cafÃ© &lt;3 #TBT", 3),
    ("small.jpg", jpeg_bytes(100, 80, seed=3), "", 0),
]


@pytest.fixture(scope="module")
def records(model_dir, tmp_path_factory):
    """Run the real preprocessing on a posts.csv of POSTS; return {row: record}."""
    from data_preprocessing.preprocess import main as preprocess_main
    from training.train_torch import EngagementDataset

    root = tmp_path_factory.mktemp("parity")
    posts = write_posts(root, [[f"images/{name}", caption, likes] for name, _, caption, likes in POSTS],
                        images={name: data for name, data, *_ in POSTS})
    preprocess_main(["--input", str(posts), "--out", str(root / "processed"), "--val-frac", "0",
                     "--test-frac", "0", "--workers", "1", "--clip-processor", str(model_dir / "clip"),
                     "--no-progress"])
    ds = EngagementDataset(root / "processed", "train")
    by_row = {ds[i].row: ds[i] for i in range(len(ds))}
    assert sorted(by_row) == list(range(len(POSTS)))  # every post kept, the empty caption too
    return by_row


@pytest.fixture(scope="module")
def offline(model_dir):
    """The offline path: load_model + training's Collator."""
    from models.artifact import load_model
    from training.train_torch import Collator

    loaded = load_model(model_dir)
    return loaded, Collator(loaded.batcher, loaded.target)


@pytest.fixture(scope="module")
def spy():
    return ModelSpy()


@pytest.fixture(scope="module")
def client(model_dir, spy):
    with serving_client(model_dir, spy=spy) as c:  # the model is loaded through the spy
        yield c


def _capture(spy: ModelSpy) -> list[dict]:
    """Record the tensors of every batch the server gives the model from now on."""
    captured: list[dict] = []
    spy.before = captured.append
    return captured


def _assert_same_tensors(served: dict, trained: dict) -> None:
    for key in MODEL_KEYS:
        assert served[key].dtype == trained[key].dtype, key
        assert served[key].shape == trained[key].shape, (key, served[key].shape, trained[key].shape)
        assert torch.equal(served[key], trained[key]), key


@pytest.mark.parametrize("row", range(len(POSTS)), ids=[p[0] for p in POSTS])
def test_single_post_parity(client, spy, records, offline, row):
    name, data, caption, _ = POSTS[row]
    loaded, collate = offline
    captured = _capture(spy)
    r = client.post("/predict", files={"image": (name, data, "application/octet-stream")}, data={"text": caption})
    assert r.status_code == 200, r.text
    assert len(captured) == 1

    # (a) the tensors the server fed the model == the Dataset + Collator tensors
    trained = collate([records[row]])
    _assert_same_tensors(captured[0], trained)
    assert r.json()["cleaned_text"] == records[row].text
    assert r.json()["sentiment"]["compound"] == records[row].sentiment

    # (b) the server's prediction == the offline prediction on that batch
    score, engagement = loaded.predict_batch({k: trained[k] for k in MODEL_KEYS})
    assert r.json()["score"] == pytest.approx(float(score[0]), rel=1e-6, abs=1e-6)
    assert r.json()["engagement"] == pytest.approx(float(engagement[0]), rel=1e-6, abs=1e-6)


def test_batch_parity_with_dynamic_padding(client, spy, records, offline):
    """All posts in one /predict/batch request form one micro-batch, padded like the
    Collator pads a training batch of the same records in the same order."""
    loaded, collate = offline
    captured = _capture(spy)
    files = [(name, data, "application/octet-stream") for name, data, _, _ in POSTS]
    r = client.post("/predict/batch", **numbered(files, text=[p[2] for p in POSTS]))
    assert r.status_code == 200, r.text
    assert len(captured) == 1 and len(captured[0]["input_ids"]) == len(POSTS)

    trained = collate([records[i] for i in range(len(POSTS))])
    _assert_same_tensors(captured[0], trained)
    score, engagement = loaded.predict_batch({k: trained[k] for k in MODEL_KEYS})
    results = r.json()["results"]
    assert [x["score"] for x in results] == pytest.approx(score.tolist(), rel=1e-6, abs=1e-6)
    assert [x["engagement"] for x in results] == pytest.approx(engagement.tolist(), rel=1e-6, abs=1e-6)
