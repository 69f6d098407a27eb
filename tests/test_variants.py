"""POST /predict/variants: one image and several captions (and, with a timestamp column, a grid of
posting times) answered as /predict answers each post; the image embedding cache and its metrics;
the playground's and /docs' pages as a server sends them (the browser tests: test_playground.py)."""

from __future__ import annotations

import base64
import math
import re
from datetime import date
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import torch

from serving.app import create_app
from serving.contract import TimeGrid, build_variants_contract
from serving.settings import ServingSettings
from tests.serving_fixtures import jpeg_bytes, loopback, numbered, png_bytes

IMAGE = jpeg_bytes(seed=21)
CAPTIONS = ["Sunset at the beach! #travel", "", "<img src=x onerror=alert(1)>", "so sad, worst day ever :("]
ACCOUNT = {"followers": "1200", "platform": "x"}
TOL = 1e-6  # on the model scale
STATIC = Path(__file__).resolve().parents[1] / "serving" / "static"


@pytest.fixture(scope="module", params=[0, 256], ids=["no_cache", "cache"])
def server(request, featured_model_dir):
    app = create_app(ServingSettings(model_dir=featured_model_dir, image_cache_size=request.param))
    with loopback(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client, request.param


def predict(client, caption: str, image: bytes = IMAGE, **account) -> dict:
    r = client.post("/predict", files={"image": ("p.jpg", image, "image/jpeg")},
                    data={"text": caption, **(account or ACCOUNT)})
    assert r.status_code == 200, r.text
    return r.json()


def variants(client, captions=CAPTIONS, image: bytes = IMAGE, **account) -> httpx.Response:
    return client.post("/predict/variants", files={"image": ("p.jpg", image, "image/jpeg")},
                       data={"captions": list(captions), **(account or ACCOUNT)})


def assert_same_prediction(got: dict, want: dict) -> None:
    """``got`` answers the post as /predict did, within TOL on the model scale."""
    assert got["score"] == pytest.approx(want["score"], abs=TOL)
    assert got["reference_score"] == pytest.approx(want["reference_score"], abs=TOL)
    for end in ("low", "high"):  # the interval, on the model scale (it is log1p(likes))
        assert math.log1p(got["interval"][end]) == pytest.approx(math.log1p(want["interval"][end]), abs=TOL)
    assert list(got["contributions"]) == list(want["contributions"])
    for group, c in want["contributions"].items():
        assert got["contributions"][group] == pytest.approx(c, abs=TOL), group
    assert (got["cleaned_text"], got["sentiment"]) == (want["cleaned_text"], want["sentiment"])


def cache_counts(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    found = {m: float(v) for m, v in re.findall(r"^image_embedding_cache_(hits|misses)_total (\S+)$", text, re.M)}
    return found["hits"], found["misses"]


# --- the answer equals /predict's --------------------------------------------------------------


def test_every_variant_is_what_predict_answers_for_that_post(server):
    client, _ = server
    r = variants(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(v["index"], v["caption"]) for v in body["variants"]] == list(enumerate(CAPTIONS))
    for v in body["variants"]:
        assert_same_prediction(v, predict(client, v["caption"]))
    scores = [v["score"] for v in body["variants"]]
    assert body["ranking"] == sorted(range(4), key=lambda i: -scores[i])
    assert [body["variants"][i]["rank"] for i in body["ranking"]] == [1, 2, 3, 4]
    best = body["best"]
    assert (best["index"], best["time"], body["grid"]) == (body["ranking"][0], None, None)
    assert_same_prediction(best["prediction"], body["variants"][best["index"]])


def test_json_variants_answer_as_multipart(server):
    client, _ = server
    form = variants(client, CAPTIONS[:2]).json()
    r = client.post("/predict/variants/json", json={"image_base64": base64.b64encode(IMAGE).decode(),
                                                    "captions": CAPTIONS[:2], "followers": 1200, "platform": "x"})
    assert r.status_code == 200, r.text
    for a, b in zip(r.json()["variants"], form["variants"]):
        assert_same_prediction(a, b)


def test_the_account_fields_reach_every_variant(server):
    client, _ = server
    few, many = (variants(client, CAPTIONS[:1], followers=f, platform="x").json()["variants"][0]
                 for f in ("10", "1000000"))
    assert few["score"] != many["score"]
    assert_same_prediction(many, predict(client, CAPTIONS[0], followers="1000000", platform="x"))


@pytest.mark.parametrize("data, files, status, reason", [
    ({"captions": [], **ACCOUNT}, None, 422, "missing_field"),
    ({"captions": ["a"] * 6, **ACCOUNT}, None, 422, "validation_error"),
    ({"captions": ["x" * 2201], **ACCOUNT}, None, 422, "caption_too_long"),
    ({"captions": ["a"], "platform": "x"}, None, 422, "missing_feature"),
    ({"captions": ["a"], "followers": "lots", "platform": "x"}, None, 422, "invalid_feature"),
    ({"captions": ["a"], **ACCOUNT}, {"image": ("notes.txt", b"not an image", "text/plain")}, 415,
     "unsupported_format"),
    ({"captions": ["a"], **ACCOUNT}, {}, 422, "missing_field"),
], ids=["no_caption", "six_captions", "caption_too_long", "missing_feature", "invalid_feature", "text_file",
        "no_image"])
def test_variant_errors_name_the_reason(server, data, files, status, reason):
    client, _ = server
    files = {"image": ("p.jpg", IMAGE, "image/jpeg")} if files is None else files
    if files:
        r = client.post("/predict/variants", files=files, data=data)
    else:  # httpx sends fields without a file as urlencoded: write the multipart body
        r = client.post("/predict/variants", content=_form(data),
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text


def _form(data: dict) -> bytes:
    """A multipart body without a file part (httpx sends data alone as urlencoded)."""
    parts = [(k, v) for k, vs in data.items() for v in (vs if isinstance(vs, list) else [vs])]
    body = "".join(f'--xyz\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in parts)
    return (body + "--xyz--\r\n").encode()


def test_every_documented_example_works_as_sent_for_a_model_with_feature_columns(server):
    client, _ = server
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name, path in (("PostJSON", "/predict/json"), ("BatchJSON", "/predict/batch/json"),
                       ("VariantsJSON", "/predict/variants/json")):
        (example,) = schemas[name]["examples"]
        r = client.post(path, json=example)
        assert r.status_code == 200, (name, r.text)
        assert "results" not in r.json() or [x["status"] for x in r.json()["results"]] == [200, 200]
    assert {"followers": "", "platform": ""}.items() <= schemas["PostJSON"]["examples"][0].items()


# --- the image embedding cache ------------------------------------------------------------------


def test_a_repeated_image_is_embedded_once_while_it_is_cached(server):
    client, size = server
    image = png_bytes(seed=31, alpha=False)
    before = cache_counts(client)
    variants(client, ["first try"], image=image)
    variants(client, ["second try", "third try"], image=image)  # a person tweaking captions
    hits, misses = (a - b for a, b in zip(cache_counts(client), before))
    assert (hits, misses) == ((1, 1) if size else (0, 2))


def test_a_batch_embeds_its_identical_images_once(server):
    client, size = server
    a, b = jpeg_bytes(seed=41), jpeg_bytes(seed=42)
    files = [(f"{i}.jpg", im, "image/jpeg") for i, im in enumerate((a, b, a, a))]
    before = cache_counts(client)
    r = client.post("/predict/batch", **numbered(files, text=["1", "2", "3", "4"], followers=["1"] * 4,
                                                 platform=["x"] * 4))
    assert [x["status"] for x in r.json()["results"]] == [200] * 4, r.text
    hits, misses = (a - b for a, b in zip(cache_counts(client), before))
    assert (hits, misses) == (2, 2)  # two distinct images through the tower; the repeats reuse them


def test_the_cache_keeps_at_most_its_entries():
    from models.embedding_cache import CachingEmbedder, ImageEmbeddingCache

    class Towers:  # counts image tower passes; embeddings are the pixels' mean
        name, calls = "count", 0

        def image(self, px):
            Towers.calls += len(px)
            return px.float().mean(dim=(2, 3))

        def text(self, ids, mask):
            return ids.float()

    cache = ImageEmbeddingCache(2, "v1")
    embed = CachingEmbedder(Towers(), cache)
    px = [torch.full((1, 3, 2, 2), i, dtype=torch.uint8) for i in range(3)]
    for i in (0, 1, 0, 2, 1):  # 1 is the least recently used when 2 arrives
        embed.image(px[i])
    assert (Towers.calls, len(cache), cache.hits, cache.misses) == (4, 2, 1, 4)
    assert torch.equal(embed.image(torch.cat([px[2], px[2]])), torch.full((2, 3), 2.0))
    assert ImageEmbeddingCache(2, "v2").key(px[0][0]) != cache.key(px[0][0])  # another model's entry


# --- the time grid (a timestamp column, issue 30) ------------------------------------------------


def test_a_grid_is_every_hour_of_its_days_in_order():
    grid = TimeGrid(start="2025-03-30", days=3, hours=[9, 21])
    assert grid.times() == [(0, 9, "2025-03-30T09:00"), (0, 21, "2025-03-30T21:00"), (1, 9, "2025-03-31T09:00"),
                            (1, 21, "2025-03-31T21:00"), (2, 9, "2025-04-01T09:00"), (2, 21, "2025-04-01T21:00")]
    assert len(TimeGrid(start=date(2025, 1, 1).isoformat(), days=7).times()) == 7 * 24
    for bad in ({"start": "2025-02-30", "days": 1}, {"start": "20250301", "days": 1},
                {"start": "2025-03-01", "days": 8},
                {"start": "2025-03-01", "days": 1, "hours": [24]}, {"start": "2025-03-01", "days": 1, "hours": []}):
        with pytest.raises(ValueError):
            TimeGrid(**bad)


def test_only_a_model_with_a_timestamp_column_takes_a_grid():
    without = build_variants_contract(("followers",), (), max_caption_chars=50)
    with_time = build_variants_contract(("followers", "posted_at"), ("posted_at",), max_caption_chars=50)
    form, js = with_time.VariantsForm.model_json_schema(), with_time.VariantsJSON.model_json_schema()
    assert {"grid_start", "grid_days", "grid_hours"} <= set(form["properties"]) and "grid" in js["properties"]
    assert form["dependentRequired"]["grid_start"] == ["grid_days"]
    assert "null" not in str(form["properties"]["grid_days"])  # a form value is never null
    assert not {"grid", "grid_start"} & set(without.VariantsForm.model_json_schema()["properties"])
    assert "grid" not in without.VariantsJSON.model_json_schema()["properties"]


def test_caption_by_row_scores_are_explain_batchs_for_each_post(featured_model_dir):
    """The engine of the grid, on feature rows that vary what a time would: each caption x row as
    ``explain_batch`` scores that post alone, the contributions at row 0 and of the best pair exactly."""
    from data_preprocessing.posts import prepare_post
    from models.artifact import load_model

    lm = load_model(featured_model_dir)
    rows = [{"followers": 1200.0, "platform": "x"}, {"followers": 10.0, "platform": "tiktok"},
            {"followers": None, "platform": None}, {"followers": 90000.0, "platform": "x"}]
    raw = lambda row: {k: "" if v is None else str(v) for k, v in row.items()}  # noqa: E731
    posts = [prepare_post(IMAGE, c, raw(rows[0]), lm.prepare) for c in CAPTIONS]
    out = lm.explain_variants(posts, rows)
    alone = {(i, j): lm.explain_batch(lm.batcher([prepare_post(IMAGE, c, raw(row), lm.prepare)]))
             for i, c in enumerate(CAPTIONS) for j, row in enumerate(rows)}
    for (i, j), e in alone.items():
        assert float(out.grid.score[i * len(rows) + j]) == pytest.approx(float(e.score[0]), abs=TOL), (i, j)
    best = max(alone, key=lambda k: float(alone[k].score[0]))
    assert out.best == best
    for k, e in zip([(i, 0) for i in range(len(CAPTIONS))] + [best], out.explained):
        assert torch.allclose(e.contributions, alone[k].contributions, atol=TOL, rtol=0)


def test_the_grid_answer_names_every_time_and_the_best(featured_model_dir):
    """The server's grid path (Predictor.prepare_variants + run_variants), before timestamp columns
    exist: the categorical ``platform`` stands in for the time column. Its times are categories the
    model never saw, so each cell must score as /predict does with that value, and the best (the
    first of equals) must be named with its contributions."""
    from models.artifact import load_model
    from serving.contract import RawPost, RawVariants
    from serving.predictor import Predictor

    predictor = Predictor(load_model(featured_model_dir), max_pixels=40_000_000)
    grid = TimeGrid(start="2025-03-30", days=2, hours=[9, 21])
    raw = RawVariants(IMAGE, tuple(CAPTIONS[:2]), dict(ACCOUNT), grid, grid_column="platform")
    first = predictor.prepare(RawPost(IMAGE, CAPTIONS[0], dict(ACCOUNT)))
    answer = predictor.run_variants(predictor.prepare_variants(raw, first))
    assert (answer.grid.column, answer.grid.start, answer.grid.days, answer.grid.hours) == (
        "platform", "2025-03-30", 2, [9, 21])
    assert [(c.day, c.hour, c.time) for c in answer.grid.cells] == grid.times()
    for cell in answer.grid.cells:
        for i, p in enumerate(cell.predictions):
            post = predictor.prepare(RawPost(IMAGE, CAPTIONS[i], {**ACCOUNT, "platform": cell.time}))
            assert p.score == pytest.approx(predictor.run_batch([post])[0].score, abs=TOL)
    best = max(((i, c) for c in answer.grid.cells for i in range(2)), key=lambda ic: ic[1].predictions[ic[0]].score)
    assert (answer.best.index, answer.best.time) == (best[0], best[1].time)
    alone = lambda caption, account: predictor.run_batch(  # noqa: E731 - /predict's answer, in process
        [predictor.prepare(RawPost(IMAGE, caption, account))])[0].model_dump()
    assert_same_prediction(answer.best.prediction.model_dump(),
                           alone(CAPTIONS[best[0]], {**ACCOUNT, "platform": best[1].time}))
    # the cards stay at the time the request gave
    assert_same_prediction(answer.variants[1].model_dump(), alone(CAPTIONS[1], ACCOUNT))


@pytest.fixture(scope="module")
def timed_model_dir(tmp_path_factory):
    from tests.serving_fixtures import build_artifact

    return build_artifact(tmp_path_factory.mktemp("timed"), features=True, datetime_column="posted_at")


def test_a_post_with_a_timestamp_is_answered_and_a_bad_timestamp_is_invalid_feature(timed_model_dir):
    """/predict takes the timestamp column as the table does (ISO with an offset, or Unix seconds:
    the same instant scores the same), and a bad value is 422 invalid_feature naming the column."""
    with loopback(create_app(ServingSettings(model_dir=timed_model_dir))) as base, httpx.Client(
            base_url=base, timeout=60) as client:
        iso = predict(client, CAPTIONS[0], **{**ACCOUNT, "posted_at": "2025-03-05T23:30:00+0000"})
        unix = predict(client, CAPTIONS[0], **{**ACCOUNT, "posted_at": "1741217400"})
        assert iso["score"] == pytest.approx(unix["score"], abs=TOL)
        r = client.post("/predict", files={"image": ("p.jpg", IMAGE, "image/jpeg")},
                        data={"text": CAPTIONS[0], **ACCOUNT, "posted_at": "next tuesday"})
        assert (r.status_code, r.json()["reason"]) == (422, "invalid_feature")
        assert "posted_at" in r.json()["detail"]
        meta = client.get("/metadata").json()["model"]["features"]
        column = next(f["column"] for f in meta if f["column"]["name"] == "posted_at")
        assert (column["kind"], column["timezone"]) == ("datetime", "UTC")


def test_a_week_grid_answers_every_caption_at_every_hour_as_predict_does(timed_model_dir):
    with loopback(create_app(ServingSettings(model_dir=timed_model_dir))) as base, httpx.Client(
            base_url=base, timeout=60) as client:
        account = {**ACCOUNT, "posted_at": "2025-03-05T19:00"}
        r = variants(client, CAPTIONS[:2], **account, grid_start="2025-03-10", grid_days="7")
        assert r.status_code == 200, r.text
        grid = r.json()["grid"]
        assert (grid["column"], len(grid["cells"]), grid["cells"][-1]["time"]) == ("posted_at", 168, "2025-03-16T23:00")
        for cell in grid["cells"][::23]:
            for i, p in enumerate(cell["predictions"]):
                want = predict(client, CAPTIONS[i], **{**account, "posted_at": cell["time"]})
                assert p["score"] == pytest.approx(want["score"], abs=TOL)
        best = r.json()["best"]
        assert_same_prediction(best["prediction"], predict(client, CAPTIONS[best["index"]],
                                                           **{**account, "posted_at": best["time"]}))


# --- the pages as sent ---------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_data(self, data):
        self.inline_script |= self._in_script and bool(data.strip())

    def handle_endtag(self, tag):
        self._in_script = False


def test_the_page_loads_only_its_own_files_under_a_strict_policy(server):
    client, _ = server
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["style-src"] == "'self'"
    page = _Tags()
    page.feed(r.text)
    assert not page.inline_script and not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    urls = [a.get("src") or a.get("href") for t, a in page.tags if t in ("script", "link", "img") and
            (a.get("src") or a.get("href"))]
    assert sorted(urls) == ["/playground.css", "/playground.js"]
    for url in urls:
        assert client.get(url).status_code == 200
    assert "innerHTML" not in (STATIC / "playground.js").read_text()
    assert not {"/", "/docs", "/playground.js"} & set(client.get("/openapi.json").json()["paths"])


def test_docs_are_served_with_their_own_files(server):
    client, _ = server
    html = client.get("/docs").text
    page = _Tags()
    page.feed(html)
    urls = [u for t, a in page.tags if t in ("script", "link") and (u := a.get("src") or a.get("href"))]
    assert urls and all(u.startswith("/docs-assets/") for u in urls), urls
    for url in urls:
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url
    assert "cdn" not in html and "https://" not in html
