"""Endpoint tests of serving.app through TestClient (as a context manager, so the lifespan
loads the model and starts the micro-batcher)."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from data_preprocessing.prepare import clean_text, sentiment
from serving.schemas import EXAMPLE_IMAGE_BASE64
from tests.serving_fixtures import (ModelSpy, corrupt_png_bytes, encode, jpeg_bytes, multipart, numbered, photo_array,
                                    png_bytes, service, serving_client, zero_size_png_bytes)

CAPTION = "Sunset at the beach!!! 😍 #travel @bob https://x.co/a"
LIMITS = dict(max_body_bytes=2_000_000, max_caption_chars=300, max_pixels=200_000, max_posts_per_request=4)


@pytest.fixture(scope="module")
def client(model_dir):
    with serving_client(model_dir, **LIMITS) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_json(image: bytes, text: str) -> dict:
    return {"image_base64": b64(image), "text": text}


# --- happy paths --------------------------------------------------------------------------


@pytest.mark.parametrize("image,filename,mime", [(jpeg_bytes(), "photo.jpg", "image/jpeg"),
                                                 (png_bytes(), "photo.png", "image/png")], ids=["jpeg", "png"])
def test_predict_multipart(client, image, filename, mime):
    r = client.post("/predict", **multipart(image, CAPTION, filename, mime))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"engagement", "score", "sentiment", "cleaned_text", "interval", "contributions",
                         "reference_score", "model"}
    assert body["cleaned_text"] == clean_text(CAPTION) == "Sunset at the beach!!! 😍 travel @user <url>"
    assert body["sentiment"] == pytest.approx(sentiment(CAPTION))  # of the RAW caption
    # engagement is the label-unit view of score (log1p target transform)
    assert body["engagement"] == pytest.approx(math.expm1(body["score"]), rel=1e-9)
    assert body["model"]["name"] == "run" and len(body["model"]["version"]) == 12


def test_json_and_multipart_agree(client):
    image = jpeg_bytes(seed=3)
    a = client.post("/predict", **multipart(image, CAPTION)).json()
    b = client.post("/predict/json", json=post_json(image, CAPTION)).json()
    c = client.post("/predict/json", json={"image_base64": "data:image/jpeg;base64," + b64(image), "text": CAPTION}).json()
    # base64 as the `base64` tool writes it: wrapped at 76 columns
    wrapped = "\n".join(b64(image)[i:i + 76] for i in range(0, len(b64(image)), 76))
    d = client.post("/predict/json", json={"image_base64": wrapped, "text": CAPTION}).json()
    assert a["score"] == pytest.approx(b["score"], abs=1e-9) == c["score"] == d["score"]
    assert a["cleaned_text"] == b["cleaned_text"] and a["sentiment"] == b["sentiment"]


def test_sentiment_reads_raw_caption(client):
    # VADER sees capitals and "!!!" that matter; the answer reports the raw-caption scores.
    raw = "I LOVE this place!!! #happy"
    body = client.post("/predict", **multipart(jpeg_bytes(), raw)).json()
    assert body["sentiment"] == pytest.approx(sentiment(raw))
    assert body["sentiment"]["compound"] > 0.5


def test_empty_caption_is_accepted(client):
    body = client.post("/predict", **multipart(jpeg_bytes(), "")).json()
    assert body["cleaned_text"] == "" and body["sentiment"]["compound"] == 0.0
    assert math.isfinite(body["score"])
    assert client.post("/predict/json", json=post_json(jpeg_bytes(), "")).status_code == 200


def test_probes_and_metadata(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    meta = client.get("/metadata").json()
    assert meta["model"]["architecture"]["class"] == "CLIPRegressor"
    assert meta["model"]["target_transform"] == {"kind": "log1p", "mean": 3.0, "std": 1.5}
    assert meta["model"]["processor"]["resize_policy"]["shortest_edge"] == 224
    assert meta["model"]["features"] == []
    assert meta["training"]["metrics"]["test"]["rmse"] == 1.25
    assert meta["settings"]["max_posts_per_request"] == 4 and meta["settings"]["max_pixels"] == 200_000


def test_metadata_counts_the_posts_predicted(model_dir):
    with serving_client(model_dir) as c:
        assert c.get("/metadata").json()["settings"]["batching"]["posts"] == 0  # the warm-up is not counted
        c.post("/predict", **multipart(jpeg_bytes(), "one"))
        c.post("/predict/batch", **numbered([("a.jpg", jpeg_bytes(), "image/jpeg")] * 2, text=["two", "three"]))
        c.post("/predict", **multipart(b"not an image", "never reaches the model"))
        batching = c.get("/metadata").json()["settings"]["batching"]
    assert (batching["posts"], batching["batches"], batching["largest_batch"]) == (3, 2, 2)


def test_all_torch_work_runs_on_the_one_torch_thread(model_dir):
    """Load, warm-up and every batch run on one thread (serving.service.torch_thread): another
    thread entering torch would start a second OpenMP team, and each forward would slow down."""
    calls = []

    class Spy(ModelSpy):
        def load(self, model_dir, **kw):
            calls.append(("load", threading.current_thread().name))
            return super().load(model_dir, **kw)

    spy = Spy()
    spy.before = lambda batch: calls.append(("batch", threading.current_thread().name))
    with serving_client(model_dir, spy=spy) as c:
        assert c.post("/predict", **multipart(jpeg_bytes(), "one")).status_code == 200
        assert c.post("/predict", **multipart(jpeg_bytes(seed=2), "two")).status_code == 200
    assert [what for what, _ in calls] == ["load", "batch", "batch", "batch"]  # the warm-up, then two posts
    names = {name for _, name in calls}
    assert len(names) == 1 and names.pop().startswith("inference"), calls


# --- the contract: the OpenAPI document -------------------------------------------------------


def _refs(node) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


PREDICT_PATHS = [("/predict", "multipart/form-data", "PostForm", "Prediction"),
                 ("/predict/json", "application/json", "PostJSON", "Prediction"),
                 ("/predict/batch", "multipart/form-data", "BatchForm", "BatchResponse"),
                 ("/predict/batch/json", "application/json", "BatchJSON", "BatchResponse"),
                 ("/predict/variants", "multipart/form-data", "VariantsForm", "VariantsResponse"),
                 ("/predict/variants/json", "application/json", "VariantsJSON", "VariantsResponse")]


def test_openapi_documents_each_path_with_one_body_type(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/health", "/ready", "/metadata", "/metrics", *(p[0] for p in PREDICT_PATHS)}
    for path, media_type, request, response in PREDICT_PATHS:
        op = spec["paths"][path]["post"]
        assert list(op["requestBody"]["content"]) == [media_type], path
        assert op["requestBody"]["content"][media_type]["schema"]["$ref"].endswith("/" + request)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert set(op["responses"]) == {"200", "400", "408", "413", "415", "422", "500", "503", "504"}, path
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    for path, item in spec["paths"].items():
        for op in item.values():
            for status, response in op["responses"].items():
                assert response["headers"]["X-Request-ID"]["required"] is True, (path, status)
    assert _refs(spec) <= set(spec["components"]["schemas"])  # every $ref resolves
    assert client.get("/docs").status_code == 200


def test_openapi_declares_the_limits_in_force(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    form, js, batch_form, batch_json = (schemas[n] for n in ("PostForm", "PostJSON", "BatchForm", "BatchJSON"))
    assert form["required"] == ["image", "text"] and js["required"] == ["image_base64", "text"]
    assert form["additionalProperties"] is False and js["additionalProperties"] is False
    assert form["properties"]["image"]["format"] == "binary" and js["properties"]["image_base64"]["format"] == "byte"
    assert form["properties"]["text"]["maxLength"] == js["properties"]["text"]["maxLength"] == 300
    assert batch_form["properties"]["text_3"]["maxLength"] == 300 and "text_4" not in batch_form["properties"]
    assert (batch_json["properties"]["posts"]["minItems"], batch_json["properties"]["posts"]["maxItems"]) == (1, 4)
    assert batch_form["required"] == ["image_0", "text_0"] and batch_json["required"] == ["posts"]
    # post i's fields come together, and only after post i - 1's: pairing is in the schema, not in words
    assert sorted(batch_form["dependentRequired"]["text_2"]) == ["image_1", "image_2"]


def test_every_documented_example_is_accepted(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["PostJSON"]["properties"]["image_base64"]["examples"] == [EXAMPLE_IMAGE_BASE64]
    for example in schemas["PostJSON"]["examples"]:
        r = client.post("/predict/json", json=example)
        assert r.status_code == 200 and r.json()["cleaned_text"] == clean_text(example["text"]), r.text
    for example in schemas["BatchJSON"]["examples"]:
        r = client.post("/predict/batch/json", json=example)
        assert [x["status"] for x in r.json()["results"]] == [200] * len(example["posts"]), r.text


def test_feature_columns_join_every_request_model(model_dir):
    """Issue 8's slot: the artifact's feature names become form fields and JSON keys of
    every request model and of the document, and reach the RawPost by name."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.contract import build_contract
    from serving.settings import ServingSettings

    app = create_app(ServingSettings(model_dir=model_dir), feature_names=("followers", "platform"))
    schemas = TestClient(app).get("/openapi.json").json()["components"]["schemas"]
    for name in ("PostForm", "PostJSON"):
        assert {"followers", "platform"} <= set(schemas[name]["properties"]), name
        # required: a client that forgot one gets missing_feature, never a silent guess
        assert {"followers", "platform"} <= set(schemas[name]["required"]), name
    assert {"followers_0", "platform_0"} <= set(schemas["BatchForm"]["required"])  # post i's: <name>_i
    contract = build_contract(("followers", "platform"), max_caption_chars=50, max_posts=2)
    post = contract.PostJSON.model_validate({"image_base64": EXAMPLE_IMAGE_BASE64, "text": "hi", "followers": 1200,
                                             "platform": None})
    raw = asyncio.run(contract.read_post(post))
    assert (raw.image, raw.caption, raw.features) == (base64.b64decode(EXAMPLE_IMAGE_BASE64), "hi",
                                                      {"followers": 1200, "platform": None})
    # This model declares no features: an app built for some refuses to start with it.
    with pytest.raises(RuntimeError, match="the app was built for"):
        with TestClient(app):
            pass


# --- the bad-input table ------------------------------------------------------------------


def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def _tiff() -> bytes:
    return encode(Image.fromarray(photo_array(64, 48)), "TIFF")


JSON = {"content-type": "application/json"}
BAD_INPUTS = [
    # (id, path, request kwargs, status, reason)
    ("no_image_field", "/predict", dict(data={"text": "hi"}, files={"other": ("x.txt", b"x", "text/plain")}),
     422, "missing_field"),
    ("no_text_field", "/predict", dict(files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}), 422, "missing_field"),
    ("image_is_text_value", "/predict", dict(data={"image": "photo.jpg", "text": "hi"},
                                             files={"note": ("n.txt", b"-", "text/plain")}), 422, "image_not_a_file"),
    ("text_is_a_file", "/predict", dict(files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg"),
                                               "text": ("t.txt", b"hi", "text/plain")}), 422, "text_not_a_string"),
    ("two_images", "/predict", dict(files=[("image", ("a.jpg", jpeg_bytes(), "image/jpeg")),
                                           ("image", ("b.jpg", jpeg_bytes(), "image/jpeg"))], data={"text": "hi"}),
     422, "too_many_fields"),
    ("unknown_field", "/predict", dict(files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                                       data={"text": "hi", "likes": "3"}), 422, "unknown_field"),
    ("empty_file", "/predict", multipart(b"", "hi"), 422, "empty_file"),
    ("not_an_image", "/predict", multipart(b"hello, I am a text file\n" * 10, "hi", "notes.txt", "text/plain"),
     415, "unsupported_format"),
    ("tiff_not_allowed", "/predict", multipart(_tiff(), "hi", "a.tiff", "image/tiff"), 415, "unsupported_format"),
    ("zero_size_png", "/predict", multipart(zero_size_png_bytes(), "hi", "a.png", "image/png"),
     415, "unsupported_format"),
    ("truncated_jpeg", "/predict", multipart(jpeg_bytes()[:4000], "hi"), 422, "truncated"),
    # zlib decides whether scrambled data reads as corrupt or as a broken (truncated) stream
    ("corrupt_png", "/predict", multipart(corrupt_png_bytes(), "hi", "a.png", "image/png"), 422,
     ("corrupt", "truncated")),
    # load_image lets this OSError through Image.open; the server still answers 422
    ("jpeg_header_only", "/predict", multipart(jpeg_bytes()[:200], "hi"), 422, ("corrupt", "truncated")),
    ("too_many_pixels", "/predict", multipart(jpeg_bytes(600, 400), "hi"), 413, "too_many_pixels"),
    ("caption_too_long", "/predict", multipart(jpeg_bytes(), "a" * 301), 422, "caption_too_long"),
    ("multipart_body_too_large", "/predict", multipart(b"x" * 2_000_001, "hi"), 413, "body_too_large"),
    ("body_too_large", "/predict/json", dict(content=b"x" * 2_000_001, headers=JSON), 413, "body_too_large"),
    ("chunked_body_too_large", "/predict/json", dict(content=_chunks(3_000_000), headers=JSON),
     413, "body_too_large"),
    ("text_plain", "/predict", dict(content=b"hello", headers={"content-type": "text/plain"}),
     415, "unsupported_media_type"),
    ("no_content_type", "/predict", dict(content=b"hello"), 415, "unsupported_media_type"),
    ("urlencoded_form", "/predict", dict(data={"text": "hi"}), 415, "unsupported_media_type"),
    ("json_to_the_multipart_path", "/predict", dict(json=post_json(jpeg_bytes(), "hi")), 415,
     "unsupported_media_type"),
    ("multipart_to_the_json_path", "/predict/json", multipart(jpeg_bytes(), "hi"), 415, "unsupported_media_type"),
    ("invalid_json", "/predict/json", dict(content=b"{not json", headers=JSON), 400, "invalid_json"),
    ("json_not_object", "/predict/json", dict(json=["a", "b"]), 422, "invalid_post"),
    ("json_missing_image", "/predict/json", dict(json={"text": "hi"}), 422, "validation_error"),
    ("json_missing_text", "/predict/json", dict(json={"image_base64": b64(jpeg_bytes())}), 422, "validation_error"),
    ("json_extra_field", "/predict/json", dict(json={"image_base64": "AAAA", "text": "hi", "likes": 3}),
     422, "unknown_field"),
    ("json_text_not_a_string", "/predict/json", dict(json={"image_base64": "AAAA", "text": 3}), 422,
     "validation_error"),
    ("json_bad_base64", "/predict/json", dict(json={"image_base64": "not base64!!", "text": "hi"}),
     422, "invalid_base64"),
    ("json_image_url_ssrf", "/predict/json",
     dict(json={"image_url": "http://169.254.169.254/latest/meta-data", "text": "hi"}), 422, "image_url_not_supported"),
    ("json_caption_too_long", "/predict/json", dict(json=post_json(jpeg_bytes(), "b" * 301)), 422, "caption_too_long"),
    ("json_empty_image", "/predict/json", dict(json={"image_base64": "", "text": "hi"}), 422, "empty_file"),
]


@pytest.mark.parametrize("path,kwargs,status,reason", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input(client, path, kwargs, status, reason):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and body["detail"]
    assert body["reason"] in ((reason,) if isinstance(reason, str) else reason)
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    assert client.get("/health").status_code == 200


def test_server_still_predicts_after_bad_inputs(client):
    for _, path, kwargs, _, _ in BAD_INPUTS[:10]:
        client.post(path, **kwargs)
    assert client.post("/predict", **multipart(jpeg_bytes(), "still fine")).status_code == 200


def test_ssrf_message_explains(client):
    detail = client.post("/predict/json", json={"image_url": "http://localhost/x.jpg", "text": ""}).json()["detail"]
    assert "SSRF" in detail and "never fetches" in detail


def test_wrong_body_type_names_the_path_that_takes_it(client):
    detail = client.post("/predict", json=post_json(jpeg_bytes(), "hi")).json()["detail"]
    assert "/predict/json" in detail


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert (r.status_code, r.json()["reason"]) == (404, "not_found")
    r = client.get("/predict")
    assert (r.status_code, r.json()["reason"]) == (405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


# --- batch endpoints ---------------------------------------------------------------------


def test_batch_multipart_mixed(client):
    good1, good2 = jpeg_bytes(seed=5), png_bytes(seed=6)
    files = [("a.jpg", good1, "image/jpeg"), ("b.png", corrupt_png_bytes(), "image/png"),
             ("c.png", good2, "image/png"), ("d.jpg", b"not an image", "image/jpeg")]
    texts = ["first #one", "second", "third 😍", ""]
    r = client.post("/predict/batch", **numbered(files, text=texts))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert [x["status"] for x in results] == [200, 422, 200, 415]
    assert results[1]["reason"] in ("corrupt", "truncated") and results[3]["reason"] == "unsupported_format"
    assert results[0]["cleaned_text"] == "first one" and results[2]["cleaned_text"] == "third 😍"
    # the batched predictions equal one-at-a-time ones (padding does not change a post's score)
    single = client.post("/predict", **multipart(good2, "third 😍", "c.png", "image/png")).json()
    assert results[2]["score"] == pytest.approx(single["score"], abs=1e-5)
    # A 0-byte file breaks the document (minLength 1), so the batch fails as a whole.
    r = client.post("/predict/batch", **numbered(files[:1] + [("e.jpg", b"", "image/jpeg")], text=["a", "b"]))
    assert (r.status_code, r.json()["reason"]) == (422, "empty_file"), r.text


def test_batch_json_mixed(client):
    # Images that cannot be used fail their own post; the request is well formed.
    posts = [post_json(jpeg_bytes(), "ok"), post_json(jpeg_bytes(600, 400), "huge"), post_json(jpeg_bytes()[:4000], "cut"),
             post_json(png_bytes(), "")]
    results = client.post("/predict/batch/json", json={"posts": posts}).json()["results"]
    assert [(x["index"], x["status"]) for x in results] == [(0, 200), (1, 413), (2, 422), (3, 200)]
    assert [results[1]["reason"], results[2]["reason"]] == ["too_many_pixels", "truncated"]


@pytest.mark.parametrize("path,kwargs,status,reason", [
    # A post that breaks the schema fails the whole request, like any schema violation.
    ("/predict/batch/json", dict(json={"posts": [post_json(jpeg_bytes(), "ok"), {"image_url": "http://10.0.0.1/a",
                                                                                 "text": "ssrf"}]}),
     422, "image_url_not_supported"),
    ("/predict/batch/json", dict(json={"posts": [post_json(jpeg_bytes(), "ok"), {"text": "no image"}]}),
     422, "validation_error"),
    ("/predict/batch/json", dict(json={"posts": [post_json(jpeg_bytes(), "c" * 301)]}), 422, "caption_too_long"),
    ("/predict/batch/json", dict(json={"posts": [{"image_base64": "!!", "text": ""}]}), 422, "invalid_base64"),
    ("/predict/batch/json", dict(json={"posts": [{"image_base64": "AAAA", "text": ""}] * 5}), 413, "too_many_posts"),
    ("/predict/batch/json", dict(json={"posts": []}), 422, "no_posts"),
    ("/predict/batch/json", dict(json={"items": []}), 422, "unknown_field"),
    ("/predict/batch", numbered([("a.jpg", b"1", "image/jpeg")] * 2, text=["x"]), 422, "unpaired_fields"),
    ("/predict/batch", numbered([("a.jpg", b"1", "image/jpeg")] * 5, text=["x"] * 5), 413, "too_many_posts"),
    ("/predict/batch", numbered([("a.jpg", b"1", "image/jpeg")], text=["d" * 301]), 422, "caption_too_long"),
    ("/predict/batch", {"files": {"image_0": ("a.jpg", b"1", "image/jpeg"), "image_2": ("c.jpg", b"1", "image/jpeg")},
                        "data": {"text_0": "", "text_2": ""}}, 422, "unpaired_fields"),
    ("/predict/batch", dict(content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}),
     422, "missing_field"),
    ("/predict/batch", dict(content=b"x", headers={"content-type": "image/jpeg"}), 415, "unsupported_media_type"),
], ids=["json_image_url", "json_post_missing_image", "json_caption_too_long", "json_bad_base64", "json_too_many",
        "json_empty", "json_wrong_shape", "multipart_unpaired", "multipart_too_many", "multipart_caption_too_long",
        "multipart_gap", "multipart_empty", "raw_jpeg"])
def test_batch_request_errors(client, path, kwargs, status, reason):
    r = client.post(path, **kwargs)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text


# --- request IDs and metrics ---------------------------------------------------------------


def test_every_response_carries_a_request_id(client):
    answers = [client.get("/health"), client.get("/nope"), client.post("/predict", **multipart(jpeg_bytes(), "x")),
               client.post("/predict/json", json={"text": "x"})]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)  # uuid4 hex
    assert len(set(ids)) == len(ids)  # a new one each time
    assert answers[1].json()["request_id"] == ids[1] and answers[3].json()["request_id"] == ids[3]


@pytest.mark.parametrize("sent,kept", [("abc-123.X:y/z+=", True), ("a" * 128, True), ("a" * 129, False),
                                       ("has space", False), ('quote"d', False), ("", False)])
def test_a_client_request_id_is_kept_when_it_is_a_plain_token(client, sent, kept):
    r = client.post("/predict/json", json={"text": "x"}, headers={"X-Request-ID": sent})
    returned = r.headers["x-request-id"]
    assert (returned == sent) is kept and r.json()["request_id"] == returned
    if not kept:
        assert len(returned) == 32


def test_access_log_line_carries_the_request_id(client, caplog):
    with caplog.at_level("INFO", logger="serving.access"):
        client.post("/predict", **multipart(jpeg_bytes(), "x"), headers={"X-Request-ID": "trace-42"})
    lines = [r.getMessage() for r in caplog.records if r.name == "serving.access"]
    assert len(lines) == 1 and '"POST /predict" 200' in lines[0] and lines[0].endswith("request_id=trace-42")


def _scrape(client) -> dict:
    """{(series name, labels as a sorted tuple): value} of GET /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_happened(model_dir):
    with serving_client(model_dir) as c:
        before = _scrape(c)
        assert before[("model_load_seconds", ())] > 0
        assert before[("model_info", (("name", "run"), ("version", service(c).predictor.info.version)))] == 1
        c.post("/predict", **multipart(jpeg_bytes(), "one"))
        c.post("/predict", **multipart(jpeg_bytes(seed=2), "two"))
        c.post("/predict", **multipart(b"not an image", "three"))
        c.post("/predict/batch", **numbered([("a.jpg", jpeg_bytes(), "image/jpeg")] * 3, text=["a", "b", "c"]))
        c.get("/nope")
        after = _scrape(c)
    requests = dict(name="http_requests_total", method="POST")
    assert _delta(before, after, **requests, path="/predict", status="200") == 2
    assert _delta(before, after, **requests, path="/predict", status="415") == 1
    assert _delta(before, after, **requests, path="/predict/batch", status="200") == 1
    assert _delta(before, after, "http_requests_total", method="GET", path="unmatched", status="404") == 1
    assert _delta(before, after, "http_requests_total", method="GET", path="/metrics", status="200") == 1
    assert _delta(before, after, "http_request_duration_seconds_count", path="/predict") == 3
    # three forward passes: two single posts and one batch of three
    assert _delta(before, after, "prediction_batch_size_count") == 3
    assert _delta(before, after, "prediction_batch_size_sum") == 5
    assert _delta(before, after, "prediction_batch_size_bucket", le="1.0") == 2
    assert _delta(before, after, "prediction_batch_duration_seconds_count") == 3
    assert after[("prediction_queue_depth", ())] == 0


def test_apps_in_one_process_count_apart(model_dir):
    with serving_client(model_dir) as a, serving_client(model_dir) as b:
        a.post("/predict", **multipart(jpeg_bytes(), "only on a"))
        key = ("http_requests_total", (("method", "POST"), ("path", "/predict"), ("status", "200")))
        assert _scrape(a)[key] == 1 and key not in _scrape(b)


# --- lifecycle and settings ---------------------------------------------------------------


def test_ready_is_503_before_the_model_loads(model_dir):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings

    client = TestClient(create_app(ServingSettings(model_dir=model_dir)))  # no `with`: lifespan not run
    assert client.get("/health").status_code == 200
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["ready"] is False
    r = client.post("/predict", **multipart(jpeg_bytes(), "x"))
    assert r.status_code == 503 and r.json()["reason"] == "not_ready" and "retry-after" in r.headers
    metrics = _scrape(client)
    assert metrics[("prediction_rejected_total", (("reason", "not_ready"), ("status", "503")))] == 1


@pytest.mark.parametrize("model_dir_value,message", [
    (None, "MODEL_DIR is not set"),
    ("/nonexistent/run/model", "is not a directory"),
    ("EMPTY", "could not load the model"),
])
def test_startup_fails_clearly_without_a_model(tmp_path, model_dir_value, message):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings

    value = tmp_path if model_dir_value == "EMPTY" else model_dir_value
    app = create_app(ServingSettings(model_dir=value))
    with pytest.raises(RuntimeError, match=message):
        with TestClient(app):
            pass


def test_settings_come_from_the_environment(monkeypatch, model_dir):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings, get_settings

    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("MICRO_BATCHING", "0")
    monkeypatch.setenv("MAX_WAIT_MS", "12.5")
    monkeypatch.setenv("MAX_CAPTION_CHARS", "100")
    s = ServingSettings()
    assert (s.model_dir, s.max_batch_size, s.micro_batching, s.max_wait_ms) == (model_dir, 3, False, 12.5)
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:  # no override: the dependency reads the environment
            meta = c.get("/metadata").json()["settings"]
            assert meta["max_batch_size"] == 3 and meta["micro_batching"] is False
            assert service(c).batcher.max_batch_size == 1  # MICRO_BATCHING=0: every post alone
            text = c.get("/openapi.json").json()["components"]["schemas"]["PostForm"]["properties"]["text"]
            assert text["maxLength"] == 100
        monkeypatch.setenv("MAX_BATCH_SIZE", "lots")
        get_settings.cache_clear()
        with pytest.raises(RuntimeError, match="invalid serving settings"):
            with TestClient(create_app()):
                pass
    finally:
        get_settings.cache_clear()


def test_settings_dependency_override(model_dir):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings, get_settings

    app = create_app()
    app.dependency_overrides[get_settings] = lambda: ServingSettings(model_dir=model_dir, max_queue=7)
    with TestClient(app) as c:
        assert c.get("/metadata").json()["settings"]["max_queue"] == 7
    # The request models were built with the limits create_app saw; other limits fail startup.
    app.dependency_overrides[get_settings] = lambda: ServingSettings(model_dir=model_dir, max_caption_chars=10)
    with pytest.raises(RuntimeError, match="MAX_CAPTION_CHARS"):
        with TestClient(app):
            pass


# --- load: micro-batching, overload, deadline, unexpected errors ---------------------------


def _fire(client, n: int, **kw) -> list:
    def one(i):
        return client.post("/predict", **multipart(jpeg_bytes(seed=i % 3), f"post number {i} " + "word " * (i % 5)),
                           **kw)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def test_concurrent_requests_share_batches(model_dir):
    sizes, spy = [], ModelSpy()
    with serving_client(model_dir, spy=spy, max_batch_size=8, max_wait_ms=300) as c:
        spy.before = lambda batch: sizes.append(len(batch["input_ids"]))
        responses = _fire(c, 6)
        assert all(r.status_code == 200 for r in responses)
        # the same posts one at a time give the same scores
        service(c).batcher.max_wait_s = 0.0
        alone = [c.post("/predict", **multipart(jpeg_bytes(seed=i % 3), f"post number {i} " + "word " * (i % 5)))
                 for i in range(6)]
    assert max(sizes[:-6]) > 1 and sum(sizes[:-6]) == 6 and sizes[-6:] == [1] * 6, sizes
    for r, a in zip(responses, alone):
        assert r.json()["score"] == pytest.approx(a.json()["score"], abs=1e-5)


def test_micro_batching_off_runs_posts_alone(model_dir):
    sizes, spy = [], ModelSpy()
    with serving_client(model_dir, spy=spy, micro_batching=False, max_batch_size=8, max_wait_ms=300) as c:
        spy.before = lambda batch: sizes.append(len(batch["input_ids"]))
        assert all(r.status_code == 200 for r in _fire(c, 4))
    assert sizes == [1, 1, 1, 1]


def test_overload_answers_503_with_retry_after_never_500(model_dir):
    spy = ModelSpy()
    with serving_client(model_dir, spy=spy, max_queue=2, max_batch_size=1, max_wait_ms=0) as c:
        spy.before = lambda batch: time.sleep(0.3)  # a slow model
        responses = _fire(c, 12)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert r.json()["reason"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
        metrics = _scrape(c)
        assert metrics[("prediction_rejected_total", (("reason", "overloaded"), ("status", "503")))] == codes.count(503)
        spy.before = None
        assert c.get("/health").status_code == 200
        assert c.post("/predict", **multipart(jpeg_bytes(), "after the storm")).status_code == 200


def test_deadline_answers_504(model_dir):
    release, spy = threading.Event(), ModelSpy()
    with serving_client(model_dir, spy=spy, request_timeout_s=1.0) as c:
        spy.before = lambda batch: release.wait(5)
        t0 = time.perf_counter()
        r = c.post("/predict", **multipart(jpeg_bytes(), "slow"))
        waited = time.perf_counter() - t0
        release.set()
        assert r.status_code == 504 and r.json()["reason"] == "deadline_exceeded"
        assert waited < 5  # answered at the deadline, not when the model finished
        assert _scrape(c)[("prediction_rejected_total", (("reason", "deadline_exceeded"), ("status", "504")))] == 1
        spy.before = None
        assert c.get("/health").status_code == 200
        assert c.post("/predict", **multipart(jpeg_bytes(), "fast again")).status_code == 200


def test_unexpected_error_is_a_json_500_without_details(model_dir):
    def boom(batch):
        raise RuntimeError("secret internal path /etc/model")

    spy = ModelSpy()
    with serving_client(model_dir, spy=spy, raise_server_exceptions=False) as c:
        spy.before = boom
        r = c.post("/predict", **multipart(jpeg_bytes(), "x"), headers={"X-Request-ID": "boom-1"})
        assert r.status_code == 500
        assert r.json() == {"status": 500, "reason": "internal_error", "request_id": "boom-1",
                            "detail": "internal server error; the details are in the server log"}
        assert r.headers["x-request-id"] == "boom-1"
        assert "secret" not in r.text and "Traceback" not in r.text
        spy.before = None
        assert c.post("/predict", **multipart(jpeg_bytes(), "x")).status_code == 200


def test_batcher_withdraws_posts_of_callers_that_gave_up():
    from serving.batching import MicroBatcher, QueueFull

    seen = []

    def run(items):
        time.sleep(0.05)
        seen.extend(items)
        return [i * 10 for i in items]

    async def scenario():
        b = MicroBatcher(run, max_batch_size=4, max_wait_s=0.0, max_queue=3)
        await b.start()
        first = asyncio.create_task(b.submit(1))  # runs at once
        await asyncio.sleep(0.01)
        slow = asyncio.create_task(b.submit_many([2, 3]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit_many([4, 5])  # 2 queued + 2 > 3
        slow.cancel()  # the caller's deadline: posts 2 and 3 must not run
        assert await first == 10
        assert await b.submit_many([6, 7, 8, 9, 10]) == [60, 70, 80, 90, 100]  # > max_queue, but queue empty
        await b.stop()
        return b

    b = asyncio.run(scenario())
    assert 2 not in seen and 3 not in seen
    assert b.largest_batch == 4


def test_batcher_waits_only_for_announced_posts():
    from serving.batching import MicroBatcher

    batches = []

    def run(items):
        batches.append(list(items))
        return items

    async def scenario():
        b = MicroBatcher(run, max_batch_size=8, max_wait_s=30.0, max_queue=8)
        await b.start()
        # A lone post does not sit out max_wait_s (30 s) waiting for company.
        assert await asyncio.wait_for(b.submit("alone"), timeout=10) == "alone"

        # A post still being prepared is waited for: both run in one batch.
        async def late():
            with b.incoming():
                await asyncio.sleep(0.2)  # "decoding"
            return await b.submit("late")

        late_task = asyncio.create_task(late())
        await asyncio.sleep(0)
        early = await asyncio.wait_for(b.submit("early"), timeout=10)
        assert (early, await late_task) == ("early", "late")
        await b.stop()

    asyncio.run(scenario())
    assert batches == [["alone"], ["early", "late"]]
