"""Benchmark 3: preprocess.py's throughput per worker, memory flatness and record size.

preprocess.py as a user runs it, a subprocess per run, on 640x480 JPEGs (a pool of demo images reused under distinct
captions): posts/s from its meta.json at 1 and 2 workers (goal >= 1.6x); peak RSS at 2,000 vs 20,000 posts (goal <=
1.3x; the process tree sampled every 20 ms, and the kernel's peak of the largest process); bytes per record
pre-resized to 224 px and at full size.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, goal, photo_table, ratio, repeat_interleaved, run_measured, start, table, \
    write_result
from common.config import field


@dataclass
class PreprocessBenchConfig(BenchConfig):
    repeats: int = field(3, help="interleaved repeats of the 1- and 2-worker runs (median reported)")
    throughput_posts: int = field(1000, help="rows of the throughput runs")
    pool_images: int = field(200, help="distinct 640x480 JPEGs that the rows reuse")
    rss_small: int = field(2000, help="rows of the smaller memory run")
    rss_large: int = field(20000, help="rows of the larger memory run")
    bytes_posts: int = field(200, help="rows of the bytes-per-post runs")

    def __post_init__(self):
        if self.smoke:
            self.repeats, self.throughput_posts, self.pool_images = 1, 24, 8
            self.rss_small, self.rss_large, self.bytes_posts = 24, 96, 12
        if min(self.repeats, self.throughput_posts, self.pool_images, self.rss_small, self.bytes_posts) < 1:
            raise ValueError("--repeats and all sizes must be >= 1")
        if self.rss_large <= self.rss_small:
            raise ValueError("--rss-large must be larger than --rss-small")


def run_preprocess(table: Path, workers: int, resize: int) -> dict:
    """One preprocess.py run as a subprocess: its wall time, peak memory, and what its meta.json says."""
    out = table.parent / f"out-{table.stem}-w{workers}-r{resize}"
    res = run_measured([sys.executable, "-m", "data_preprocessing.preprocess", "--input", table, "--out", out,
                        "--workers", workers, "--resize-shortest-edge", resize, "--no-progress"],
                       table.parent / "logs" / f"{out.name}.log")
    meta = json.loads((out / "meta.json").read_text())
    kept = meta["counts"]["kept"]
    return {**res, "posts": kept, "posts_per_s": meta["timing"]["posts_per_s"],
            "bytes_per_post": round(meta["record_format"]["bytes"] / kept)}


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; throughput at 1 and 2 workers, interleaved so drift hits both alike.
    cfg, t_start = start(PreprocessBenchConfig, argv, __doc__)
    rows = lambda n: photo_table(cfg.out_dir, cfg.pool_images, n)  # noqa: E731
    tp_table = rows(cfg.throughput_posts)
    throughput = repeat_interleaved({f"workers_{w}": lambda w=w: run_preprocess(tp_table, w, 224)[
        "posts_per_s"] for w in (1, 2)}, cfg.repeats, 2)
    speedup = ratio(throughput["workers_2"]["median"], throughput["workers_1"]["median"])

    # 2. Peak memory at two sizes, 2 workers; 3. bytes per post, pre-resized and full size.
    mem = {label: run_preprocess(rows(n), 2, 224) for label, n in (("small", cfg.rss_small), ("large", cfg.rss_large))}
    rss_ratio = ratio(mem["large"]["peak_tree_rss_mib"], mem["small"]["peak_tree_rss_mib"])
    sizes = {label: run_preprocess(rows(cfg.bytes_posts), 2, edge) for label, edge in
             (("resized_224", 224), ("full_size", 0))}
    bytes_ratio = ratio(sizes["full_size"]["bytes_per_post"], sizes["resized_224"]["bytes_per_post"], 2)
    tp = [[w, throughput[f"workers_{w}"]["median"], throughput[f"workers_{w}"]["values"]] for w in (1, 2)]
    payload = {"throughput": throughput, "memory": mem, "record_bytes": {**sizes, "full_over_resized": bytes_ratio},
               "goals": [goal("preprocess speedup, 2 workers vs 1", speedup, ">=", 1.6, "x"),
                         goal(f"peak RSS, {cfg.rss_large:,} vs {cfg.rss_small:,} posts", rss_ratio, "<=", 1.3, "x")],
               "tables": [
                   table(["workers", "posts/s (median)", "repeats"], tp,
                         f"Speedup 2 vs 1 worker: **{speedup}x** on {cfg.throughput_posts:,} posts."),
                   table(["posts", "peak RSS, process tree (MiB)", "peak RSS, largest process (MiB)", "seconds"],
                         [[m["posts"], m["peak_tree_rss_mib"], m["maxrss_mib"], m["wall_s"]] for m in mem.values()]),
                   table(["records", "bytes/post"], [[k, v["bytes_per_post"]] for k, v in sizes.items()],
                         f"Full size / pre-resized: **{bytes_ratio}x** bytes per post.")]}
    write_result("preprocess", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
