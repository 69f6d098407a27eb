"""Run every CPU benchmark, then write BENCHMARKS.md from their JSON: what ``make bench`` calls.

Each runs in its own process (``--in-process``: here), later ones reusing earlier ones' cached inputs.
The report measures and decides nothing: each script wrote its goals, text and tables. A missing file
shows as "not run"; ``gpu_train.json`` falls back on ``bench/results/gpu_train.json``, a committed GPU run.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.benchlib import OUT_DIR, start
from common.config import REPO_ROOT, field

log = logging.getLogger(__name__)

# file stem -> (section title, script), in report order.
SECTIONS = {"train_datapath": ("1. Training data path", "bench/train_bench.py"),
            "gpu_train": ("1b. Training on GPU (ViT-B/32, bf16)", "bench/gpu_train.py"),
            "preprocess": ("3. Preprocessing", "bench/preprocess_bench.py"),
            "download": ("3b. Downloading image URLs", "bench/download_bench.py"),
            "serving": ("4. Serving and scoring a table", "bench/serve_bench.py"),
            "quality": ("5. Quality on the demo set", "bench/quality_bench.py"),
            "hostile": ("6. Hostile inputs", "bench/hostile_bench.py"),
            "variants": ("7. Caption variants and posting times", "bench/variants_bench.py")}
# name -> module of every CPU benchmark, in report order (gpu_train runs by hand on a GPU machine).
BENCHMARKS = {stem: script.removesuffix(".py").replace("/", ".") for stem, (_, script) in SECTIONS.items()
              if stem != "gpu_train"}
GPU_RESULT = REPO_ROOT / "bench" / "results" / "gpu_train.json"  # a committed GPU run, used where OUT has none
STATUS = {True: "**MET**", False: "**NOT MET**", None: "not measured"}


@dataclass
class RunAllConfig:
    smoke: bool = field(False, help="toy sizes; results and their Markdown in OUT (default bench/out/smoke)")
    out_dir: str | None = field(None, help="results folder (default bench/out, or bench/out/smoke with --smoke)")
    only: str = field("", help="comma-separated subset of: " + ", ".join(BENCHMARKS) + " (the report keeps the "
                                   "other sections' last measured text and goals, each with its own 'Ran' line)")
    report_only: bool = field(False, help="run nothing: write the Markdown from the JSON files in the out dir")
    quality_run_dir: str | None = field(None, help="finished train_torch.py run for the quality benchmark "
                                                   "(default: runs/demo/run; skipped if it has no metrics.json)")
    in_process: bool = field(False, help="run the scripts in this process (faster start; used by the smoke test)")

    def __post_init__(self):
        self.chosen = [] if self.report_only else [n for n in BENCHMARKS if n in self.only.split(",") or not self.only]
        if set(filter(None, self.only.split(","))) - set(BENCHMARKS):
            raise ValueError(f"--only: unknown benchmark in {self.only!r}; choose from {list(BENCHMARKS)}")
        self.out_dir = self.out_dir or str(OUT_DIR / "smoke" if self.smoke else OUT_DIR)
        self.md = Path(self.out_dir, "BENCHMARKS.md") if self.smoke else REPO_ROOT / "BENCHMARKS.md"


def fmt(x) -> str:
    """Cells as the tables show them: numbers with thousands separated, else 4 significant digits."""
    if isinstance(x, list):  # repeats
        return ", ".join(map(fmt, x))
    if x is None or isinstance(x, (bool, str)):
        return "–" if x is None else str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def markdown(header: list, rows: list[list], note: str = "") -> list[str]:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows] + [""] + ([note, ""] if note else [])


def goal_rows(results: dict, kept: dict | None = None) -> list[list]:
    """The goals table's rows, section by section; a section in ``kept`` (``previous_report``) and not
    in ``results`` keeps its earlier rows."""
    rows, kept = [], kept or {}
    for stem, (title, _) in SECTIONS.items():
        if stem not in results and title in kept:
            rows += kept[title]["goals"]
            continue
        if stem == "gpu_train" and stem not in results:
            rows.append([title, "GPU training throughput, ViT-B/32 bf16 (one H100)", ">= 3,000", "–", "not run"])
        for g in results.get(stem, {}).get("goals", []):
            unit = f" {g['unit']}" if g["unit"] and g["measured"] is not None else ""
            rows.append([title, g["goal"] + (f" ({g['note']})" if g["note"] else ""),
                         f"{g['op']} {fmt(g['target'])}", fmt(g["measured"]) + unit, STATUS[g["met"]]])
    return rows


def previous_report(md: str | Path) -> dict[str, dict]:
    """The sections of the report already at ``md``, by title: ``{"body": lines, "goals": rows}``, so a
    run of some benchmarks (``--only``) keeps the others' last measured text, each with its own "Ran ..."
    line. Cells of kept goal rows are copied as written."""
    md = Path(md)
    if not md.is_file():
        return {}
    parts = re.split(r"^## (.+)$", md.read_text(), flags=re.M)  # [preamble, title, body, title, body, ...]
    sections = {parts[i].strip(): parts[i + 1].strip("\n").splitlines() for i in range(1, len(parts), 2)}
    goals: dict[str, list] = {}
    for line in sections.get("Goals", [])[2:]:  # past the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5:
            goals.setdefault(cells[0], []).append(cells)
    titles = {title for title, _ in SECTIONS.values()}
    return {t: {"body": body, "goals": goals.get(t, [])} for t, body in sections.items() if t in titles}


def ran(r: dict) -> str:
    """When, at which commit and on what a benchmark ran."""
    m, commit = r["machine"], r["machine"].get("git_commit") or "–"
    return (f"_Ran {m['date_utc']} at `{commit[:12]}`{'-dirty' if 'dirty' in commit else ''} in {fmt(r['wall_s'])} s on "
            f"{m['cpu_model']}, {m['cpus_usable']} cores, {m['ram_gib']} GiB" + (f", {m['gpu']}" if m.get("gpu") else "")
            + f"; torch {m['torch']} ({m.get('torch_threads', '–')} threads), transformers {m['transformers']}._")


def section(stem: str, r: dict | None) -> list[str]:
    if r is None:
        return [f"Not run: `python {SECTIONS[stem][1]}`.", ""]
    return [r["about"], "", ran(r), ""] + [line for t in r["tables"] for line in markdown(t["header"], t["rows"], t["note"])]


def build(results: dict, kept: dict | None = None) -> str:
    """The whole Markdown; sections without results keep their text from ``kept`` (``previous_report``)."""
    kept = kept or {}
    lines = ["# Benchmarks", "", "Written by `bench/run_all.py` from the JSON that the scripts in `bench/` write; "
             "do not edit by hand (`bench/README.md` says how to run them). Each comparison is a ratio measured in "
             "one run on one machine; figures are medians over interleaved repeats.", ""]
    smoke = [stem for stem, r in results.items() if r.get("smoke")]
    if smoke:
        lines += [f"> **SMOKE RUN** ({', '.join(smoke)}): toy sizes that only check the scripts run. "
                  "The numbers below mean nothing.", ""]
    lines += ["## Goals", "",
              *markdown(["benchmark", "goal", "target", "measured", "status"], goal_rows(results, kept))]
    for stem, (title, _) in SECTIONS.items():
        body = kept[title]["body"] + [""] if stem not in results and title in kept else section(stem, results.get(stem))
        lines += [f"## {title}", "", *body]
    return "\n".join(lines).rstrip() + "\n"


def write_report(in_dir: str | Path, md: str | Path, keep_previous: bool = False) -> Path:
    """``md`` from the JSON files in ``in_dir`` (and the committed GPU run where it has none), with its plots
    (``bench/plots.py``); with ``keep_previous``, a section with no JSON there keeps its text from ``md``."""
    paths = {stem: Path(in_dir, f"{stem}.json") for stem in SECTIONS}
    if not paths["gpu_train"].is_file():
        paths["gpu_train"] = GPU_RESULT
    results = {stem: json.loads(p.read_text()) for stem, p in paths.items() if p.is_file()}
    kept = previous_report(md) if keep_previous else {}
    drawn = plots.write_plots(results, plots.plots_dir(md))  # from the same JSON; a missing one is noted
    Path(md).write_text(build(results, kept) + "\n" + plots.markdown(drawn, md))
    log.info("wrote %s from: %s", md, ", ".join(results) or "no results")
    return Path(md)


def main(argv: list[str] | None = None) -> dict:
    # 1. Parse args: which benchmarks, where; hey before anything is measured.
    cfg, _ = start(RunAllConfig, argv, __doc__)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "serving" in cfg.chosen and not shutil.which("hey"):  # fail now, not after the other benchmarks
        raise SystemExit("error: the serving benchmark needs hey: apt-get install hey (make bench does)")
    args = {n: ["--out-dir", str(out), *(["--smoke"] if cfg.smoke else [])] for n in cfg.chosen}
    if "quality" in args and cfg.quality_run_dir:
        args["quality"] += ["--run-dir", cfg.quality_run_dir]

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
    write_report(out, cfg.md, keep_previous=bool(cfg.only))  # --only: the other sections keep their last text
    log.info("benchmarks took %s", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) or "nothing (report only)")
    return {"seconds": seconds, "out_dir": str(out), "md": str(cfg.md)}


if __name__ == "__main__":
    main()
