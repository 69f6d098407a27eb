"""Endpoint tests of serving.app through TestClient (as a context manager, so the lifespan
loads the model and starts the micro-batcher)."""

from __future__ import annotations

import base64
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from data_preprocessing.prepare import clean_text, sentiment
from tests.serving_fixtures import (  # noqa: F401 - model_dir is a fixture
    corrupt_png_bytes,
    encode,
    jpeg_bytes,
    model_dir,
    multipart,
    photo_array,
    png_bytes,
    service,
    serving_client,
    zero_size_png_bytes,
)

CAPTION = "Sunset at the beach!!! 😍 #travel @bob https://x.co/a"
LIMITS = dict(max_body_bytes=2_000_000, max_caption_chars=300, max_pixels=200_000, max_posts_per_request=4)


@pytest.fixture(scope="module")
def client(model_dir):
    with serving_client(model_dir, **LIMITS) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- happy paths --------------------------------------------------------------------------


@pytest.mark.parametrize("image,filename,mime", [(jpeg_bytes(), "photo.jpg", "image/jpeg"),
                                                 (png_bytes(), "photo.png", "image/png")], ids=["jpeg", "png"])
def test_predict_multipart(client, image, filename, mime):
    r = client.post("/predict", **multipart(image, CAPTION, filename, mime))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"engagement", "score", "sentiment", "cleaned_text", "model"}
    assert body["cleaned_text"] == clean_text(CAPTION) == "Sunset at the beach!!! 😍 travel @user <url>"
    assert body["sentiment"] == pytest.approx(sentiment(CAPTION))  # of the RAW caption
    # engagement is the label-unit view of score (log1p target transform)
    assert body["engagement"] == pytest.approx(math.expm1(body["score"]), rel=1e-9)
    assert body["model"]["name"] == "run" and len(body["model"]["version"]) == 12


def test_json_and_multipart_agree(client):
    image = jpeg_bytes(seed=3)
    a = client.post("/predict", **multipart(image, CAPTION)).json()
    b = client.post("/predict", json={"image_base64": b64(image), "text": CAPTION}).json()
    c = client.post("/predict", json={"image_base64": "data:image/jpeg;base64," + b64(image), "text": CAPTION}).json()
    assert a["score"] == pytest.approx(b["score"], abs=1e-9) == c["score"]
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
    assert client.post("/predict", json={"image_base64": b64(jpeg_bytes()), "text": ""}).status_code == 200


def test_probes_and_metadata(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    meta = client.get("/metadata").json()
    assert meta["model"]["architecture"]["class"] == "CLIPRegressor"
    assert meta["model"]["target_transform"] == {"kind": "log1p", "mean": 3.0, "std": 1.5}
    assert meta["model"]["processor"]["resize_policy"]["shortest_edge"] == 224
    assert meta["training"]["metrics"]["test"]["rmse"] == 1.25
    assert meta["settings"]["max_posts_per_request"] == 4 and meta["settings"]["max_pixels"] == 200_000
    assert meta["settings"]["batching"]["posts"] >= 0


def test_openapi_documents_routes_and_schemas(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/ready", "/metadata", "/predict", "/predict/batch"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for name in ("Prediction", "BatchResponse", "ErrorBody", "PostJSON", "BatchJSON", "PostMultipart",
                 "BatchMultipart", "Sentiment", "ModelInfo"):
        assert name in schemas, name
    for path, req, resp in (("/predict", ("PostMultipart", "PostJSON"), "Prediction"),
                            ("/predict/batch", ("BatchMultipart", "BatchJSON"), "BatchResponse")):
        op = spec["paths"][path]["post"]
        content = op["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["$ref"].endswith(req[0])
        assert content["application/json"]["schema"]["$ref"].endswith(req[1])
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(resp)
        assert {"413", "415", "422", "503", "504"} <= set(op["responses"])
    assert schemas["PostMultipart"]["properties"]["image"]["format"] == "binary"
    # every $ref in the document resolves
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].rsplit("/", 1)[-1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs <= set(schemas), refs - set(schemas)
    assert client.get("/docs").status_code == 200


# --- the bad-input table ------------------------------------------------------------------


def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def _tiff() -> bytes:
    return encode(Image.fromarray(photo_array(64, 48)), "TIFF")


BAD_INPUTS = [
    # (id, request kwargs, status, reason)
    ("no_image_field", dict(data={"text": "hi"}, files={"other": ("x.txt", b"x", "text/plain")}), 422, "missing_field"),
    ("no_text_field", dict(files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}), 422, "missing_field"),
    ("image_is_text_value", dict(data={"image": "photo.jpg", "text": "hi"},
                                 files={"note": ("n.txt", b"-", "text/plain")}), 422, "image_not_a_file"),
    ("two_images", dict(files=[("image", ("a.jpg", jpeg_bytes(), "image/jpeg")),
                               ("image", ("b.jpg", jpeg_bytes(), "image/jpeg"))], data={"text": "hi"}),
     422, "too_many_fields"),
    ("empty_file", multipart(b"", "hi"), 422, "empty_file"),
    ("not_an_image", multipart(b"hello, I am a text file\n" * 10, "hi", "notes.txt", "text/plain"),
     415, "unsupported_format"),
    ("tiff_not_allowed", multipart(_tiff(), "hi", "a.tiff", "image/tiff"), 415, "unsupported_format"),
    ("zero_size_png", multipart(zero_size_png_bytes(), "hi", "a.png", "image/png"), 415, "unsupported_format"),
    ("truncated_jpeg", multipart(jpeg_bytes()[:4000], "hi"), 422, "truncated"),
    # zlib decides whether scrambled data reads as corrupt or as a broken (truncated) stream
    ("corrupt_png", multipart(corrupt_png_bytes(), "hi", "a.png", "image/png"), 422, ("corrupt", "truncated")),
    # load_image lets this OSError through Image.open; the server still answers 422
    ("jpeg_header_only", multipart(jpeg_bytes()[:200], "hi"), 422, ("corrupt", "truncated")),
    ("too_many_pixels", multipart(jpeg_bytes(600, 400), "hi"), 413, "too_many_pixels"),
    ("caption_too_long", multipart(jpeg_bytes(), "a" * 301), 422, "caption_too_long"),
    ("body_too_large", dict(content=b"x" * 2_000_001, headers={"content-type": "application/json"}),
     413, "body_too_large"),
    ("chunked_body_too_large", dict(content=_chunks(3_000_000), headers={"content-type": "application/json"}),
     413, "body_too_large"),
    ("text_plain", dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    ("no_content_type", dict(content=b"hello"), 415, "unsupported_media_type"),
    ("urlencoded_form", dict(data={"text": "hi"}), 415, "unsupported_media_type"),
    ("invalid_json", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
    ("json_not_object", dict(json=["a", "b"]), 422, "invalid_post"),
    ("json_missing_image", dict(json={"text": "hi"}), 422, "validation_error"),
    ("json_missing_text", dict(json={"image_base64": base64.b64encode(jpeg_bytes()).decode()}),
     422, "validation_error"),
    ("json_extra_field", dict(json={"image_base64": "AAAA", "text": "hi", "likes": 3}), 422, "validation_error"),
    ("json_bad_base64", dict(json={"image_base64": "not base64!!", "text": "hi"}), 422, "invalid_base64"),
    ("json_image_url_ssrf", dict(json={"image_url": "http://169.254.169.254/latest/meta-data", "text": "hi"}),
     422, "image_url_not_supported"),
    ("json_caption_too_long", dict(json={"image_base64": base64.b64encode(jpeg_bytes()).decode(), "text": "b" * 301}),
     422, "caption_too_long"),
    ("json_empty_image", dict(json={"image_base64": "", "text": "hi"}), 422, "empty_file"),
]


@pytest.mark.parametrize("kwargs,status,reason", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input(client, kwargs, status, reason):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.status_code < 500
    body = r.json()
    assert body["status"] == status and body["detail"]
    assert body["reason"] in ((reason,) if isinstance(reason, str) else reason)
    assert "Traceback" not in r.text
    assert client.get("/health").status_code == 200


def test_server_still_predicts_after_bad_inputs(client):
    for _, kwargs, _, _ in BAD_INPUTS[:8]:
        client.post("/predict", **kwargs)
    assert client.post("/predict", **multipart(jpeg_bytes(), "still fine")).status_code == 200


def test_ssrf_message_explains(client):
    detail = client.post("/predict", json={"image_url": "http://localhost/x.jpg", "text": ""}).json()["detail"]
    assert "SSRF" in detail and "never fetches" in detail


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["reason"] == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.json()["reason"] == "method_not_allowed"


# --- batch endpoint -----------------------------------------------------------------------


def test_batch_multipart_mixed(client):
    good1, good2 = jpeg_bytes(seed=5), png_bytes(seed=6)
    files = [("image", ("a.jpg", good1, "image/jpeg")), ("image", ("b.png", corrupt_png_bytes(), "image/png")),
             ("image", ("c.png", good2, "image/png")), ("image", ("d.jpg", b"", "image/jpeg"))]
    texts = ["first #one", "second", "third 😍", "fourth"]
    r = client.post("/predict/batch", files=files, data={"text": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert [x["status"] for x in results] == [200, 422, 200, 422]
    assert results[1]["reason"] in ("corrupt", "truncated") and results[3]["reason"] == "empty_file"
    assert results[0]["cleaned_text"] == "first one" and results[2]["cleaned_text"] == "third 😍"
    # the batched predictions equal one-at-a-time ones (padding does not change a post's score)
    single = client.post("/predict", **multipart(good2, "third 😍", "c.png", "image/png")).json()
    assert results[2]["score"] == pytest.approx(single["score"], abs=1e-5)


def test_batch_json_mixed(client):
    posts = [{"image_base64": b64(jpeg_bytes()), "text": "ok"},
             {"image_url": "http://10.0.0.1/a.jpg", "text": "ssrf"},
             {"image_base64": b64(jpeg_bytes(600, 400)), "text": "huge"},
             {"text": "no image"}]
    results = client.post("/predict/batch", json={"posts": posts}).json()["results"]
    assert [(x["index"], x["status"]) for x in results] == [(0, 200), (1, 422), (2, 413), (3, 422)]
    assert [x.get("reason") for x in results[1:]] == ["image_url_not_supported", "too_many_pixels",
                                                      "validation_error"]


@pytest.mark.parametrize("kwargs,status,reason", [
    (dict(json={"posts": [{"image_base64": "AAAA", "text": ""}] * 5}), 413, "too_many_posts"),
    (dict(json={"posts": []}), 422, "no_posts"),
    (dict(json={"items": []}), 422, "validation_error"),
    (dict(files=[("image", ("a.jpg", b"1", "image/jpeg"))] * 2, data={"text": ["x"]}), 422, "unpaired_fields"),
    (dict(files=[("image", ("a.jpg", b"1", "image/jpeg"))] * 5, data={"text": ["x"] * 5}), 413, "too_many_posts"),
    (dict(content=b"x", headers={"content-type": "image/jpeg"}), 415, "unsupported_media_type"),
], ids=["json_too_many", "json_empty", "json_wrong_shape", "multipart_unpaired", "multipart_too_many", "raw_jpeg"])
def test_batch_request_errors(client, kwargs, status, reason):
    r = client.post("/predict/batch", **kwargs)
    assert (r.status_code, r.json()["reason"]) == (status, reason)


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
    s = ServingSettings()
    assert (s.model_dir, s.max_batch_size, s.micro_batching, s.max_wait_ms) == (model_dir, 3, False, 12.5)
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:  # no override: the dependency reads the environment
            meta = c.get("/metadata").json()["settings"]
            assert meta["max_batch_size"] == 3 and meta["micro_batching"] is False
            assert service(c).batcher.max_batch_size == 1  # MICRO_BATCHING=0: every post alone
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


# --- load: micro-batching, overload, deadline, unexpected errors ---------------------------


def _fire(client, n: int, **kw) -> list:
    def one(i):
        return client.post("/predict", **multipart(jpeg_bytes(seed=i % 3), f"post number {i} " + "word " * (i % 5)),
                           **kw)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def test_concurrent_requests_share_batches(model_dir):
    sizes = []
    with serving_client(model_dir, max_batch_size=8, max_wait_ms=300) as c:
        service(c).predictor.on_batch = lambda batch: sizes.append(len(batch["input_ids"]))
        responses = _fire(c, 6)
        assert all(r.status_code == 200 for r in responses)
        # the same posts one at a time give the same scores
        service(c).batcher.max_wait_s = 0.0
        alone = [c.post("/predict", **multipart(jpeg_bytes(seed=i % 3), f"post number {i} " + "word " * (i % 5)))
                 for i in range(6)]
    assert max(sizes) > 1, sizes
    for r, a in zip(responses, alone):
        assert r.json()["score"] == pytest.approx(a.json()["score"], abs=1e-5)


def test_micro_batching_off_runs_posts_alone(model_dir):
    sizes = []
    with serving_client(model_dir, micro_batching=False, max_batch_size=8, max_wait_ms=300) as c:
        service(c).predictor.on_batch = lambda batch: sizes.append(len(batch["input_ids"]))
        assert all(r.status_code == 200 for r in _fire(c, 4))
    assert sizes == [1, 1, 1, 1]


def test_overload_answers_503_with_retry_after_never_500(model_dir):
    with serving_client(model_dir, max_queue=2, max_batch_size=1, max_wait_ms=0) as c:
        service(c).predictor.on_batch = lambda batch: time.sleep(0.3)  # a slow model
        responses = _fire(c, 12)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert r.json()["reason"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
        service(c).predictor.on_batch = None
        assert c.get("/health").status_code == 200
        assert c.post("/predict", **multipart(jpeg_bytes(), "after the storm")).status_code == 200


def test_deadline_answers_504(model_dir):
    release = threading.Event()
    with serving_client(model_dir, request_timeout_s=0.3) as c:
        service(c).predictor.on_batch = lambda batch: release.wait(5)
        t0 = time.perf_counter()
        r = c.post("/predict", **multipart(jpeg_bytes(), "slow"))
        waited = time.perf_counter() - t0
        release.set()
        assert r.status_code == 504 and r.json()["reason"] == "deadline_exceeded"
        assert waited < 5  # answered at the deadline, not when the model finished
        service(c).predictor.on_batch = None
        assert c.get("/health").status_code == 200
        assert c.post("/predict", **multipart(jpeg_bytes(), "fast again")).status_code == 200


def test_unexpected_error_is_a_json_500_without_details(model_dir):
    def boom(batch):
        raise RuntimeError("secret internal path /etc/model")

    with serving_client(model_dir, raise_server_exceptions=False) as c:
        service(c).predictor.on_batch = boom
        r = c.post("/predict", **multipart(jpeg_bytes(), "x"))
        assert r.status_code == 500
        assert r.json()["reason"] == "internal_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        service(c).predictor.on_batch = None
        assert c.post("/predict", **multipart(jpeg_bytes(), "x")).status_code == 200


def test_batcher_withdraws_posts_of_callers_that_gave_up():
    import asyncio

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
    import asyncio

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
