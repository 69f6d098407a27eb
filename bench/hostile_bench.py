"""Benchmark 6: what small hostile requests cost a real server (issue 28), against its goals.

``serving.launch.run_server`` serves the tiny-CLIP artifact on loopback at its default settings, a fresh server per
image step, one at a time. (1) A W x 2 RGB PNG (208 bytes at 20000 wide): seconds to its answer and the server's RSS
growth (the peak, VmHWM, over VmRSS before), plus the latency of a normal request sent 0.5 s after it. (2) The worst
caption within MAX_CAPTION_CHARS among hostile shapes (emoji, emoji with words, repeated negations, one long word,
"!!!" runs): ms of ``prepare_post`` on it with a 16x16 PNG (cleaning and sentiment, wherever a cap lives; the image
costs well under a millisecond), median of the runs. (3) The server's peak RSS while N concurrent clients upload a
16-bit greyscale PNG of M megapixels (a smooth gradient: about 90 KB at 40 MP), how many got 200 or 503, and the p50
of normal requests (a 640x480 JPEG) sent one at a time alongside, against the same idle. RSS is the kernel's count
for the uvicorn process (/proc/PID/status), its peak reset through /proc/PID/clear_refs before each step. Every
request has a client deadline and every wait a bound: a server that stalls or dies is reported, not waited on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import PHOTO_SIZE, BenchConfig, artifact, goal, start, table, timed, work_dir, write_result
from common.config import field
from serving.launch import run_server
from serving.settings import DEFAULT_SETTINGS

log = logging.getLogger(__name__)

QUIET = ("--log-level", "warning", "--no-access-log")
CAPTION = "Golden hour at the beach with friends, best weekend of the summer! travel sunset friends"
RUN_BUDGET_S = 2.0  # a caption shape stops repeating once its runs took this long: one run is far over the goal


@dataclass
class HostileBenchConfig(BenchConfig):
    preset: str = field("tiny", help="CLIP shape of the served model", choices=("tiny", "b32"))
    strip_width: int = field(20_000, help="width of the W x 2 PNG (a 224 px shortest edge makes it 224 x 112 W)")
    caption_chars: int = field(DEFAULT_SETTINGS.max_caption_chars,
                               help="length of the hostile captions (default: the server's MAX_CAPTION_CHARS)")
    caption_repeats: int = field(3, help="timed runs per caption shape (median), fewer past 2 s of runs")
    uploads: int = field(16, help="concurrent uploads of the 16-bit PNG")
    megapixels: float = field(40.0, help="size of the 16-bit PNG (4:3), megapixels")
    timeout_s: float = field(120.0, help="client deadline of every request; past it the request counts as timed out")

    def __post_init__(self):
        if self.smoke:
            self.strip_width, self.caption_chars, self.caption_repeats = 400, 220, 1
            self.uploads, self.megapixels, self.timeout_s = 4, 1.0, 30.0
        if min(self.strip_width, self.caption_chars, self.caption_repeats, self.uploads) < 1 or self.megapixels <= 0:
            raise ValueError("every size and count must be positive")


# --- inputs ---------------------------------------------------------------------------------


def png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def strip_png(width: int) -> bytes:
    """A width x 2 RGB PNG of one colour: 208 bytes at 20000 wide, a 224 x 2,240,000 image once resized."""
    from PIL import Image

    return png(Image.new("RGB", (width, 2), (120, 80, 40)))


def grey16_png(megapixels: float) -> bytes:
    """A 16-bit greyscale PNG (mode I;16), 4:3, a horizontal ramp: every row is the same, so it
    compresses to about 90 KB at 40 MP."""
    from PIL import Image

    h = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    w = int(megapixels * 1e6 / h)
    ramp = (np.arange(w, dtype=np.uint32) * 65535 // max(w - 1, 1)).astype(np.uint16)
    return png(Image.fromarray(np.broadcast_to(ramp, (h, w)).copy()))


@functools.lru_cache(maxsize=1)
def photo_jpeg() -> bytes:
    """A normal upload: a 640x480 JPEG, gradients plus noise."""
    from PIL import Image

    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 90.0)], axis=-1)
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def hostile_captions(n: int) -> dict[str, str]:
    """Caption shapes that are slow for cleaning or VADER, each at most ``n`` characters."""
    def fill(unit: str) -> str:
        return (unit * (n // len(unit) + 1))[:n]

    return {"emoji 😸": "😸" * n, "emoji between words": fill("so cute 😸 "), "negations 'no '": "no " * (n // 3),
            "one word": "a" * n, "'!!!' runs": fill("great!!! ")}


# --- the server process and its requests --------------------------------------------------


def server_pid(url: str) -> int:
    """The uvicorn process that ``run_server`` started for ``url`` (a child of this process)."""
    import psutil

    port = url.rsplit(":", 1)[1]
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if "uvicorn" in cmd and port in cmd:
                return p.pid
    raise RuntimeError(f"no uvicorn child process serves {url}")


def memory_mib(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM (the kernel's peak RSS) of ``pid`` in MiB; None once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")}
    return {k: round(v / 1024, 1) for k, v in kib.items()} if len(kib) == 2 else None


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS now (Linux: "5" to clear_refs), so the next peak is this step's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def send(client: httpx.Client, url: str, image: bytes, text: str, name: str, mime: str) -> dict:
    """One POST /predict: its status (or the client error's name, e.g. ReadTimeout), reason and seconds."""
    t0 = time.perf_counter()
    try:
        r = client.post(url + "/predict", files={"image": (name, image, mime)}, data={"text": text})
        status = r.status_code
        reason = r.json().get("reason") if r.headers.get("content-type", "").startswith("application/json") else None
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        status, reason = type(e).__name__, None
    return {"status": status, "reason": reason, "s": round(time.perf_counter() - t0, 4)}


def normal(client: httpx.Client, url: str) -> dict:
    return send(client, url, photo_jpeg(), CAPTION, "photo.jpg", "image/jpeg")


def counts(status: dict[str, int]) -> str:
    """{"200": 4, "504": 12} -> "4 x 200, 12 x 504"."""
    return ", ".join(f"{n} x {code}" for code, n in status.items()) or "none"


def p50_ms(answers: list[dict]) -> float | None:
    ok = [a["s"] for a in answers if a["status"] == 200]
    return round(statistics.median(ok) * 1000, 1) if ok else None


# --- the three steps -----------------------------------------------------------------------


def refuse_strip(cfg: HostileBenchConfig, url: str) -> dict:
    """(1) The W x 2 PNG: its answer and seconds, the server's RSS growth, and a normal request 0.5 s behind it."""
    pid, image = server_pid(url), strip_png(cfg.strip_width)
    with httpx.Client(timeout=cfg.timeout_s) as client:
        normal(client, url)  # the first request pays one-off costs
        before = memory_mib(pid)
        reset_peak(pid)
        with ThreadPoolExecutor(1) as pool:
            hostile = pool.submit(send, client, url, image, "a sunset", "strip.png", "image/png")
            time.sleep(0.5)
            behind = normal(client, url)
            answer = hostile.result()
    after = memory_mib(pid)
    peak = after["VmHWM"] if after else None
    log.info("%dx2 PNG (%d bytes): %s in %.2f s, RSS %s -> peak %s MiB; normal request behind it %.2f s",
             cfg.strip_width, len(image), answer["status"], answer["s"], before["VmRSS"], peak, behind["s"])
    return {"size": [cfg.strip_width, 2], "bytes": len(image), "answer": answer, "rss_before_mib": before["VmRSS"],
            "peak_mib": peak, "growth_mib": None if peak is None else round(peak - before["VmRSS"], 1),
            "normal_behind": behind}


def caption_costs(cfg: HostileBenchConfig, model_dir: Path) -> dict:
    """(2) ms of ``prepare_post`` per hostile caption shape, with a 16x16 PNG, the artifact's PrepareConfig."""
    from PIL import Image

    from data_preprocessing.posts import PrepareConfig, prepare_post
    from models.artifact import read_config

    prep = PrepareConfig.from_dict(read_config(model_dir)["prepare"])
    image = png(Image.new("RGB", (16, 16), (200, 120, 60)))
    prepare = lambda text: prepare_post(image, text, {}, prep)  # noqa: E731
    prepare(CAPTION)  # loads VADER's lexicon once
    out = {}
    for name, text in {"normal caption": CAPTION, **hostile_captions(cfg.caption_chars)}.items():
        ms = []
        while len(ms) < cfg.caption_repeats and sum(ms) < RUN_BUDGET_S * 1000:
            ms.append(round(timed(lambda: prepare(text)) * 1000, 2))
        out[name] = {"chars": len(text), "ms": round(statistics.median(ms), 2), "ms_values": ms}
        log.info("caption %s (%d chars): %s ms", name, len(text), ms)
    return out


def upload_burst(cfg: HostileBenchConfig, url: str) -> dict:
    """(3) ``uploads`` concurrent 16-bit PNGs: the answers, the server's peak RSS, normal requests alongside."""
    pid, image = server_pid(url), grey16_png(cfg.megapixels)
    limits = httpx.Limits(max_connections=cfg.uploads)
    with httpx.Client(timeout=cfg.timeout_s) as client, httpx.Client(timeout=cfg.timeout_s, limits=limits) as burst:
        idle = [normal(client, url) for _ in range(6)][1:]  # the first pays one-off costs
        before = memory_mib(pid)
        reset_peak(pid)
        t0, alongside = time.perf_counter(), []
        with ThreadPoolExecutor(cfg.uploads) as pool:
            futures = [pool.submit(send, burst, url, image, "a gradient", "grey16.png", "image/png")
                       for _ in range(cfg.uploads)]
            while not all(f.done() for f in futures):  # each upload ends by its deadline, so this loop does too
                alongside.append(normal(client, url))
                if alongside[-1]["status"] != 200:
                    time.sleep(0.1)  # a refused or failed request comes back at once: no busy loop
            answers = [f.result() for f in futures]
        seconds = round(time.perf_counter() - t0, 2)
        after = normal(client, url)  # the server answers again (or its deadline passes): the work is over
    peak = (memory_mib(pid) or {}).get("VmHWM")
    status = Counter(str(a["status"]) for a in answers)
    log.info("%d uploads of a %.0f MP 16-bit PNG (%d bytes): %s in %.1f s, RSS %s -> peak %s MiB; normal p50 %s "
             "ms idle, %s ms alongside (%d)", cfg.uploads, cfg.megapixels, len(image), dict(status), seconds,
             before["VmRSS"], peak, p50_ms(idle), p50_ms(alongside), len(alongside))
    return {"uploads": cfg.uploads, "megapixels": cfg.megapixels, "bytes": len(image), "seconds": seconds,
            "status": dict(sorted(status.items())), "upload_s": [a["s"] for a in answers],
            "rss_before_mib": before["VmRSS"], "peak_mib": peak, "normal_idle_p50_ms": p50_ms(idle),
            "normal_alongside_p50_ms": p50_ms(alongside), "normal_alongside": len(alongside),
            "normal_alongside_status": dict(Counter(str(a["status"]) for a in alongside)), "normal_after": after}


# --- report --------------------------------------------------------------------------------


def goals(strip: dict, captions: dict, burst: dict) -> list[dict]:
    w = strip["size"][0]
    hostile = {k: v for k, v in captions.items() if k != "normal caption"}
    worst = max(hostile, key=lambda k: hostile[k]["ms"])
    answer = f"answered {strip['answer']['status']} {strip['answer']['reason'] or ''}".rstrip()
    return [
        goal(f"a {strip['bytes']}-byte {w}x2 PNG (to be refused): seconds to its answer", strip["answer"]["s"],
             "<=", 0.1, "s", answer),
        goal(f"a {strip['bytes']}-byte {w}x2 PNG (to be refused): server RSS growth (peak - before)",
             strip["growth_mib"], "<=", 50, "MiB", answer),
        goal(f"preparing the worst caption of {hostile[worst]['chars']} characters (MAX_CAPTION_CHARS: "
             f"{DEFAULT_SETTINGS.max_caption_chars})", hostile[worst]["ms"], "<=", 50, "ms", worst),
        goal(f"peak server RSS during {burst['uploads']} concurrent uploads of a {burst['megapixels']:g} MP 16-bit PNG",
             None if burst["peak_mib"] is None else round(burst["peak_mib"] / 1024, 3), "<=", 1.5, "GiB",
             f"answers: {counts(burst['status'])}")]


def tables(strip: dict, captions: dict, burst: dict) -> list[dict]:
    a, behind = strip["answer"], strip["normal_behind"]
    return [
        table(["image", "bytes", "answer", "seconds", "RSS before, MiB", "peak, MiB", "growth, MiB",
               "normal request sent 0.5 s later: answer, s"],
              [[f"{strip['size'][0]}x2 RGB PNG", strip["bytes"], f"{a['status']} {a['reason'] or ''}".strip(),
                a["s"], strip["rss_before_mib"], strip["peak_mib"], strip["growth_mib"],
                f"{behind['status']}, {behind['s']:.2f}"]]),
        table(["caption", "characters", "prepare_post, ms (median)", "runs, ms"],
              [[k, v["chars"], v["ms"], v["ms_values"]] for k, v in captions.items()],
              "prepare_post with a 16x16 PNG: cleaning and VADER on the caption; a shape stops repeating after 2 s."),
        table(["uploads", "image", "bytes", "answers", "seconds", "RSS before, MiB", "peak, MiB",
               "normal p50 idle, ms", "normal p50 alongside, ms", "normal requests alongside"],
              [[burst["uploads"], f"{burst['megapixels']:g} MP 16-bit grey PNG", burst["bytes"],
                counts(burst["status"]), burst["seconds"],
                burst["rss_before_mib"], burst["peak_mib"], burst["normal_idle_p50_ms"],
                burst["normal_alongside_p50_ms"], burst["normal_alongside"]]],
              f"Normal requests alongside: {counts(burst['normal_alongside_status'])}; one sent after the burst: "
              f"{burst['normal_after']['status']} in {burst['normal_after']['s']:.2f} s. Servers at default settings.")]


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; the served artifact (cached with the serving benchmark's).
    cfg, t_start = start(HostileBenchConfig, argv, __doc__)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    model_dir = artifact(cfg.out_dir, cfg.preset)
    logs = work_dir(cfg.out_dir, "hostile")

    # 2. Captions, in this process, while no server competes for the cores.
    captions = caption_costs(cfg, model_dir)

    # 3. A fresh server per step, the first stopped before the second starts: a server can go on working
    # after its answers (a 504 leaves the resize running) and keeps what it allocated.
    with run_server(model_dir, log_path=logs / "strip.log", uvicorn_args=QUIET) as url:
        strip = refuse_strip(cfg, url)
    with run_server(model_dir, log_path=logs / "burst.log", uvicorn_args=QUIET) as url:
        burst = upload_burst(cfg, url)

    # 4. Figures, goals and the section's tables.
    payload = {"preset": cfg.preset, "strip": strip, "captions": captions, "burst": burst,
               "goals": goals(strip, captions, burst), "tables": tables(strip, captions, burst)}
    write_result("hostile", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
