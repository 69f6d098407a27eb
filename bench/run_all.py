"""Run every CPU benchmark, then write BENCHMARKS.md: what ``make bench`` calls.

Each runs in its own process (``--in-process``: here), later ones reusing earlier ones' cached inputs.
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

from bench.benchlib import OUT_DIR, demo_records, start, train_run
from bench.quality_bench import DEFAULT_RUN
from bench import report
from common.config import REPO_ROOT, field

log = logging.getLogger(__name__)

# name -> module of every CPU benchmark, in report order (gpu_train runs by hand on a GPU machine).
BENCHMARKS = {stem: script.removesuffix(".py").replace("/", ".") for stem, (_, script) in report.SECTIONS.items()
              if stem != "gpu_train"}


@dataclass
class RunAllConfig:
    smoke: bool = field(False, help="toy sizes, results under OUT/smoke, BENCHMARKS.md untouched")
    out_dir: str | None = field(None, help="results folder (default bench/out, or bench/out/smoke with --smoke)")
    only: str = field("", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    fresh: bool = field(False, help="delete cached inputs (OUT/work) first")
    quality_run_dir: str | None = field(None, help="finished train_torch.py run for the quality benchmark "
                                                   "(default: runs/demo/run if it exists)")
    in_process: bool = field(False, help="run the scripts in this process (faster start; used by the smoke test)")
    md: str | None = field(None, help="Markdown to write (default BENCHMARKS.md, or OUT/BENCHMARKS.md with --smoke)")

    def __post_init__(self):
        self.chosen = [n for n in BENCHMARKS if n in self.only.split(",") or not self.only]
        if set(filter(None, self.only.split(","))) - set(self.chosen):
            raise ValueError(f"--only: unknown benchmark in {self.only!r}; choose from {list(BENCHMARKS)}")
        self.out_dir = self.out_dir or str(OUT_DIR / "smoke" if self.smoke else OUT_DIR)
        self.md = self.md or str(Path(self.out_dir, "BENCHMARKS.md") if self.smoke else REPO_ROOT / "BENCHMARKS.md")


def quality_run(cfg: RunAllConfig) -> str | None:
    """The finished run that quality reads; for a smoke run, a 1+1-epoch one trained on its toy data."""
    if cfg.quality_run_dir or not cfg.smoke:
        run = Path(cfg.quality_run_dir or DEFAULT_RUN)
        return str(run) if (run / "metrics.json").is_file() else None
    run = Path(cfg.out_dir, "work", "quality-smoke-run")
    records = demo_records(cfg.out_dir, 48, workers=1)
    train_run(cfg.out_dir, records, run, "--frozen-epochs", "1", "--finetune-epochs", "1", smoke=True)
    return str(run)


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args: which benchmarks, where; hey and the quality run before anything is measured.
    cfg, _ = start(RunAllConfig, argv, __doc__)
    out = Path(cfg.out_dir)
    if cfg.fresh:
        shutil.rmtree(out / "work", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if "serving" in cfg.chosen and not shutil.which("hey"):  # fail now, not after the other benchmarks
        raise SystemExit("error: the serving benchmark needs hey: apt-get install hey (make bench does)")
    args = {n: ["--out-dir", str(out), *(["--smoke"] if cfg.smoke else [])] for n in cfg.chosen}
    if "quality" in args:
        run = quality_run(cfg)
        if run is None:
            log.warning("quality: no finished run (make demo, then make bench RUN=runs/demo/run); skipped")
            del args["quality"]
        else:
            args["quality"] += ["--run-dir", run]

    # 2. Each benchmark in turn, timed; a failure stops the run (the JSON files so far stay).
    seconds = {}
    for name, a in args.items():
        log.info("=== %s (%s) ===", name, BENCHMARKS[name])
        t0 = time.perf_counter()
        if cfg.in_process:
            importlib.import_module(BENCHMARKS[name]).main(a)
        else:
            subprocess.run([sys.executable, "-m", BENCHMARKS[name], *a], cwd=REPO_ROOT, check=True)
        seconds[name] = round(time.perf_counter() - t0, 1)

    # 3. The report, from whatever JSON is in the out dir.
    report.main(["--in-dir", str(out), "--md", cfg.md])
    log.info("benchmarks took %s", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return {"seconds": seconds, "out_dir": str(out), "md": cfg.md}


if __name__ == "__main__":
    main()
