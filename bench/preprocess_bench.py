"""Benchmark 3: preprocessing throughput, memory flatness and record size.

    python bench/preprocess_bench.py            # full (about 2 minutes on 2 cores)
    python bench/preprocess_bench.py --smoke    # seconds; no timing is meaningful

Measures ``data_preprocessing/preprocess.py`` as a user runs it (a subprocess per run):

1. posts/s with ``--workers 1`` and ``--workers 2`` on 640x480 JPEGs, medians over
   interleaved repeats (goal: 2 workers >= 1.6x one worker);
2. peak memory at 2,000 and 20,000 posts (goal: <= 1.3x). Rows reuse a pool of a few
   hundred images under distinct captions, so no 20k images need generating; the image
   decode/resize/pickle work per row is the same as with distinct files;
3. pickle bytes per post with pre-resizing (shortest edge 224) and without (full size).

Writes ``bench/out/preprocess.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

IMAGE_SIZE = (640, 480)  # (W, H) of the pool's JPEGs: a typical downscaled phone upload
JPEG_QUALITY = 90


@dataclass
class PreprocessBenchConfig:
    """Benchmark preprocess.py: posts/s at 1 and 2 workers, peak RSS vs size, bytes/post."""

    out_dir: str = field(str(Path(__file__).resolve().parent / "out"), help="where preprocess.json and work files go")
    smoke: bool = field(False, help="tiny sizes, one repeat: checks the script runs, numbers mean nothing")
    repeats: int = field(3, help="interleaved repeats of the 1- and 2-worker runs (median reported)")
    throughput_posts: int = field(1000, help="rows in the throughput table")
    pool_images: int = field(200, help="distinct 640x480 JPEGs that the tables' rows reuse")
    rss_small: int = field(2000, help="rows of the smaller memory run")
    rss_large: int = field(20000, help="rows of the larger memory run")
    rss_workers: int = field(2, help="--workers of the memory runs")
    bytes_posts: int = field(200, help="rows of the bytes-per-post runs (resized and full size)")
    seed: int = field(0, help="seed for images, captions and labels")

    def __post_init__(self):
        if self.smoke:
            self.repeats, self.throughput_posts, self.pool_images = 1, 24, 8
            self.rss_small, self.rss_large, self.bytes_posts = 24, 96, 12
        if self.repeats < 1 or min(self.throughput_posts, self.pool_images, self.rss_small, self.bytes_posts) < 1:
            raise ValueError("--repeats and all sizes must be >= 1")
        if self.rss_large <= self.rss_small:
            raise ValueError("--rss-large must be larger than --rss-small")


def make_image_pool(root: Path, n: int, seed: int) -> list[str]:
    """``n`` 640x480 JPEGs drawn by the demo generator's painters (cached); relative paths."""
    import numpy as np
    from PIL import ImageOps

    from data_preprocessing.make_demo_data import TOPICS, render_image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rel = f"images/{i:05d}.jpg"
        paths.append(rel)
        if (root / rel).is_file():
            continue
        rng = np.random.default_rng([seed, i])
        topic = TOPICS[i % len(TOPICS)]
        im = render_image(rng, topic, int(rng.integers(1, 6)), float(rng.random()), float(rng.random()))
        # Crop-and-scale to exactly 640x480 so every post costs the same to decode.
        ImageOps.fit(im, IMAGE_SIZE).save(root / rel, format="JPEG", quality=JPEG_QUALITY)
    return paths


def write_table(path: Path, image_paths: list[str], n_rows: int, seed: int) -> Path:
    """posts CSV of ``n_rows`` rows cycling over ``image_paths`` with distinct captions."""
    import numpy as np

    from data_preprocessing.make_demo_data import TOPICS, make_caption

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, str]] = set()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "description", "engagement"])
        for row in range(n_rows):
            image = image_paths[row % len(image_paths)]
            while True:  # preprocess rejects (image, caption) duplicates: keep every pair unique
                caption, _ = make_caption(rng, TOPICS[int(rng.integers(len(TOPICS)))])
                if (image, caption) not in seen:
                    seen.add((image, caption))
                    break
            w.writerow([image, caption, int(rng.lognormal(4.0, 1.2))])
    tmp.replace(path)
    return path


def run_preprocess(table: Path, out: Path, workers: int, resize: int, logs: Path, subprocess: bool = True) -> dict:
    """One preprocess.py run plus the meta.json it wrote.

    ``subprocess=True`` runs it as a user does, in its own process, and adds wall time and
    peak memory; ``False`` calls ``preprocess.main`` here (smoke mode: saves ~3 s of
    imports per run; posts/s comes from meta.json's timing either way).
    """
    from bench.benchlib import python_cmd, run_measured

    args = ["--input", table, "--out", out, "--workers", workers, "--resize-shortest-edge", resize, "--no-progress"]
    if subprocess:
        res = run_measured(python_cmd("data_preprocessing/preprocess.py", *args), logs / f"{out.name}.log")
    else:
        from data_preprocessing import preprocess

        t0 = time.perf_counter()
        preprocess.main([str(a) for a in args])
        res = {"wall_s": round(time.perf_counter() - t0, 3)}
    meta = json.loads((out / "meta.json").read_text())
    kept = meta["counts"]["kept"]
    res.update(kept=kept, posts_per_s=meta["timing"]["posts_per_s"], process_s=meta["timing"]["process_s"],
               record_bytes=meta["record_format"]["bytes"], bytes_per_post=round(meta["record_format"]["bytes"] / kept))
    return res


def main(argv: list[str] | None = None) -> dict:
    from bench.benchlib import goal, ratio, repeat_interleaved, summarize, work_dir, write_result

    # 1. Parse args.
    cfg = parse_config(PreprocessBenchConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    root = work_dir(cfg.out_dir) / f"preprocess-pool{cfg.pool_images}-s{cfg.seed}"
    logs = root / "logs"

    # 2. Inputs: the image pool and one table per size (cached between runs).
    pool = make_image_pool(root, cfg.pool_images, cfg.seed)
    table = lambda n: write_table(root / f"posts-{n}.csv", pool, n, cfg.seed)  # noqa: E731

    # 3. Throughput, 1 vs 2 workers, interleaved so drift hits both alike.
    tp_table = table(cfg.throughput_posts)
    runs: dict[str, list[dict]] = {"workers_1": [], "workers_2": []}

    def tp(workers: int):
        def once() -> float:
            res = run_preprocess(tp_table, root / f"out-tp-w{workers}", workers, 224, logs, not cfg.smoke)
            runs[f"workers_{workers}"].append(res)
            return res["posts_per_s"]
        return once

    pps = repeat_interleaved({"workers_1": tp(1), "workers_2": tp(2)}, cfg.repeats)
    throughput = {k: summarize(v, 2) for k, v in pps.items()}
    speedup = ratio(throughput["workers_2"]["median"], throughput["workers_1"]["median"])
    log.info("posts/s: 1 worker %s, 2 workers %s, speedup %s", throughput["workers_1"]["median"],
             throughput["workers_2"]["median"], speedup)

    # 4. Peak memory at two sizes (same pool, same workers), always in a subprocess.
    mem = {}
    for label, n in (("small", cfg.rss_small), ("large", cfg.rss_large)):
        res = run_preprocess(table(n), root / f"out-rss-{n}", cfg.rss_workers, 224, logs)
        mem[label] = {"posts": n, **res}
        log.info("%d posts: peak tree RSS %.1f MiB, max single-process RSS %.1f MiB, %.1f s", n,
                 res["peak_tree_rss_mib"], res["maxrss_mib"], res["wall_s"])
    rss_ratio = ratio(mem["large"]["peak_tree_rss_mib"], mem["small"]["peak_tree_rss_mib"])

    # 5. Bytes per post with and without pre-resizing.
    bytes_table = table(cfg.bytes_posts)
    sizes = {}
    for label, resize in (("resized_224", 224), ("full_size", 0)):
        res = run_preprocess(bytes_table, root / f"out-bytes-{resize}", 2, resize, logs, not cfg.smoke)
        sizes[label] = {"shortest_edge": resize, "bytes_per_post": res["bytes_per_post"], "posts": res["kept"],
                        "posts_per_s": res["posts_per_s"]}
    shrink = ratio(sizes["full_size"]["bytes_per_post"], sizes["resized_224"]["bytes_per_post"], 2)

    # 6. Goals and the result file.
    payload = {
        "image_size": list(IMAGE_SIZE),
        "throughput": {"posts": cfg.throughput_posts, "posts_per_s": throughput, "speedup_2_vs_1": speedup,
                       "runs": runs},
        "memory": {**mem, "ratio_large_vs_small": rss_ratio,
                   "ratio_maxrss_large_vs_small": ratio(mem["large"]["maxrss_mib"], mem["small"]["maxrss_mib"])},
        "record_bytes": {**sizes, "full_over_resized": shrink},
        "goals": [
            goal("preprocess speedup, 2 workers vs 1", speedup, ">=", 1.6, "x"),
            goal(f"peak RSS, {cfg.rss_large:,} vs {cfg.rss_small:,} posts", rss_ratio, "<=", 1.3, "x"),
        ],
    }
    write_result(cfg.out_dir, "preprocess", payload, smoke=cfg.smoke, t_start=t_start, config=config_dict(cfg))
    return payload


if __name__ == "__main__":
    main()
