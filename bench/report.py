"""Write BENCHMARKS.md from the benchmark scripts' JSON files (bench/out/*.json).

Nothing here measures anything, and every goal's MET / NOT MET was decided by the script
that measured it (``benchlib.goal``). A missing file shows as "not run"; ``gpu_train.json``
falls back on ``bench/results/gpu_train.json``, a committed copy of a GPU run.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import REPO_ROOT, config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)

BENCH = REPO_ROOT / "bench"
# file stem -> (section title, script), in report order.
SECTIONS = {"train_datapath": ("1. Training data path", "bench/train_bench.py"),
            "gpu_train": ("1b. Training on GPU (ViT-B/32, bf16)", "bench/gpu_train.py"),
            "phase1": ("2. Phase-1 cost: embedding cache", "bench/phase1_bench.py"),
            "preprocess": ("3. Preprocessing", "bench/preprocess_bench.py"),
            "serving": ("4. Serving", "bench/serve_bench.py"),
            "quality": ("5. Quality on the demo set", "bench/quality_bench.py")}
STATUS = {True: "**MET**", False: "**NOT MET**", None: "not measured"}
HARDWARE = {"cpu_model": "CPU", "cpus_usable": "cores usable", "ram_gib": "RAM (GiB)", "gpu": "GPU", "platform": "OS",
            "python": "Python", "torch": "torch", "transformers": "transformers", "torch_threads": "torch threads"}


@dataclass
class ReportConfig:
    """Write BENCHMARKS.md (goals, machine, tables) from bench/out/*.json."""

    in_dir: str = field(str(BENCH / "out"), help="folder holding the scripts' JSON files")
    md: str = field(str(REPO_ROOT / "BENCHMARKS.md"), help="Markdown file to write")
    gpu_json: str = field(str(BENCH / "results" / "gpu_train.json"),
                          help="gpu_train.json to use when IN_DIR has none (a committed copy of the GPU run)")


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, str)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def values(s: dict, digits: int = 2) -> str:
    return ", ".join(fmt(v, digits) for v in s["values"])


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows] + [""]


def goal_rows(results: dict) -> list[list]:
    rows = []
    for stem, (title, _) in SECTIONS.items():
        if stem == "gpu_train" and stem not in results:
            rows.append([title, "GPU training throughput >= 3000 samples/s (one H100)", ">= 3000 samples/s", "–",
                         "not run"])
        for g in results.get(stem, {}).get("goals", []):
            measured = fmt(g["measured"], 3) + (f" {g['unit']}" if g["unit"] and g["measured"] is not None else "")
            rows.append([title, g["goal"] + (f" ({g['note']})" if g.get("note") else ""),
                         f"{g['op']} {fmt(g['target'])}", measured, STATUS[g["met"]]])
    return rows


def machine_section(results: dict) -> list[str]:
    """One column per distinct machine and software set; then when and at which commit each ran."""
    machines: dict[tuple, list[str]] = {}
    for stem, r in results.items():
        machines.setdefault(tuple(r["machine"].get(k) for k in HARDWARE if k != "torch_threads"), []).append(stem)
    if not machines:
        return ["No results yet: run `make bench`.", ""]
    first = [results[stems[0]]["machine"] for stems in machines.values()]
    out = table(["", *[", ".join(f"`{s}`" for s in stems) for stems in machines.values()]],
                [[label, *[fmt(m.get(k)) for m in first]] for k, label in HARDWARE.items()
                 if any(m.get(k) for m in first)])
    rows = []
    for stem, (title, script) in SECTIONS.items():
        m = results.get(stem, {}).get("machine")
        commit = (m or {}).get("git_commit") or "–"
        rows.append([title, f"`{script}`", *([m.get("date_utc", "–"), f"`{commit[:12]}`"
                                               + ("-dirty" if commit.endswith("-dirty") else ""),
                                               fmt(results[stem]["wall_s"], 0)] if m else ["not run", "–", "–"])])
    return out + table(["benchmark", "script", "run at (UTC)", "git commit", "wall time (s)"], rows)


def sec_datapath(r: dict) -> list[str]:
    workers = next(iter(r["presets"].values()))["num_workers"]
    out = ["Samples/s of phase-2 train steps (CLIP + head trainable, AdamW, through `train_torch.train_one_epoch`) "
           "fed the same batches two ways: the project's `EngagementDataset` + `Collator` DataLoader (train_torch's "
           f"default `--num-workers` = {workers}), and batches already in memory (ceiling). Medians over interleaved "
           f"repeats; torch threads {r.get('torch_threads')}.", ""]
    rows = [[f"{p} ({d['params'] / 1e6:.1f}M)", d["batch_size"], f"{d['steps']} × {s['project']['n']}",
             s["project"]["median"], s["ceiling"]["median"], d["goal"]["measured"]]
            for p, d in r["presets"].items() for s in [d["samples_per_s"]]]
    return out + table(["CLIP", "batch", "steps × repeats", "project", "ceiling", "project/ceiling"], rows)


def sec_gpu(g: dict | None) -> list[str]:
    if g is None:
        return ["**Not run.** `bench/gpu_train.py` runs on a GPU machine (`OUT=dir python bench/gpu_train.py`); "
                "copy its `gpu_train.json` to `bench/results/` (or `bench/out/`) and re-run "
                "`python bench/report.py`.", ""]
    s, f, m, mod = g["samples_per_s"], g["flops"], g["mfu"], g["model"]
    out = [f"{g['device']}, CUDA {g.get('cuda')}, {g['mixed_precision']} autocast via Accelerate, SDPA attention, "
           f"batch {mod['batch_size']}, {mod['num_workers']} loader workers, {g['data']['train_posts']:,} train posts "
           f"({mod['batches_per_epoch']} batches/epoch; whole epochs timed after a warm-up epoch, through "
           f"`train_torch.train_one_epoch`). Data generation + preprocessing took {g['data']['seconds_to_ready']} s; "
           f"the whole script {g['wall_s']} s.", ""]
    out += table(["", "samples/s (median)", "repeats"], [
        [name, s[k]["median"], values(s[k], 0)] for name, k in (
            ("project: DataLoader + step", "project"), ("ceiling: step on on-device batches", "ceiling"),
            ("loader alone (no training)", "loader_only"))])
    out += table(["FLOPs and MFU", "value"], [
        [f"training GFLOP/sample (fwd+bwd, {f['text_tokens']:.0f} text tokens, dynamic padding)",
         f["gflop_per_sample"]],
        ["measured bf16 matmul TFLOP/s", g["peak_tflops"]["measured_bf16_matmul"]],
        *[[f"MFU of {k} vs {'989 TFLOP/s datasheet' if p == 'datasheet' else 'measured matmul peak'}",
           pct(m[f"{k}_vs_{p}"])] for k in ("project", "ceiling") for p in ("datasheet", "measured_matmul")],
        ["project / ceiling", g["ratios"]["project_over_ceiling"]]])
    lo, ce = s["loader_only"]["median"], s["ceiling"]["median"]
    if lo and ce:
        out += [f"If loading and the step did not overlap at all, throughput would be 1 / (1/{fmt(lo)} + 1/{fmt(ce)}) "
                f"= {fmt(1 / (1 / lo + 1 / ce))} samples/s; measured: {fmt(s['project']['median'])}.", ""]
    return out


def sec_phase1(r: dict) -> list[str]:
    s = r["phase1_seconds"]
    out = [f"`train_torch.py --frozen-epochs {r['frozen_epochs']} --finetune-epochs 0`, tiny CLIP, {r['posts']:,} "
           f"demo posts (splits {r['splits']}). Cached = embedding pass over train/val/test once + the frozen epochs "
           "on the cache; recomputed = `--no-embedding-cache`, CLIP re-run every epoch on train and val. Seconds "
           "from each run's metrics.json, medians over interleaved repeats.", ""]
    out += table(["mode", "phase-1 seconds (median)", "repeats"], [
        ["embedding cache", s["cache"]["median"], values(s["cache"])],
        ["recompute every epoch", s["no_cache"]["median"], values(s["no_cache"])]])
    return out + [f"Recompute / cached: **{fmt(r['speedup_cache'])}x**; the cache saved {fmt(r['saved_seconds'])} s "
                  f"over {r['frozen_epochs']} frozen epochs ({fmt(r['saved_seconds_per_frozen_epoch'])} s an epoch; "
                  "the difference of the two measured medians). No numeric target was set.", ""]


def sec_preprocess(r: dict) -> list[str]:
    t, m, b, (w, h) = r["throughput"], r["memory"], r["record_bytes"], r["image_size"]
    out = [f"`preprocess.py` as a subprocess on {w}x{h} JPEGs (posts/s from its meta.json: pool start to last record "
           "written).", ""]
    out += table(["workers", "posts/s (median)", "repeats"],
                 [[n, t["posts_per_s"][f"workers_{n}"]["median"], values(t["posts_per_s"][f"workers_{n}"])]
                  for n in (1, 2)])
    out += [f"Speedup 2 vs 1 worker: **{fmt(t['speedup_2_vs_1'])}x** on {t['posts']:,} posts.", ""]
    out += table(["posts", "peak RSS, process tree (MiB)", "peak RSS, largest process (MiB)", "seconds"],
                 [[m[k]["posts"], m[k]["peak_tree_rss_mib"], m[k]["maxrss_mib"], m[k]["wall_s"]]
                  for k in ("small", "large")])
    out += [f"Peak RSS ratio {m['large']['posts']:,} / {m['small']['posts']:,} posts: "
            f"**{fmt(m['ratio_large_vs_small'], 3)}x** (tree, sampled every 20 ms; largest single process, exact: "
            f"{fmt(m['ratio_maxrss_large_vs_small'], 3)}x). Rows reuse a pool of images under distinct captions.", ""]
    out += table(["records", "bytes/post"], [["pre-resized (shortest edge 224)", b["resized_224"]["bytes_per_post"]],
                                           ["full size", b["full_size"]["bytes_per_post"]]])
    return out + [f"Full size / pre-resized: **{fmt(b['full_over_resized'])}x** bytes per post.", ""]


def sec_serving(r: dict) -> list[str]:
    m, q, env = r["model"], r["ratios"], lambda d: " ".join(f"{k}={v}" for k, v in d["env"].items())
    out = [f"`uvicorn serving.app:app` on 127.0.0.1, load from `{r['load_tool']}`, one multipart POST /predict per "
           f"request ({r['request']['image']}, {r['request']['body_bytes']:,} bytes). Model: {m['preset']} CLIP, "
           f"random weights. Raw forward at batch 1: **{fmt(m['forward_b1_ms'])} ms** (median of "
           f"{len(m['forward_b1_ms_values'])}); forward per post at batch 16: {fmt(m['forward_b16_per_post_ms'])} ms; "
           f"decode + prepare + processor per post: {fmt(m['prepare_ms'])} ms; torch threads {m['torch_threads']}. "
           "req/s is the median over repeats; percentiles are over all of a level's requests.", ""]
    for mode, d in r["modes"].items():
        out += [f"**{mode.replace('_', ' ')}** (`{env(d)}`)", ""]
        out += table(["concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "requests", "errors"],
                     [[int(c), *(lv[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "requests", "errors"))]
                      for c, lv in sorted(d["levels"].items(), key=lambda kv: int(kv[0]))])
    lo, hi = q["levels"]
    out += table(["ratio", "micro-batching on", "micro-batching off"], [
        [f"overhead: p50 at concurrency {lo} / raw forward at batch 1",
         *q["overhead_p50_lo_over_forward_b1"].values()],
        [f"throughput: req/s at {hi} / at {lo}", *q["rps_hi_over_lo"].values()]])
    if q.get("model_forward_b1_over_b16_per_post") is not None:
        out += [f"The model alone runs {fmt(q['model_forward_b1_over_b16_per_post'])}x faster per post at batch 16 "
                "than at batch 1: the most that micro-batching can add to throughput on this machine.", ""]
    o = r["overload"]
    return out + [f"Overload (`{env(o)}`, concurrency {o['concurrency']}): status codes {o['status']}, transport "
                  f"errors {o['transport_errors']}.", ""]


def sec_quality(r: dict) -> list[str]:
    c, v, s = r["ceiling_r2"], r["r2"], r["share_of_ceiling"]
    out = [f"Test split ({r['test_posts']} posts), {r.get('scale') or 'log1p scale'}; run `{r['run_dir']}` "
           "(its metrics.json). The ceiling is the generator's `Var(f) / (Var(f) + sigma²)` from make_demo_data's "
           "meta.json.", ""]
    rows = [["ceiling, theoretical", c["theoretical"], 1.0 if c["theoretical"] else None],
            ["ceiling, empirical (f on the generated set)", c["empirical"], None]]
    rows += [[name, v[k], s[k]] for name, k in (
        ("baseline: train mean", "baseline_mean"), ("baseline: sentiment only (linear)", "baseline_sentiment_linear"),
        ("baseline: ridge on frozen CLIP embeddings", "baseline_frozen_clip_ridge"),
        ("frozen-only (best phase-1 model)", "frozen_only"), ("fine-tuned (best model)", "fine_tuned"))]
    return out + table(["model", "test R²", "share of ceiling"], [[a, fmt(b, 4), fmt(cc, 3)] for a, b, cc in rows])


def build(results: dict) -> str:
    """The whole Markdown."""
    lines = ["# Benchmarks", "", "Written by `bench/report.py` from the JSON that the scripts in `bench/` write to "
             "`bench/out/`; do not edit by hand. `make bench` re-runs every CPU table below (the GPU table comes from "
             "`bench/gpu_train.py`, run on a GPU machine). Every comparison is a ratio measured in one run on one "
             "machine; figures are medians over repeats.", ""]
    smoke = [stem for stem, r in results.items() if r.get("smoke")]
    if smoke:
        lines += [f"> **SMOKE RUN** ({', '.join(smoke)}): tiny sizes that only check the scripts run. "
                  "The numbers below mean nothing.", ""]
    lines += ["## Goals", "", *table(["benchmark", "goal", "target", "measured", "status"], goal_rows(results))]
    lines += ["## Machine", "", *machine_section(results)]
    sections = {"train_datapath": sec_datapath, "phase1": sec_phase1, "preprocess": sec_preprocess,
                "serving": sec_serving, "quality": sec_quality}
    for stem, (title, script) in SECTIONS.items():
        r = results.get(stem)
        lines += [f"## {title}", ""]
        if stem == "gpu_train":
            lines += sec_gpu(r)
        else:
            lines += sections[stem](r) if r else [f"Not run: `python {script}`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(ReportConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    paths = {stem: Path(cfg.in_dir, f"{stem}.json") for stem in SECTIONS}
    results = {stem: json.loads(p.read_text()) for stem, p in paths.items() if p.is_file()}
    if "gpu_train" not in results and Path(cfg.gpu_json).is_file():
        results["gpu_train"] = json.loads(Path(cfg.gpu_json).read_text())
    log.info("results found: %s", ", ".join(results) or "none")
    md = Path(cfg.md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(build(results))
    log.info("wrote %s", md)
    return md


if __name__ == "__main__":
    main()
