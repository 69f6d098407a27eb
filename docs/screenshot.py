"""Screenshots of the playground scoring a model: docs/playground.png (desktop) and
docs/playground-phone.png (375 px wide).

    python docs/screenshot.py --model runs/demo/run/model --image runs/demo/posts/images/000000.jpg

Starts the server as users do (``serving.launch.run_server``), opens its page in Debian's
chromium through Playwright (``apt-get install chromium``; never ``playwright install``, which
downloads a browser of its own), uploads the photo, types the caption variants and the account
fields, scores them with Enter and saves the page. Requests to any host but 127.0.0.1 are refused.
The browser tests (tests/test_playground.py) drive the page with the same helpers.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as `python docs/screenshot.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import REPO_ROOT, config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"  # Debian's package
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
CAPTIONS = ("Golden hour at the beach with friends, best weekend of the summer! #travel #sunset",
            "new post", "Sunset at the beach. Who else loves this view? #travel")


def launch(playwright):
    """Debian's chromium, headless, without the background traffic it would start on its own."""
    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))


def loopback_only(context, refused: list[str]) -> None:
    """Refuse every request of ``context`` to a host other than 127.0.0.1; ``refused`` lists them."""
    def route(r) -> None:
        if urlsplit(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    context.route("**/*", route)


def fill_form(page, image: str | os.PathLike, captions, account: dict[str, str]) -> None:
    """The image, the captions (adding variant fields as needed) and the account fields the model has."""
    page.wait_for_selector("#model-info:not(:has-text('Loading'))")
    page.set_input_files("#image-input", str(image))
    while page.locator("#captions input").count() < len(captions):
        page.click("#add-caption")
    for i, text in enumerate(captions):
        page.fill(f"#caption-{i + 1}", text)
    for name, value in account.items():
        field = page.locator(f"#field-{name}")
        if not field.count():
            continue
        if field.evaluate("e => e.tagName") == "SELECT":  # a category the model never saw is "other"
            options = field.evaluate("e => [...e.options].map(o => o.value)")
            field.select_option(value if value in options else "")
        else:
            field.fill(value)


def score_with_enter(page, caption_index: int = 1) -> None:
    """Press Enter in a caption field, as a person does, and wait for the ranked cards."""
    page.press(f"#caption-{caption_index}", "Enter")
    page.wait_for_selector("#results:not([hidden]) .card")


@dataclass
class ScreenshotConfig:
    """Screenshots of the playground scoring a model (docs/playground.png)."""

    model: str = field(help="model artifact directory (RUN_DIR/model)")
    image: str | None = field(None, help="the post's photo (default: a drawn sunset)")
    account: str = field("followers=12000,platform=instagram", help="NAME=VALUE,... for the model's account fields")
    out_dir: str = field(str(REPO_ROOT / "docs"), help="where playground.png and playground-phone.png go")


def drawn_photo(path: Path) -> Path:
    """A sunset drawn with PIL, for a run without a photo of its own."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640] / np.array([480.0, 640.0]).reshape(2, 1, 1)
    sky = np.stack([255 - 60 * y, 150 - 90 * y + 40 * x, 90 + 120 * y], axis=-1)
    sea = np.stack([40 + 0 * y, 90 + 40 * y, 150 + 60 * y], axis=-1)
    sun = ((x - 0.5) ** 2 + ((y - 0.55) * 0.75) ** 2) < 0.01
    arr = np.where((y > 0.6)[..., None], sea, sky)
    arr[sun] = (255, 220, 120)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    # 1. Parse args; the photo.
    cfg = parse_config(ScreenshotConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    from playwright.sync_api import sync_playwright

    from serving.launch import run_server

    tmp = Path(tempfile.mkdtemp(prefix="screenshot-"))
    image = Path(cfg.image) if cfg.image else drawn_photo(tmp / "sunset.jpg")
    account = dict(kv.split("=", 1) for kv in cfg.account.split(",") if kv)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, refused = [], []
    # 2. The server, the browser; each width: fill, score with Enter, save the whole page.
    with run_server(cfg.model, log_path=tmp / "server.log") as base, sync_playwright() as p:
        browser = launch(p)
        for name, viewport in (("playground.png", DESKTOP), ("playground-phone.png", PHONE)):
            context = browser.new_context(viewport=viewport, device_scale_factor=1)
            loopback_only(context, refused)
            page = context.new_page()
            page.goto(base + "/")
            fill_form(page, image, CAPTIONS, account)
            score_with_enter(page)
            page.screenshot(path=str(out / name), full_page=True)
            written.append(out / name)
            context.close()
        browser.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if refused:
        raise RuntimeError(f"the page asked for other hosts: {refused}")
    log.info("wrote %s", ", ".join(map(str, written)))
    return written


if __name__ == "__main__":
    main()
