"""Write BENCHMARKS.md from the benchmark scripts' JSON files (bench/out/*.json).

Nothing here measures or decides: each script wrote its goals, text and tables. A missing file shows
as "not run"; ``gpu_train.json`` falls back on ``bench/results/gpu_train.json``, a committed GPU run.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import start
from common.config import REPO_ROOT, field

log = logging.getLogger(__name__)

BENCH = REPO_ROOT / "bench"
# file stem -> (section title, script), in report order.
SECTIONS = {"train_datapath": ("1. Training data path", "bench/train_bench.py"),
            "gpu_train": ("1b. Training on GPU (ViT-B/32, bf16)", "bench/gpu_train.py"),
            "preprocess": ("3. Preprocessing", "bench/preprocess_bench.py"),
            "serving": ("4. Serving and scoring a table", "bench/serve_bench.py"),
            "quality": ("5. Quality on the demo set", "bench/quality_bench.py")}
GPU_RESULT = BENCH / "results" / "gpu_train.json"  # a committed GPU run, used where IN_DIR has none
STATUS = {True: "**MET**", False: "**NOT MET**", None: "not measured"}


@dataclass
class ReportConfig:
    in_dir: str = field(str(BENCH / "out"), help="folder holding the scripts' JSON files")
    md: str = field(str(REPO_ROOT / "BENCHMARKS.md"), help="Markdown file to write")


def fmt(x) -> str:
    """Cells as the tables show them: numbers with thousands separated, else 4 significant digits."""
    if x is None:
        return "–"
    if isinstance(x, list):  # repeats
        return ", ".join(map(fmt, x))
    if isinstance(x, (bool, str)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def markdown(header: list, rows: list[list], note: str = "") -> list[str]:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows] + [""] + ([note, ""] if note else [])


def goal_rows(results: dict) -> list[list]:
    rows = []
    for stem, (title, _) in SECTIONS.items():
        if stem == "gpu_train" and stem not in results:
            rows.append([title, "GPU training throughput, ViT-B/32 bf16 (one H100)", ">= 3,000", "–", "not run"])
        for g in results.get(stem, {}).get("goals", []):
            unit = f" {g['unit']}" if g["unit"] and g["measured"] is not None else ""
            rows.append([title, g["goal"] + (f" ({g['note']})" if g["note"] else ""),
                         f"{g['op']} {fmt(g['target'])}", fmt(g["measured"]) + unit, STATUS[g["met"]]])
    return rows


def ran(r: dict) -> str:
    """When, at which commit and on what a benchmark ran."""
    m, commit = r["machine"], r["machine"].get("git_commit") or "–"
    return (f"_Ran {m['date_utc']} at `{commit[:12]}`{'-dirty' if 'dirty' in commit else ''} in {fmt(r['wall_s'])} s on "
            f"{m['cpu_model']}, {m['cpus_usable']} cores, {m['ram_gib']} GiB" + (f", {m['gpu']}" if m.get("gpu") else "")
            + f"; torch {m['torch']} ({m.get('torch_threads', '–')} threads), transformers {m['transformers']}._")


def section(stem: str, r: dict | None) -> list[str]:
    if r is None:
        return [f"Not run: `python {SECTIONS[stem][1]}`.", ""]
    if stem == "gpu_train" and "tables" not in r:  # a committed run from before the scripts wrote tables
        from bench.gpu_train import describe

        r = {**r, **describe(r)}
    return [r["about"], "", ran(r), ""] + [line for t in r["tables"] for line in markdown(t["header"], t["rows"], t["note"])]


def build(results: dict) -> str:
    """The whole Markdown."""
    lines = ["# Benchmarks", "", "Written by `bench/report.py` from the JSON that the scripts in `bench/` write; "
             "do not edit by hand (`bench/README.md` says how to run them). Each comparison is a ratio measured in "
             "one run on one machine; figures are medians over interleaved repeats.", ""]
    smoke = [stem for stem, r in results.items() if r.get("smoke")]
    if smoke:
        lines += [f"> **SMOKE RUN** ({', '.join(smoke)}): toy sizes that only check the scripts run. "
                  "The numbers below mean nothing.", ""]
    lines += ["## Goals", "", *markdown(["benchmark", "goal", "target", "measured", "status"], goal_rows(results))]
    for stem, (title, _) in SECTIONS.items():
        lines += [f"## {title}", "", *section(stem, results.get(stem))]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = start(ReportConfig, argv, __doc__)
    paths = {stem: Path(cfg.in_dir, f"{stem}.json") for stem in SECTIONS}
    if not paths["gpu_train"].is_file():
        paths["gpu_train"] = GPU_RESULT
    results = {stem: json.loads(p.read_text()) for stem, p in paths.items() if p.is_file()}
    log.info("results found: %s", ", ".join(results) or "none")
    md = Path(cfg.md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(build(results))
    log.info("wrote %s", md)
    return md


if __name__ == "__main__":
    main()
