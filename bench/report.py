"""Write BENCHMARKS.md and its plots from the benchmark scripts' JSON output.

    python bench/report.py                    # bench/out/*.json -> BENCHMARKS.md, bench/plots/*.png
    python bench/report.py --in-dir bench/out/smoke --md bench/out/smoke/BENCHMARKS.md \
        --plots-dir bench/out/smoke/plots     # what `make bench-smoke` does

Nothing here measures anything: every figure in the Markdown comes from a JSON file, and
every goal's MET / NOT MET was decided by the script that measured it (``benchlib.goal``).
A missing file shows as "not run". The GPU benchmark runs separately, on a GPU machine:
its ``gpu_train.json`` is read from the input dir or, failing that, from
``bench/results/gpu_train.json`` (``--gpu-json``), a copy that can be committed so the GPU
table survives a fresh checkout.
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

BENCH = Path(__file__).resolve().parent
# (file stem, section title, script) in report order.
SECTIONS = [
    ("train_datapath", "1. Training data path", "bench/train_bench.py"),
    ("gpu_train", "1b. Training on GPU (ViT-B/32, bf16)", "bench/gpu_train.py"),
    ("phase1", "2. Phase-1 cost: embedding cache", "bench/phase1_bench.py"),
    ("preprocess", "3. Preprocessing", "bench/preprocess_bench.py"),
    ("serving", "4. Serving", "bench/serve_bench.py"),
    ("quality", "5. Quality on the demo set", "bench/quality_bench.py"),
]


@dataclass
class ReportConfig:
    """Write BENCHMARKS.md (tables, goals, machine) and PNG plots from bench/out/*.json."""

    in_dir: str = field(str(BENCH / "out"), help="folder holding the scripts' JSON files")
    md: str = field(str(REPO_ROOT / "BENCHMARKS.md"), help="Markdown file to write")
    plots_dir: str = field(str(BENCH / "plots"), help="folder for the PNG plots (committed: keep them small)")
    gpu_json: str = field(str(BENCH / "results" / "gpu_train.json"),
                          help="gpu_train.json to use when IN_DIR has none (a committed copy of the GPU run)")


# ---------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------


def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def status(g: dict) -> str:
    return {True: "**MET**", False: "**NOT MET**", None: "not measured"}[g["met"]]


def goal_rows(results: dict) -> list[list]:
    rows = []
    for stem, title, _ in SECTIONS:
        r = results.get(stem)
        if r is None:
            if stem == "gpu_train":
                rows.append([title, "GPU training throughput >= 3000 samples/s (one H100)", ">= 3000 samples/s",
                             "–", "not run"])
            continue
        for g in r.get("goals", []):
            measured = fmt(g["measured"], 3) + (f" {g['unit']}" if g["unit"] and g["measured"] is not None else "")
            note = f" ({g['note']})" if g.get("note") else ""
            rows.append([title, g["goal"] + note, f"{g['op']} {fmt(g['target'])}", measured, status(g)])
    return rows


def rel(path: Path, md: Path) -> str:
    try:
        return str(path.resolve().relative_to(md.resolve().parent))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, small PNGs)
# ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_datapath(r: dict, gpu: dict | None, path: Path) -> None:
    plt = _plt()
    groups = [(f"{p} CPU", d["samples_per_s"]) for p, d in r["presets"].items()]
    if gpu:
        groups.append(("b32 GPU", {k: gpu["samples_per_s"][k] for k in ("project", "ceiling")}))
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    colours = {"project": "#1f77b4", "ceiling": "#7f7f7f", "naive": "#d62728"}
    width = 0.26
    for gi, (name, sps) in enumerate(groups):
        ceiling = sps["ceiling"]["median"] or 1.0
        for vi, v in enumerate(("project", "ceiling", "naive")):
            if v not in sps or sps[v]["median"] is None:
                continue
            x = gi + (vi - 1) * width
            ax.bar(x, sps[v]["median"] / ceiling, width, color=colours[v], label=v if gi == 0 else None)
            ax.text(x, sps[v]["median"] / ceiling + 0.02, fmt(sps[v]["median"], 1), ha="center", fontsize=7)
    ax.axhline(0.9, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("samples/s ÷ ceiling")
    ax.set_title("Training data path (labels: samples/s; dashed: goal 0.9)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylim(0, 1.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_serving(r: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.5, 3.2), dpi=80)
    for mode, style in (("micro_batching_on", "-"), ("micro_batching_off", "--")):
        if mode not in r["modes"]:
            continue
        levels = r["modes"][mode]["levels"]
        cs = sorted(int(c) for c in levels)
        label = mode.replace("micro_batching_", "batching ")
        for q, colour in (("p50_ms", "#1f77b4"), ("p99_ms", "#d62728")):
            ax1.plot(cs, [levels[str(c)][q] for c in cs], style, marker="o", color=colour, ms=3,
                     label=f"{q[:3]} {label}")
        ax2.plot(cs, [levels[str(c)]["rps"] for c in cs], style, marker="o", color="#2ca02c", ms=3, label=label)
    for ax, ylabel in ((ax1, "latency (ms)"), (ax2, "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_title("POST /predict latency", fontsize=9)
    ax2.set_title("throughput", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_quality(r: dict, path: Path) -> None:
    plt = _plt()
    names = ["ceiling (theoretical)", "mean", "sentiment only", "frozen CLIP ridge", "frozen-only (phase 1)",
             "fine-tuned"]
    values = [r["ceiling_r2"]["theoretical"], r["r2"]["baseline_mean"], r["r2"]["baseline_sentiment_linear"],
              r["r2"]["baseline_frozen_clip_ridge"], r["r2"]["frozen_only"], r["r2"]["fine_tuned"]]
    colours = ["#7f7f7f", "#c7c7c7", "#c7c7c7", "#c7c7c7", "#aec7e8", "#1f77b4"]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    y = range(len(names))
    ax.barh(list(y), [v or 0.0 for v in values], color=colours)
    for i, v in zip(y, values):
        ax.text((v or 0.0) + 0.01, i, fmt(v, 3), va="center", fontsize=7)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test R² (log1p scale)")
    ax.set_title("Quality on the demo set", fontsize=9)
    ax.axvline(0, color="black", lw=0.6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


HARDWARE_KEYS = [("cpu_model", "CPU"), ("cpus_usable", "cores usable"), ("ram_gib", "RAM (GiB)"), ("gpu", "GPU"),
                 ("platform", "OS"), ("python", "Python"), ("torch", "torch"), ("transformers", "transformers"),
                 ("torch_threads", "torch threads")]


def machine_section(results: dict) -> list[str]:
    """One column per distinct machine/software set; then when and at which commit each ran."""
    machines: list[tuple[tuple, list[str]]] = []
    for stem, r in results.items():
        key = tuple(r["machine"].get(k) for k, _ in HARDWARE_KEYS if k != "torch_threads")
        for known, stems in machines:
            if known == key:
                stems.append(stem)
                break
        else:
            machines.append((key, [stem]))
    if not machines:
        return ["No results yet: run `make bench`.", ""]
    header = ["", *[", ".join(f"`{s}`" for s in stems) for _, stems in machines]]
    first = [results[stems[0]]["machine"] for _, stems in machines]
    rows = [[label, *[fmt(m.get(k)) for m in first]] for k, label in HARDWARE_KEYS if any(m.get(k) for m in first)]
    return table(header, rows)


def runs_section(results: dict) -> list[str]:
    rows = []
    for stem, title, script in SECTIONS:
        r = results.get(stem)
        if r is None:
            rows.append([title, f"`{script}`", "not run", "–", "–"])
        else:
            rows.append([title, f"`{script}`", r["machine"].get("date_utc", "–"),
                         f"`{(r['machine'].get('git_commit') or '–')[:12]}`"
                         + ("-dirty" if str(r["machine"].get("git_commit")).endswith("-dirty") else ""),
                         fmt(r["wall_s"], 0)])
    return table(["benchmark", "script", "run at (UTC)", "git commit", "wall time (s)"], rows)


def sec_datapath(r: dict, gpu: dict | None) -> list[str]:
    out = ["Samples/s of one phase-2 train step (CLIP + head trainable, AdamW), fed three ways on the same "
           "batches: the project's `EngagementDataset` + `Collator` DataLoader "
           f"(train_torch's default `--num-workers` = {next(iter(r['presets'].values()))['num_workers']}), "
           "the step alone on batches already in memory (ceiling), and the original style (`CLIPProcessor` per "
           "sample on full-size JPEGs in `__getitem__`, `num_workers=0`). Medians over interleaved repeats; "
           f"torch threads {r.get('torch_threads')}.", ""]
    rows = []
    for p, d in r["presets"].items():
        s, q = d["samples_per_s"], d["ratios"]
        rows.append([f"{p} ({d['params'] / 1e6:.1f}M)", d["batch_size"], f"{d['steps']} × {s['project']['n']}",
                     s["project"]["median"], s["ceiling"]["median"], s["naive"]["median"],
                     q["project_over_ceiling"], q["naive_over_ceiling"], q["project_over_naive"]])
    out += table(["CLIP", "batch", "steps × repeats", "project", "ceiling", "naive", "project/ceiling",
                  "naive/ceiling", "project/naive"], rows)
    return out


def sec_gpu(g: dict | None) -> list[str]:
    if g is None:
        return ["**Not run.** `bench/gpu_train.py` runs on a GPU machine (`OUT=dir python bench/gpu_train.py`); "
                "copy its `gpu_train.json` to `bench/results/` (or `bench/out/`) and re-run `python bench/report.py`.",
                "",
                *table(["device", "project samples/s", "ceiling samples/s", "MFU"],
                       [["H100 (goal >= 3000 samples/s)", "not run", "not run", "not run"]])]
    s, f, m, pk = g["samples_per_s"], g["flops"], g["mfu"], g["peak_tflops"]
    out = [f"{g['device']}, CUDA {g.get('cuda')}, {g['mixed_precision']} autocast via Accelerate, SDPA attention, "
           f"batch {g['model']['batch_size']}, {g['model']['num_workers']} loader workers, "
           f"{g['data']['train_posts']:,} train posts ({g['model']['batches_per_epoch']} batches/epoch; whole "
           "epochs timed after a warm-up epoch, through `train_torch.train_one_epoch`). Data generation + "
           f"preprocessing took {g['data']['seconds_to_ready']} s; the whole script {g['wall_s']} s.", ""]
    out += table(["", "samples/s (median)", "repeats"], [
        ["project: DataLoader + step", s["project"]["median"], ", ".join(fmt(v, 0) for v in s["project"]["values"])],
        ["ceiling: step on on-device batches", s["ceiling"]["median"],
         ", ".join(fmt(v, 0) for v in s["ceiling"]["values"])],
        ["loader alone (no training)", s["loader_only"]["median"],
         ", ".join(fmt(v, 0) for v in s["loader_only"]["values"])]])
    out += table(["FLOPs and MFU", "value"], [
        [f"training GFLOP/sample (fwd+bwd, {f['text_tokens']:.0f} text tokens, dynamic padding)",
         f["gflop_per_sample"]],
        [f"training GFLOP/sample at {f['full_text_tokens']} text tokens", f["gflop_per_sample_full_text"]],
        ["measured bf16 matmul TFLOP/s", pk["measured_bf16_matmul"]],
        ["MFU of project vs 989 TFLOP/s datasheet", pct(m["project_vs_datasheet"])],
        ["MFU of project vs measured matmul peak", pct(m["project_vs_measured_matmul"])],
        ["MFU of ceiling vs 989 TFLOP/s datasheet", pct(m["ceiling_vs_datasheet"])],
        ["MFU of ceiling vs measured matmul peak", pct(m["ceiling_vs_measured_matmul"])],
        ["project / ceiling", g["ratios"]["project_over_ceiling"]]])
    lo, ce = s["loader_only"]["median"], s["ceiling"]["median"]
    if lo and ce:
        serial = 1 / (1 / lo + 1 / ce)
        out += [f"If loading and the step did not overlap at all, throughput would be 1 / (1/{fmt(lo)} + 1/{fmt(ce)}) "
                f"= {fmt(serial)} samples/s; measured: {fmt(s['project']['median'])}.", ""]
    diag = g.get("loader_diagnostics")
    if diag:
        out += ["Loader variants (`--diagnose`): the same step and workers, two timed epochs each after a warm-up. "
                "*wait* is the time `train_one_epoch` spent blocked on the next batch.", ""]
        out += table(["loader", "train samples/s", "wait ms/batch", "loader alone samples/s"],
                     [[name, d["train_samples_per_s"], d["wait_ms_per_batch"], d["loader_alone_samples_per_s"]]
                      for name, d in diag.items()])
    return out


def sec_phase1(r: dict) -> list[str]:
    s = r["phase1_seconds"]
    out = [f"`train_torch.py --frozen-epochs {r['frozen_epochs']} --finetune-epochs 0`, tiny CLIP, "
           f"{r['posts']:,} demo posts (splits {r['splits']}). Cached = embedding pass over train/val/test once + "
           "the frozen epochs on the cache; recomputed = `--no-embedding-cache`, CLIP re-run every epoch on "
           "train and val. Seconds from each run's metrics.json, medians over interleaved repeats.", ""]
    out += table(["mode", "phase-1 seconds (median)", "repeats"], [
        ["embedding cache", s["cache"]["median"], ", ".join(fmt(v) for v in s["cache"]["values"])],
        ["recompute every epoch", s["no_cache"]["median"], ", ".join(fmt(v) for v in s["no_cache"]["values"])]])
    out += [f"Recompute / cached: **{fmt(r['speedup_cache'])}x** (no numeric target was set).", ""]
    return out


def sec_preprocess(r: dict) -> list[str]:
    t, m, b = r["throughput"], r["memory"], r["record_bytes"]
    w = r["image_size"]
    out = [f"`preprocess.py` as a subprocess on {w[0]}x{w[1]} JPEGs (posts/s from its meta.json: pool start to "
           "last record written).", ""]
    out += table(["workers", "posts/s (median)", "repeats"], [
        [1, t["posts_per_s"]["workers_1"]["median"], ", ".join(fmt(v) for v in t["posts_per_s"]["workers_1"]["values"])],
        [2, t["posts_per_s"]["workers_2"]["median"], ", ".join(fmt(v) for v in t["posts_per_s"]["workers_2"]["values"])]])
    out += [f"Speedup 2 vs 1 worker: **{fmt(t['speedup_2_vs_1'])}x** on {t['posts']:,} posts.", ""]
    out += table(["posts", "peak RSS, process tree (MiB)", "peak RSS, largest process (MiB)", "seconds"], [
        [m[k]["posts"], m[k]["peak_tree_rss_mib"], m[k]["maxrss_mib"], m[k]["wall_s"]] for k in ("small", "large")])
    out += [f"Peak RSS ratio {m['large']['posts']:,} / {m['small']['posts']:,} posts: "
            f"**{fmt(m['ratio_large_vs_small'], 3)}x** (tree, sampled every 20 ms; largest single process, exact: "
            f"{fmt(m['ratio_maxrss_large_vs_small'], 3)}x). Rows reuse a pool of images under distinct captions.", ""]
    out += table(["records", "bytes/post"], [["pre-resized (shortest edge 224)", b["resized_224"]["bytes_per_post"]],
                                           ["full size", b["full_size"]["bytes_per_post"]]])
    out += [f"Full size / pre-resized: **{fmt(b['full_over_resized'])}x** bytes per post.", ""]
    return out


def sec_serving(r: dict) -> list[str]:
    m = r["model"]
    out = [f"`uvicorn serving.app:app` on 127.0.0.1, load from `{r['load_tool']}`, one multipart POST /predict per "
           f"request ({r['request']['image']}, {r['request']['body_bytes']:,} bytes). Model: {m['preset']} CLIP, "
           f"random weights. Raw forward at batch 1: **{fmt(m['forward_b1_ms'])} ms** (median of "
           f"{len(m['forward_b1_ms_values'])}); forward per post at batch 16: {fmt(m['forward_b16_per_post_ms'])} ms; "
           f"decode + prepare + processor per post: {fmt(m['prepare_ms'])} ms; torch threads {m['torch_threads']}. "
           "req/s is the median over repeats; percentiles are over all of a level's requests.", ""]
    for mode, d in r["modes"].items():
        out += [f"**{mode.replace('_', ' ')}** (`{' '.join(f'{k}={v}' for k, v in d['env'].items())}`)", ""]
        rows = []
        for c in sorted(d["levels"], key=int):
            lv = d["levels"][c]
            rows.append([int(c), lv["rps"], lv["p50_ms"], lv["p95_ms"], lv["p99_ms"], lv["requests"], lv["errors"]])
        out += table(["concurrency", "req/s", "p50 ms", "p95 ms", "p99 ms", "requests", "errors"], rows)
    q = r["ratios"]
    lo, hi = q["levels"]
    out += table(["ratio", "micro-batching on", "micro-batching off"], [
        [f"overhead: p50 at concurrency {lo} / raw forward at batch 1",
         q["overhead_p50_lo_over_forward_b1"]["micro_batching_on"],
         q["overhead_p50_lo_over_forward_b1"]["micro_batching_off"]],
        [f"throughput: req/s at {hi} / at {lo}", q["rps_hi_over_lo"]["micro_batching_on"],
         q["rps_hi_over_lo"]["micro_batching_off"]]])
    if q.get("model_forward_b1_over_b16_per_post") is not None:
        out += [f"The model alone runs {fmt(q['model_forward_b1_over_b16_per_post'])}x faster per post at batch 16 "
                "than at batch 1: the most that micro-batching can add to throughput on this machine.", ""]
    o = r.get("overload")
    if o:
        out += [f"Overload (`{' '.join(f'{k}={v}' for k, v in o['env'].items())}`, concurrency {o['concurrency']}): "
                f"status codes {o['status']}, transport errors {o['transport_errors']}.", ""]
    else:
        out += ["Overload step not run.", ""]
    return out


def sec_quality(r: dict) -> list[str]:
    src = r["source"] if r["source"] != "--run-dir" else f"`--run-dir {r['run_dir']}`"
    p = r.get("pipeline") or {}
    how = (f"default pipeline: {p.get('posts')} demo posts, CLIP `{p.get('clip')}`, train_torch defaults "
           f"{p.get('train_args') or ''}".rstrip() if p else src)
    out = [f"Test split ({r.get('test_posts')} posts), {r.get('scale') or 'log1p scale'}; {how}. The ceiling is "
           "the generator's `Var(f) / (Var(f) + sigma²)` from make_demo_data's meta.json.", ""]
    c, v, s = r["ceiling_r2"], r["r2"], r["share_of_ceiling"]
    rows = [["ceiling, theoretical", c["theoretical"], 1.0 if c["theoretical"] else None],
            ["ceiling, empirical (f on the generated set)", c["empirical"], None],
            ["baseline: train mean", v["baseline_mean"], s["baseline_mean"]],
            ["baseline: sentiment only (linear)", v["baseline_sentiment_linear"], s["baseline_sentiment_linear"]],
            ["baseline: ridge on frozen CLIP embeddings", v["baseline_frozen_clip_ridge"],
             s["baseline_frozen_clip_ridge"]],
            ["frozen-only (best phase-1 model)", v["frozen_only"], s["frozen_only"]],
            ["fine-tuned (best model)", v["fine_tuned"], s["fine_tuned"]]]
    out += table(["model", "test R²", "share of ceiling"], [[a, fmt(b, 4), fmt(cc, 3)] for a, b, cc in rows])
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def load_results(in_dir: Path) -> dict:
    results = {}
    for stem, _, _ in SECTIONS:
        path = in_dir / f"{stem}.json"
        if path.is_file():
            results[stem] = json.loads(path.read_text())
    return results


def build(results: dict, md_path: Path, plots: Path) -> str:
    plots.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "",
             "Written by `bench/report.py` from the JSON that the scripts in `bench/` write to `bench/out/`; do not "
             "edit by hand. `make bench` re-runs every CPU table below (the GPU table comes from `bench/gpu_train.py`, "
             "run on a GPU machine). Every comparison is a ratio measured in one run on one machine; figures are "
             "medians over repeats.", ""]
    smoke = [stem for stem, r in results.items() if r.get("smoke")]
    if smoke:
        lines += [f"> **SMOKE RUN** ({', '.join(smoke)}): tiny sizes that only check the scripts run. "
                  "The numbers below mean nothing.", ""]
    lines += ["## Goals", ""]
    lines += table(["benchmark", "goal", "target", "measured", "status"], goal_rows(results))
    lines += ["## Machine", ""]
    lines += machine_section(results)
    lines += runs_section(results)
    for stem, title, script in SECTIONS:
        lines += [f"## {title}", ""]
        r = results.get(stem)
        if stem == "gpu_train":
            lines += sec_gpu(r)
            continue
        if r is None:
            lines += [f"Not run: `python {script}`.", ""]
            continue
        lines += {"train_datapath": lambda: sec_datapath(r, results.get("gpu_train")), "phase1": lambda: sec_phase1(r),
                  "preprocess": lambda: sec_preprocess(r), "serving": lambda: sec_serving(r),
                  "quality": lambda: sec_quality(r)}[stem]()
        plot = {"train_datapath": ("train_datapath.png", lambda p: plot_datapath(r, results.get("gpu_train"), p)),
                "serving": ("serving.png", lambda p: plot_serving(r, p)),
                "quality": ("quality.png", lambda p: plot_quality(r, p))}.get(stem)
        if plot:
            path = plots / plot[0]
            plot[1](path)
            lines += [f"![{title}]({rel(path, md_path)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(ReportConfig, argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    results = load_results(Path(cfg.in_dir))
    if "gpu_train" not in results and Path(cfg.gpu_json).is_file():
        results["gpu_train"] = json.loads(Path(cfg.gpu_json).read_text())
        log.info("GPU result from %s", cfg.gpu_json)
    log.info("results found: %s", ", ".join(results) or "none")
    md = Path(cfg.md)
    text = build(results, md, Path(cfg.plots_dir))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    log.info("wrote %s", md)
    return md


if __name__ == "__main__":
    main()
