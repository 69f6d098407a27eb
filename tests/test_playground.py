"""The playground in a real browser: Debian's chromium driven by Playwright against a real uvicorn
on loopback serving the tests' tiny model (features: followers, platform). Every request to
another host is refused and recorded, and each test checks that none was made.

Without chromium these tests fail under CI=true (.ci/run installs it) and are skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serving_fixtures import jpeg_bytes

CAPTIONS = ["Sunset at the beach! #travel", "<img src=x onerror=alert(1)>", "so sad, worst day ever :("]
ACCOUNT = {"followers": "1200", "platform": "x"}


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright

        from docs.screenshot import launch
    except ImportError as e:  # playwright is in requirements-dev.txt
        pytest.fail(f"playwright is not installed: {e}")
    with sync_playwright() as p:
        try:
            browser = launch(p)
        except FileNotFoundError as e:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{e} (CI must run the browser tests)")
            pytest.skip(str(e))
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def base(featured_model_dir, tmp_path_factory):
    from serving.launch import run_server

    with run_server(featured_model_dir, log_path=tmp_path_factory.mktemp("uvicorn") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photo.jpg"
    path.write_bytes(jpeg_bytes(seed=7))
    return path


class Browsing:
    """A fresh browser context: its page, the requests it made, the ones refused, the dialogs."""

    def __init__(self, chromium, viewport=None):
        from docs.screenshot import loopback_only

        self.context = chromium.new_context(viewport=viewport or {"width": 1280, "height": 900})
        self.refused: list[str] = []
        self.requested: list[str] = []
        self.dialogs: list[str] = []
        loopback_only(self.context, self.refused)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def check_loopback_only(self) -> None:
        assert self.refused == [] and self.requested
        assert {urlsplit(u).hostname for u in self.requested if not u.startswith(("blob:", "data:"))} == {"127.0.0.1"}


@pytest.fixture
def browsing(chromium):
    b = Browsing(chromium)
    yield b
    b.context.close()


def predict(base: str, photo: Path, caption: str) -> dict:
    r = httpx.post(f"{base}/predict", files={"image": ("photo.jpg", photo.read_bytes(), "image/jpeg")},
                   data={"text": caption, **ACCOUNT}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def likes(x: float) -> str:
    return f"{round(x):,}"  # the page's Math.round(x).toLocaleString("en-US"); the tests' values are not .5


def cards(page) -> list[dict]:
    return page.eval_on_selector_all("#cards .card", """cards => cards.map(c => ({
        caption: c.querySelector('.caption-text').textContent,
        likes: c.querySelector('.likes-value').textContent,
        interval: c.querySelector('.interval').textContent,
        close: !!c.querySelector('.close-call'),
        bars: [...c.querySelectorAll('.bar')].map(b => parseFloat(b.style.width)),
        html: c.innerHTML}))""")


def score(browsing, base, photo, captions=CAPTIONS) -> None:
    from docs.screenshot import fill_form, score_with_enter

    browsing.page.goto(base + "/")
    fill_form(browsing.page, photo, captions, ACCOUNT)
    score_with_enter(browsing.page)


def test_three_variants_are_ranked_with_predicts_numbers_and_the_hostile_caption_stays_text(browsing, base, photo):
    score(browsing, base, photo)
    page = browsing.page
    want = sorted(((predict(base, photo, c), c) for c in CAPTIONS), key=lambda pc: -pc[0]["score"])
    got = cards(page)
    assert [c["caption"] for c in got] == [c for _, c in want]
    for card, (p, _) in zip(got, want):
        assert card["likes"] == likes(p["engagement"])
        assert card["interval"] == f"80% sure: {likes(p['interval']['low'])}–{likes(p['interval']['high'])} likes"
    # One scale for every card: the largest contribution of all is half the track, the others in proportion.
    largest = max(abs(v) for p, _ in want for v in p["contributions"].values())
    for card, (p, _) in zip(got, want):
        expected = [50 * abs(v) / largest for v in p["contributions"].values()]
        assert card["bars"] == pytest.approx(expected, abs=1e-3)  # CSS keeps a few decimals of a width
    # "too close to call": intervals overlapping by more than half the narrower one, as the page says.
    iv = [p["interval"] for p, _ in want]
    close = [any(min(a["high"], b["high"]) - max(a["low"], b["low"]) > 0.5 * min(a["high"] - a["low"],
                                                                                  b["high"] - b["low"])
                 for j, b in enumerate(iv) if j != i) for i, a in enumerate(iv)]
    assert [c["close"] for c in got] == close
    # Every input has a label (its own <label for>, or an aria-label where a visible one would repeat).
    unlabelled = page.eval_on_selector_all("input, select, button", """els => els.filter(e =>
        !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.outerHTML)""")
    assert unlabelled == []
    # The hostile caption is text: no element came of it, no script ran, no dialog opened.
    assert page.locator("#cards img").count() == 0 and browsing.dialogs == []
    assert "&lt;img src=x onerror=alert(1)&gt;" in next(c["html"] for c in got if c["caption"] == CAPTIONS[1])
    browsing.check_loopback_only()


def test_a_text_file_as_the_image_shows_the_servers_reason_next_to_the_image(browsing, base, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    score_page = browsing.page
    from docs.screenshot import fill_form

    score_page.goto(base + "/")
    fill_form(score_page, notes, CAPTIONS[:1], ACCOUNT)
    score_page.press("#caption-1", "Enter")
    error = score_page.locator("#image-error")
    error.wait_for(state="visible")
    server = httpx.post(f"{base}/predict/variants", files={"image": ("notes.txt", b"not an image", "text/plain")},
                        data={"captions": CAPTIONS[:1], **ACCOUNT}).json()
    assert error.text_content() == f"{server['reason']}: {server['detail']}"
    assert server["reason"] == "unsupported_format"
    assert score_page.locator("#results").is_hidden()
    browsing.check_loopback_only()


def test_a_bad_account_field_shows_the_reason_next_to_that_field(browsing, base, photo):
    from docs.screenshot import fill_form

    page = browsing.page
    page.goto(base + "/")
    fill_form(page, photo, CAPTIONS[:1], {"followers": "-5", "platform": "x"})
    page.press("#caption-1", "Enter")
    error = page.locator("#field-followers-error")
    error.wait_for(state="visible")
    assert error.text_content().startswith("invalid_feature: followers: -5 is outside the allowed range")
    browsing.check_loopback_only()


def test_scoring_with_the_keyboard_alone(browsing, base, photo):
    page = browsing.page
    page.goto(base + "/")
    page.wait_for_selector("#field-platform")
    order = []
    for _ in range(9):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent"))
    assert order == ["image-input", "caption-1", "Remove", "caption-2", "Remove", "add-caption", "field-followers",
                     "field-platform", "score"]
    page.reload()
    page.wait_for_selector("#field-platform")
    page.keyboard.press("Tab")  # the file picker, opened with the space bar
    assert page.evaluate("document.activeElement.id") == "image-input"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(photo))
    page.keyboard.press("Tab")
    page.keyboard.type(CAPTIONS[0])
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.type("new post")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # "Add a variant": a third field, focused
    page.keyboard.type("third try")
    for _ in range(3):  # past its Remove and "Add a variant" to followers
        page.keyboard.press("Tab")
    page.keyboard.type(ACCOUNT["followers"])
    page.keyboard.press("Enter")  # Enter scores
    page.wait_for_selector("#results:not([hidden]) .card")
    assert sorted(c["caption"] for c in cards(page)) == sorted([CAPTIONS[0], "new post", "third try"])
    browsing.check_loopback_only()


def test_a_phone_wide_page_fits_its_screen(chromium, base, photo):
    phone = Browsing(chromium, viewport={"width": 375, "height": 812})
    try:
        score(phone, base, photo)
        page = phone.page
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for selector in ("#image-input", "#caption-1", "#field-followers", "#score", "#cards .card"):
            box = page.locator(selector).first.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        phone.check_loopback_only()
    finally:
        phone.context.close()


def test_docs_render_offline(browsing, base):
    page = browsing.page
    page.goto(base + "/docs")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.getAttribute('data-path'))")
    assert {"/predict", "/predict/variants", "/predict/variants/json", "/metadata"} <= set(paths)
    assert page.locator(".swagger-ui .info .title").text_content().startswith("Engagement prediction")
    browsing.check_loopback_only()


def test_the_week_heatmap_of_a_model_with_a_timestamp_column(chromium, tmp_path_factory, photo):
    from docs.screenshot import fill_form, score_with_enter
    from serving.launch import run_server
    from tests.serving_fixtures import build_artifact

    model_dir = build_artifact(tmp_path_factory.mktemp("timed"), features=True, datetime_column="posted_at")
    b = Browsing(chromium)
    try:
        with run_server(model_dir) as url:
            b.page.goto(url + "/")
            fill_form(b.page, photo, CAPTIONS[:2], ACCOUNT)
            score_with_enter(b.page)
            b.page.wait_for_selector("#best-time:not([hidden]) #heatmap td")
            assert b.page.locator("#heatmap tbody tr").count() == 7
            assert b.page.locator("#heatmap tbody td").count() == 7 * 24
            assert b.page.locator("#heatmap td.top").count() == 3
            assert b.page.locator("#best-slots").text_content().startswith("Best times: ")
        b.check_loopback_only()
    finally:
        b.context.close()
