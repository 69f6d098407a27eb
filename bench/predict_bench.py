"""Benchmark 4b: serving/predict.py scoring a table, against the raw forward.

    python bench/predict_bench.py            # tiny and ViT-B/32-shaped artifacts, about 3 minutes
    python bench/predict_bench.py --smoke    # tiny, one batch: checks the script runs

``serving.predict.main`` as users call it, at its default ``--batch-size`` and
``--num-workers``, on tables of N and 2N rows of 640x480 JPEGs: its posts/s is N / (seconds
at 2N - seconds at N), so what a run pays once (loading the model, starting workers, the
first batch) cancels. Against it, the raw forward: ``LoadedModel.explain_batch`` on the same
N posts (rows N..2N-1) batched beforehand by predict's own ``TableRows`` and ``Batches``;
same batch size, model, process and threads. Goal: predict.py >= 0.9 x the raw forward.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, artifact, goal, photo_table, ratio, repeat_interleaved, start, summarize, table, \
    work_dir, write_result
from common.config import field

log = logging.getLogger(__name__)


@dataclass
class PredictBenchConfig(BenchConfig):
    """Benchmark serving/predict.py's posts/s against the raw forward on the same batches."""

    presets: str = field("tiny,b32", help="CLIP shapes of the scored artifact (comma-separated)")
    tiny_rows: int = field(256, help="N with the tiny CLIP (the tables have N and 2N rows)")
    b32_rows: int = field(64, help="N with the ViT-B/32-shaped CLIP")
    repeats: int = field(3, help="interleaved repeats (median reported)")
    pool_images: int = field(200, help="distinct 640x480 JPEGs that the rows reuse")

    def __post_init__(self):
        if self.smoke:
            self.presets, self.tiny_rows, self.repeats, self.pool_images = "tiny", 16, 1, 8
        if not set(self.presets.split(",")) <= {"tiny", "b32"}:
            raise ValueError(f"--presets must name tiny and/or b32, got {self.presets!r}")
        if min(self.tiny_rows, self.b32_rows, self.repeats, self.pool_images) < 1:
            raise ValueError("row counts, --repeats and --pool-images must be >= 1")


def bench_preset(cfg: PredictBenchConfig, preset: str) -> dict:
    import torch

    from models.clip_regressor import load_model
    from serving import predict

    # 1. The artifact, the two tables, and predict's defaults (what a user gets).
    model_dir, n = artifact(cfg.out_dir, preset), getattr(cfg, f"{preset}_rows")
    tables = {k: photo_table(cfg.out_dir, cfg.pool_images, k) for k in (n, 2 * n)}
    defaults = predict.PredictConfig(model=str(model_dir), input=str(tables[2 * n]), out="")
    out = work_dir(cfg.out_dir, "predict")

    def seconds(rows: int) -> float:
        t0 = time.perf_counter()
        predict.main(["--model", str(model_dir), "--input", str(tables[rows]), "--out", str(out / f"{preset}.csv"),
                      "--show", "0", "--no-progress"])
        return time.perf_counter() - t0

    # 2. The ceiling's batches: rows N..2N-1 of the big table, through predict's own Dataset and collate.
    lm = load_model(model_dir)
    rows = predict.read_rows(defaults, lm.prepare)[0][n:]
    ds, collate, bs = predict.TableRows(rows, lm.prepare), predict.Batches(lm.batcher), defaults.batch_size
    batches = [collate([ds[i] for i in range(j, min(j + bs, n))])[1] for j in range(0, n, bs)]

    def forward_pps() -> float:
        lm.explain_batch(batches[0])  # a first pass at a new shape is far slower
        t0 = time.perf_counter()
        for b in batches:
            lm.explain_batch(b)
        return n / (time.perf_counter() - t0)

    # 3. Interleaved repeats: predict.py (two runs) and the forward alone.
    values = repeat_interleaved({"predict": lambda: n / max(seconds(2 * n) - seconds(n), 1e-9),
                                 "forward": forward_pps}, cfg.repeats)
    pps = {k: summarize(v, 2) for k, v in values.items()}
    return {"preset": preset, "rows": n, "batch_size": bs, "num_workers": defaults.num_workers,
            "torch_threads": torch.get_num_threads(), "posts_per_s": pps,
            "goal": goal(f"table scorer, {preset} CLIP: predict.py posts/s / raw forward",
                         ratio(pps["predict"]["median"], pps["forward"]["median"]), ">=", 0.9, "x")}


def main(argv: list[str] | None = None) -> dict:
    cfg, t_start = start(PredictBenchConfig, argv)
    presets = {p: bench_preset(cfg, p) for p in cfg.presets.split(",")}
    rows = [[p, r["batch_size"], r["num_workers"], r["torch_threads"], f"{r['rows']} → {2 * r['rows']}",
             r["posts_per_s"]["predict"]["median"], r["posts_per_s"]["forward"]["median"], r["goal"]["measured"]]
            for p, r in presets.items()]
    payload = {"presets": presets, "goals": [r["goal"] for r in presets.values()], "tables": [
        table(["CLIP", "batch", "workers", "torch threads", "rows", "predict.py posts/s", "raw forward posts/s",
               "predict / forward"], rows)]}
    write_result("predict", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
