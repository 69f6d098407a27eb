"""Issue 28's serving findings, each against a real uvicorn on loopback: a bad post and its
batch mates, decode admission, the deadline before preparation, request bytes in flight,
NaN features and paths in /metadata. (Slow clients and log forging are in
tests/test_serving_uvicorn.py: they need the server as its own process.)

The server runs in a thread of the test (``loopback``), so a test can reach the running
service (``app.state.service``) to hold a post inside its preparation."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from models.artifact import CONFIG_FILE, read_config
from serving.contract import RawPost
from serving.service import DecodeBusy, PixelBudget, prepare_unless_late
from tests.serving_fixtures import ModelSpy, jpeg_bytes, loopback, png_bytes, serving_app

GUILTY = "This is terrible, awful, horrible and hateful."  # VADER compound < -0.9: the spy's mark


def post_json(image: bytes, text: str, **features) -> dict:
    return {"image_base64": base64.b64encode(image).decode(), "text": text, **features}


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- 1c: one bad post never fails its batch mates ----------------------------------------------


def test_one_bad_post_never_fails_its_batch_mates(model_dir):
    sizes, spy = [], ModelSpy()

    def before(batch):  # the model runs out of memory on any batch that holds the guilty post
        sizes.append(len(batch["sentiment"]))
        if (batch["sentiment"] < -0.5).any():
            raise MemoryError("the guilty post's resize")

    posts = [post_json(jpeg_bytes(seed=1), "good one"), post_json(jpeg_bytes(seed=2), GUILTY),
             post_json(jpeg_bytes(seed=3), "good two")]
    with loopback(serving_app(model_dir, spy, max_wait_ms=300)) as base:
        spy.before = before
        with httpx.Client(base_url=base, timeout=60) as client, ThreadPoolExecutor(2) as pool:
            batch = pool.submit(client.post, "/predict/batch/json", json={"posts": posts})
            other = pool.submit(client.post, "/predict/json", json=post_json(jpeg_bytes(seed=4), "another client"))
            batch, other = batch.result(), other.result()
            spy.before = None
            alone = [client.post("/predict/json", json=posts[i]).json()["score"] for i in (0, 2)]
    assert batch.status_code == 200 and other.status_code == 200, (batch.text, other.text)
    results = batch.json()["results"]
    assert [(r["status"], r.get("reason")) for r in results] == [(200, None), (500, "internal_error"), (200, None)]
    assert "MemoryError" not in batch.text  # the log has it, the answer does not
    assert [results[0]["score"], results[2]["score"]] == pytest.approx(alone, abs=1e-5)
    assert max(sizes) >= 3 and sizes.count(1) >= 3, sizes  # the batch failed, then ran one by one


def test_batcher_reruns_a_failed_batch_one_by_one():
    from serving.batching import MicroBatcher

    batches = []

    def run(items):
        batches.append(list(items))
        if "bad" in items:
            raise MemoryError("bad")
        return [f"ok {i}" for i in items]

    async def scenario():
        b = MicroBatcher(run, max_batch_size=8, max_wait_s=0.0, max_queue=8)
        await b.start()
        out = await b.submit_many(["a", "bad", "c"], return_exceptions=True)
        with pytest.raises(MemoryError):
            await b.submit_many(["d", "bad"])
        await b.stop()
        return out

    out = asyncio.run(scenario())
    assert out[0] == "ok a" and isinstance(out[1], MemoryError) and out[2] == "ok c"
    assert batches[:4] == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]


# --- 2b and 4c: decode admission, and nothing prepared past the deadline ------------------------


class HeldPrepare:
    """Wraps the running predictor's ``prepare``: records each post it starts (by caption)
    and holds the post captioned "holder" until ``release`` is set."""

    def __init__(self, predictor):
        self.real = predictor.prepare
        self.started: list[str] = []
        self.release = threading.Event()

    def __call__(self, raw: RawPost):
        self.started.append(raw.caption)
        if raw.caption == "holder":
            self.release.wait(30)
        return self.real(raw)


@pytest.fixture
def admission(model_dir, monkeypatch):
    """Starts a server whose decode budget (100,000 pixels) holds one 300x260 image (78,000)
    but not two; yields (base URL, the service, the held prepare)."""

    @contextmanager
    def start(**settings):
        app = serving_app(model_dir, max_pixels=400_000, max_decode_pixels=100_000, **settings)
        with loopback(app) as base:
            service = app.state.service
            held = HeldPrepare(service.predictor)
            monkeypatch.setattr(service.predictor, "prepare", held)
            try:
                yield base, service, held
            finally:
                held.release.set()

    return start


def test_decoding_waits_for_pixels_and_answers_503_before_decoding(admission):
    image = png_bytes(300, 260, alpha=False)  # 78,000 pixels
    with admission(decode_wait_s=0.5) as (base, service, held), httpx.Client(base_url=base, timeout=30) as client, \
            ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client.post, "/predict/json", json=post_json(image, "holder"))
        assert wait_until(lambda: "holder" in held.started)
        r = client.post("/predict/json", json=post_json(image, "waiter"))
        assert (r.status_code, r.json()["reason"]) == (503, "overloaded"), r.text
        assert "MAX_DECODE_PIXELS" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        assert "waiter" not in held.started  # refused before its image was decoded
        held.release.set()
        assert holder.result().status_code == 200
        # Larger than the whole budget, within MAX_PIXELS: decoded when it is alone.
        big = client.post("/predict/json", json=post_json(jpeg_bytes(600, 500), "big, alone"))
        assert big.status_code == 200, big.text
        metrics = client.get("/metrics").text
        assert wait_until(lambda: service.decode_budget.in_use == 0)  # every pixel given back
    assert 'prediction_rejected_total{reason="overloaded",status="503"} 1.0' in metrics


def test_posts_of_a_request_past_its_deadline_are_never_prepared(admission):
    image = png_bytes(300, 260, alpha=False)
    posts = [post_json(image, "holder"), post_json(image, "queued behind it")]
    with admission(decode_wait_s=20, request_timeout_s=2) as (base, service, held), \
            httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/predict/batch/json", json={"posts": posts})
        assert (r.status_code, r.json()["reason"]) == (504, "deadline_exceeded"), r.text
        held.release.set()
        assert wait_until(lambda: service.decode_budget.in_use == 0)
        assert client.get("/health").status_code == 200
    assert held.started == ["holder"]  # its batch mate never reached a decoding thread


def test_a_decoding_thread_skips_a_post_whose_deadline_has_passed():
    class Recorder:
        def __init__(self):
            self.prepared = []

        def prepare(self, raw):
            self.prepared.append(raw.caption)
            return raw.caption

    predictor = Recorder()
    with pytest.raises(TimeoutError):
        prepare_unless_late(predictor, RawPost(b"", "late"), deadline=time.monotonic() - 0.001)
    assert prepare_unless_late(predictor, RawPost(b"", "in time"), deadline=time.monotonic() + 60) == "in time"
    assert predictor.prepared == ["in time"]


def test_pixel_budget_admits_what_fits_at_once_and_gets_back_what_waiters_drop():
    """A post that fits goes ahead of a larger one waiting for room (a photo never waits behind a
    huge image); one that does not fit waits, and gets DecodeBusy past its wait."""
    async def scenario():
        budget = PixelBudget(100)
        first = await budget.acquire(80, timeout_s=1)
        big = asyncio.create_task(budget.acquire(500, timeout_s=5))  # over the budget: waits for all of it
        await asyncio.sleep(0)
        assert await budget.acquire(10, timeout_s=0.05) == 10  # fits beside the first: not behind big
        with pytest.raises(DecodeBusy):
            await budget.acquire(30, timeout_s=0.05)  # does not fit
        late = asyncio.create_task(budget.acquire(20, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not big.done() and not late.done() and budget.in_use == 90
        budget.release(first)  # room for late (20), not for big (all 100)
        assert await late == 20 and not big.done() and budget.in_use == 30
        big.cancel()  # its caller gave up
        budget.release(10)
        budget.release(20)
        return budget.in_use, len(budget._waiters)

    assert asyncio.run(scenario()) == (0, 0)


# --- 5: request bytes in flight across the server ------------------------------------------------


def test_request_bytes_in_flight_are_capped_across_the_server(model_dir):
    app = serving_app(model_dir, max_body_bytes=2_000_000, max_inflight_bytes=1_000_000, max_caption_chars=100)
    body = json.dumps(post_json(jpeg_bytes(), "x" * 500_000)).encode()  # ~500 KB, caption over the limit
    alone = json.dumps(post_json(jpeg_bytes(), "x" * 1_200_000)).encode()  # over the cap, within MAX_BODY_BYTES
    with loopback(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        answers = []

        def answered(content: bytes, status: int) -> bool:
            """Post ``content``; whether the answer had ``status`` (each answer is kept)."""
            answers.append(client.post("/predict/json", content=content, headers={"Content-Type": "application/json"}))
            return answers[-1].status_code == status

        slow = socket.create_connection((urlsplit(base).hostname, urlsplit(base).port))
        # Declares 900 KB and sends a little: its request holds 900 KB from its first read.
        slow.sendall(b"POST /predict/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 900000\r\n\r\n" + body[:1000])
        assert wait_until(lambda: answered(body, 503), timeout=10), answers[-1].text
        assert answers[-1].json()["reason"] == "overloaded" and answers[-1].headers["retry-after"] == "1"
        slow.close()  # the client gives up: its bytes are given back
        assert wait_until(lambda: answered(body, 422), timeout=10), answers[-1].text
        assert answers[-1].json()["reason"] == "caption_too_long"
        # A body over the cap is let in when it is the only one held.
        assert wait_until(lambda: answered(alone, 422), timeout=10), answers[-1].text
        assert answers[-1].json()["reason"] == "caption_too_long"


# --- 9: NaN is invalid_feature -----------------------------------------------------------------------


@pytest.mark.parametrize("body,form", [
    ('"followers": NaN, "platform": "x"', None), ('"followers": Infinity, "platform": "x"', None),
    ('"followers": -Infinity, "platform": "x"', None), ('"followers": 12, "platform": NaN', None),
    (None, {"followers": "NaN", "platform": "x"}), (None, {"followers": "nan", "platform": "x"}),
], ids=["json_nan", "json_inf", "json_minus_inf", "json_nan_categorical", "form_NaN", "form_nan"])
def test_nan_feature_is_invalid_feature(featured_base_url, body, form):
    with httpx.Client(base_url=featured_base_url, timeout=30) as client:
        if body is not None:
            content = json.dumps(post_json(jpeg_bytes(), "hi"))[:-1] + ", " + body + "}"
            r = client.post("/predict/json", content=content, headers={"Content-Type": "application/json"})
        else:
            r = client.post("/predict", files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")},
                            data={"text": "hi", **form})
    assert (r.status_code, r.json()["reason"]) == (422, "invalid_feature"), r.text
    assert "followers" in r.json()["detail"] or "platform" in r.json()["detail"]


def test_json_null_feature_is_still_an_unknown_value(featured_base_url):
    r = httpx.post(f"{featured_base_url}/predict/json", json=post_json(jpeg_bytes(), "hi", followers=None,
                                                                         platform=None), timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def featured_base_url(featured_model_dir):
    with loopback(serving_app(featured_model_dir)) as base:
        yield base


# --- 10: /metadata shows names, not paths ------------------------------------------------------------


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_metadata_shows_names_not_absolute_paths(model_dir, tmp_path):
    # An artifact whose config records where training read and wrote, as train_torch's does.
    art = tmp_path / "runs" / "demo" / "model"
    shutil.copytree(model_dir, art)
    config = read_config(art)
    config["training"] = {"args": {"data": str(tmp_path / "data"), "clip_model": str(tmp_path / "clips" / "b32"),
                                   "out": str(tmp_path / "runs")},
                          "data": {"dir": str(tmp_path / "data"), "counts": {"train": 3}}}
    (art / CONFIG_FILE).write_text(json.dumps(config))
    # RUNTIME=auto without an ONNX export: its reason names the export command for MODEL_DIR.
    with loopback(serving_app(art, runtime="auto")) as base:
        meta = httpx.get(f"{base}/metadata", timeout=30).json()
    values = list(_strings(meta))
    assert [v for v in values if v.startswith("/") or str(tmp_path) in v] == []
    assert meta["settings"]["model_dir"] == "demo/model" and meta["model"]["name"] == "demo"
    assert meta["training"]["training"]["args"]["clip_model"] == "b32"  # the CLIP's folder name
    assert "has no ONNX export" in meta["model"]["runtime"]["reason"]  # the sentence stays, the path goes
