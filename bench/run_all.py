"""Run every CPU benchmark, then write BENCHMARKS.md: what ``make bench`` calls.

    python bench/run_all.py              # full run, ~15-20 min on 2 cores; writes BENCHMARKS.md + bench/plots/
    python bench/run_all.py --smoke      # ~30 s quiet; writes bench/out/smoke/{*.json,BENCHMARKS.md,plots/}

Each benchmark runs in its own process (``--in-process`` runs them here instead, which
saves the imports: the smoke test uses it), in an order that lets later ones reuse the
cached inputs of earlier ones (demo set, CLIP checkpoints). Run it on a quiet machine:
everything else running on the cores shows up in the figures. ``bench/gpu_train.py`` is
not part of this: it needs a GPU machine (see bench/README.md).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import REPO_ROOT, config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent
# (name, module) in run order: preprocessing first (no model), serving last (longest).
BENCHMARKS = [
    ("preprocess", "bench.preprocess_bench"),
    ("train_datapath", "bench.train_bench"),
    ("phase1", "bench.phase1_bench"),
    ("quality", "bench.quality_bench"),
    ("serving", "bench.serve_bench"),
]


@dataclass
class RunAllConfig:
    """Run the CPU benchmarks in bench/ one after another, then bench/report.py."""

    smoke: bool = field(False, help="smoke mode: tiny sizes, results under OUT/smoke, BENCHMARKS.md untouched")
    out_dir: str | None = field(None, help="results folder (default bench/out, or bench/out/smoke with --smoke)")
    only: str = field("", help="comma-separated subset of: " + ", ".join(n for n, _ in BENCHMARKS))
    fresh: bool = field(False, help="delete cached inputs (OUT/work) first")
    quality_run_dir: str | None = field(None, help="a finished train_torch.py run for the quality benchmark to "
                                                   "report instead of training its own (saves ~4 min)")
    in_process: bool = field(False, help="run the scripts in this process (faster start; used by the smoke test)")
    report: bool = field(True, help="write the report at the end")
    md: str | None = field(None, help="Markdown to write (default BENCHMARKS.md, or OUT/BENCHMARKS.md with --smoke)")
    plots_dir: str | None = field(None, help="plot folder (default bench/plots, or OUT/plots with --smoke)")

    def __post_init__(self):
        names = [n for n, _ in BENCHMARKS]
        unknown = set(filter(None, self.only.split(","))) - set(names)
        if unknown:
            raise ValueError(f"--only: unknown benchmark(s) {sorted(unknown)}; choose from {names}")
        if self.out_dir is None:
            self.out_dir = str(BENCH / "out" / "smoke") if self.smoke else str(BENCH / "out")
        if self.md is None:
            self.md = str(Path(self.out_dir) / "BENCHMARKS.md") if self.smoke else str(REPO_ROOT / "BENCHMARKS.md")
        if self.plots_dir is None:
            self.plots_dir = str(Path(self.out_dir) / "plots") if self.smoke else str(BENCH / "plots")


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args; which benchmarks, where.
    cfg = parse_config(RunAllConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    out = Path(cfg.out_dir)
    if cfg.fresh:
        shutil.rmtree(out / "work", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [(n, m) for n, m in BENCHMARKS if not cfg.only or n in cfg.only.split(",")]
    args = ["--out-dir", str(out), *(["--smoke"] if cfg.smoke else [])]

    # 2. Each benchmark in turn, timed; a failure stops the run (the JSONs so far stay).
    seconds = {}
    t_all = time.perf_counter()
    for name, module in chosen:
        log.info("=== %s (%s) ===", name, module)
        t0 = time.perf_counter()
        extra = ["--run-dir", cfg.quality_run_dir] if name == "quality" and cfg.quality_run_dir else []
        if cfg.in_process:
            importlib.import_module(module).main([*args, *extra])
        else:
            subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO_ROOT, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("=== %s done in %.0f s ===", name, seconds[name])

    # 3. The report, from whatever JSON is in the out dir.
    if cfg.report:
        from bench import report

        report.main(["--in-dir", str(out), "--md", cfg.md, "--plots-dir", cfg.plots_dir])
    total = round(time.perf_counter() - t_all, 1)
    log.info("benchmarks took %s; total %.0f s", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), total)
    return {"seconds": seconds, "total_seconds": total, "out_dir": str(out), "md": cfg.md}


if __name__ == "__main__":
    main()
