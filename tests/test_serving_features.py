"""Serving a model with feature columns (followers, platform): each feature by its column
name, the error cases with their 4xx codes, and parity with training and with the batch
scoring script, features included."""

from __future__ import annotations

import base64
import csv

import pytest
import torch

from tests.serving_fixtures import ModelSpy, jpeg_bytes, numbered, png_bytes, serving_client
from tests.tiny_posts import write_posts

IMAGE = jpeg_bytes(320, 240, seed=5)
MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "sentiment", "features")


@pytest.fixture(scope="module")
def spy():
    return ModelSpy()


@pytest.fixture(scope="module")
def client(featured_model_dir, spy):
    with serving_client(featured_model_dir, spy=spy) as c:
        yield c


def form(followers="1200", platform="instagram", text="Sunset! #travel", image=IMAGE) -> dict:
    data = {"text": text}
    if followers is not None:
        data["followers"] = followers
    if platform is not None:
        data["platform"] = platform
    return dict(files={"image": ("p.jpg", image, "image/jpeg")}, data=data)


def test_prediction_carries_interval_and_contributions_of_every_group(client):
    r = client.post("/predict", **form())
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["contributions"]
    assert list(c) == ["image", "caption", "sentiment", "followers", "platform"]
    assert sum(c.values()) == pytest.approx(body["score"] - body["reference_score"], abs=1e-5)
    assert body["interval"]["level"] == 0.8
    assert body["interval"]["high"] == pytest.approx(float(torch.expm1(torch.tensor(body["score"] + 0.7))), rel=1e-6)


def test_features_change_the_prediction(client):
    a = client.post("/predict", **form(followers="10")).json()["score"]
    b = client.post("/predict", **form(followers="1000000")).json()["score"]
    assert a != b


@pytest.mark.parametrize("kwargs, status, reason, names", [
    (form(followers=None), 422, "missing_feature", "followers"),
    (form(platform=None), 422, "missing_feature", "platform"),
    (form(followers="lots"), 422, "invalid_feature", "followers: 'lots' is not a number"),
    (form(followers="inf"), 422, "invalid_feature", "is not finite"),
    (form(followers="-5"), 422, "invalid_feature", "outside the allowed range"),
])
def test_feature_errors_multipart(client, kwargs, status, reason, names):
    r = client.post("/predict", **kwargs)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert names in r.json()["detail"]


def test_an_empty_feature_is_a_missing_value_not_an_error(client):
    empty = client.post("/predict", **form(platform=""))
    assert empty.status_code == 200, empty.text
    null = client.post("/predict/json", json={"image_base64": base64.b64encode(IMAGE).decode(), "text": "Sunset! #travel",
                                              "followers": 1200, "platform": None})
    assert null.status_code == 200, null.text
    assert empty.json()["score"] == pytest.approx(null.json()["score"], abs=1e-6)  # the same imputation


def test_feature_errors_json(client):
    post = {"image_base64": base64.b64encode(IMAGE).decode(), "text": "hi", "followers": 12, "platform": "x"}
    assert client.post("/predict/json", json=post).status_code == 200
    for change, reason in [({"followers": None, "platform": "x"}, None),
                           ({"followers": "12k"}, "invalid_feature"), ({"followers": True}, "validation_error"),
                           ({"followers": 12, "folowers": 3}, "unknown_field")]:
        r = client.post("/predict/json", json={**post, **change})
        assert (r.json().get("reason") if r.status_code != 200 else None) == reason, (change, r.text)
    missing = {k: v for k, v in post.items() if k != "platform"}
    r = client.post("/predict/json", json=missing)
    assert (r.status_code, r.json()["reason"]) == (422, "missing_feature") and "platform" in r.json()["detail"]


def test_batch_takes_features_per_post(client):
    files = [("a.jpg", IMAGE, "image/jpeg"), ("b.png", png_bytes(), "image/png")]
    r = client.post("/predict/batch", **numbered(files, text=["first", "second"], followers=["100", "lots"],
                                                 platform=["x", ""]))
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["status"] == 200 and set(first["contributions"]) >= {"followers", "platform"}
    assert (second["status"], second["reason"]) == (422, "invalid_feature")
    r = client.post("/predict/batch", **numbered(files, text=["a", "b"], followers=["1", "2"]))
    assert (r.status_code, r.json()["reason"]) == (422, "unpaired_fields") and "platform_0" in r.json()["detail"]


def test_metadata_and_openapi_list_the_features(client):
    meta = client.get("/metadata").json()["model"]["features"]
    assert [f["column"]["name"] for f in meta] == ["followers", "platform"]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("PostForm", "PostJSON"):
        assert {"followers", "platform"} <= set(schemas[name]["required"]), name
    assert {"followers_0", "platform_0"} <= set(schemas["BatchForm"]["required"])


@pytest.fixture(scope="module")
def table(featured_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("featured_parity")
    rows = [("a.jpg", IMAGE, "Sunset! #travel", "1200", "instagram", "40"),
            ("b.png", png_bytes(300, 260, seed=2), "I LOVE it!!! 😍", "", "tiktok", "3"),
            ("c.jpg", jpeg_bytes(100, 80, seed=3), "", "98000", "", "0")]
    write_posts(root, [[f"images/{name}", *cells] for name, _, *cells in rows],
                ["image_path", "description", "followers", "platform", "engagement"],
                images={name: data for name, data, *_ in rows})
    return root, rows


def test_server_dataset_and_script_agree_with_features(client, spy, table, featured_model_dir):
    """The server's tensors == EngagementDataset + Collator's for the preprocessed record,
    features included; and serving/predict.py's prediction == /predict's."""
    from data_preprocessing.preprocess import main as preprocess_main
    from models.artifact import load_model
    from serving import predict
    from training.train_torch import Collator, EngagementDataset

    root, rows = table
    preprocess_main(["--input", str(root / "posts.csv"), "--out", str(root / "data"), "--val-frac", "0",
                     "--test-frac", "0", "--workers", "1", "--clip-processor", str(featured_model_dir / "clip"),
                     "--numeric-cols", "followers:0:", "--categorical-cols", "platform", "--no-progress"])
    records = {r.row: r for r in EngagementDataset(root / "data", "train")}
    collate = Collator(load_model(featured_model_dir).batcher)
    out = root / "pred.csv"
    assert predict.main(["--model", str(featured_model_dir), "--input", str(root / "posts.csv"), "--out", str(out),
                         "--num-workers", "0", "--no-progress"]) == 0
    with open(out, newline="") as fh:
        scored = {int(r["row"]): r for r in csv.DictReader(fh)}
    for row, (name, data, caption, followers, platform, _) in enumerate(rows):
        captured = []
        spy.before = captured.append
        r = client.post("/predict", files={"image": (name, data, "application/octet-stream")},
                        data={"text": caption, "followers": followers, "platform": platform})
        spy.before = None
        assert r.status_code == 200, r.text
        trained = collate([records[row]])
        for key in MODEL_KEYS:
            assert torch.equal(captured[0][key], trained[key]), (row, key)
        assert float(scored[row]["pred_score"]) == pytest.approx(r.json()["score"], rel=1e-6, abs=1e-6)
        assert float(scored[row]["contrib_followers"]) == pytest.approx(r.json()["contributions"]["followers"],
                                                                          abs=1e-6)
