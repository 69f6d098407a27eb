"""Benchmark 5: a finished training run's test R² against the demo set's ceiling and baselines.

Trains nothing: the run's metrics.json (test R² of the model, the frozen phase and the baselines) against the
generator's R² ceiling ``Var(f) / (Var(f) + sigma²)`` in make_demo_data's meta.json (found via the run's data dir).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import BenchConfig, demo_records, goal, ratio, start, table, train_run, work_dir, write_result
from common.config import REPO_ROOT, field

log = logging.getLogger(__name__)

DEFAULT_RUN = REPO_ROOT / "runs" / "demo" / "run"  # where `make demo` trains


@dataclass
class QualityBenchConfig(BenchConfig):
    run_dir: str | None = field(None, help="a finished train_torch.py run (RUN_DIR/metrics.json); default "
                                "runs/demo/run, or with --smoke a 1+1-epoch run trained here on toy data")


def finished_run(cfg: QualityBenchConfig) -> Path | None:
    """The run to report (None: it has no metrics.json); for a smoke run without --run-dir, a toy one."""
    run = Path(cfg.run_dir or DEFAULT_RUN)
    if cfg.smoke and cfg.run_dir is None:
        run = work_dir(cfg.out_dir) / "quality-smoke-run"
        train_run(cfg.out_dir, demo_records(cfg.out_dir, 48, workers=1), run, "--frozen-epochs", "1",
                  "--finetune-epochs", "1", smoke=True)
    return run if (run / "metrics.json").is_file() else None


def find_demo_meta(metrics: dict) -> Path | None:
    """metrics.json -> its data dir's meta.json -> the posts table's folder -> generator meta.json."""
    try:
        data_meta = json.loads((Path(metrics["data"]["dir"]) / "meta.json").read_text())
        meta = Path(data_meta["source"]["path"]).parent / "meta.json"
    except (OSError, KeyError, ValueError):
        return None
    return meta if meta.is_file() else None


def main(argv: list[str] | None = None) -> dict | None:
    # 1. Parse args; the run's metrics (none: skipped, as make bench does before make demo) and the ceiling.
    cfg, t_start = start(QualityBenchConfig, argv, __doc__)
    if (run := finished_run(cfg)) is None:
        log.warning("quality: no metrics.json in %s (make demo first, or --run-dir); skipped", cfg.run_dir or DEFAULT_RUN)
        return None
    metrics = json.loads((run / "metrics.json").read_text())
    meta_path = find_demo_meta(metrics)
    demo = json.loads(meta_path.read_text()) if meta_path else {}
    ceiling = {"theoretical": demo.get("r2_ceiling_theoretical"), "empirical": demo.get("r2_ceiling_empirical")}

    # 2. Side by side: R² and its share of the ceiling; the goals.
    baselines = {b: m["r2"] for b, m in metrics["baselines"].items()}
    r2 = {**{f"baseline_{b}": v for b, v in baselines.items()},
          "frozen_only": (metrics.get("test_after_frozen") or {}).get("r2"), "fine_tuned": metrics["test"]["r2"]}
    best = max(baselines, key=baselines.get)
    margin = round(r2["fine_tuned"] - baselines[best], 4)
    gain = None if r2["frozen_only"] is None else round(r2["fine_tuned"] - r2["frozen_only"], 4)
    share = {k: ratio(v, ceiling["theoretical"]) for k, v in r2.items()}
    rows = [["ceiling, theoretical", ceiling["theoretical"], 1.0 if ceiling["theoretical"] else None],
            ["ceiling, empirical (f on the generated set)", ceiling["empirical"], None],
            *[[k.replace("_", " "), v, share[k]] for k, v in r2.items()]]
    payload = {"run_dir": str(run), "demo_meta": str(meta_path) if meta_path else None, "ceiling_r2": ceiling,
               "r2": r2, "share_of_ceiling": share,
               "tables": [table(["model", "test R²", "share of ceiling"], rows, f"Run `{run}`." + (
                   "" if demo else " No make_demo_data meta.json beside its posts table: the ceiling is not known."))],
               "goals": [goal(f"fine-tuned test R² beats the best baseline ({best})", margin, ">", 0.0, "R² margin"),
                         goal("fine-tuning beats the frozen-only model (test R²)", gain, ">", 0.0, "R² margin")]}
    write_result("quality", payload, cfg, t_start, __doc__)
    return payload


if __name__ == "__main__":
    main()
