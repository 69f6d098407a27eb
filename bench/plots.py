"""BENCHMARKS.md's plots, drawn from the same JSON the report's tables come from.

Three PNGs (matplotlib, Agg: no display needed), each a figure against what bounds it:

- ``train_datapath.png`` (``train_datapath.json``): train-step samples/s through the project's loader, per
  CLIP, under the ceiling line of the same step on in-memory batches;
- ``serving.png`` (``serving.json``): p50/p95 latency and req/s per RUNTIME against concurrency, with each
  runtime's model alone at batch 16 as its throughput's bound;
- ``quality.png`` (``quality.json``): test R² of the fine-tuned model, the frozen phase and the baselines,
  against the generator's R² ceiling.

``write_plots`` draws those whose JSON is there; ``markdown`` links them (and says which were skipped)
relative to the Markdown that shows them. They are report output: ``make bench`` commits them beside
BENCHMARKS.md in ``bench/plots/``; a smoke run writes them to ``OUT/plots/`` beside its own Markdown.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import REPO_ROOT

log = logging.getLogger(__name__)

PLOTS_DIR = REPO_ROOT / "bench" / "plots"  # beside the committed BENCHMARKS.md
TITLES = {"train_datapath": "Training throughput against its ceiling",
          "serving": "Serving latency and throughput per runtime against concurrency",
          "quality": "Quality against the baselines and the ceiling"}


def plots_dir(md: Path) -> Path:
    """The committed folder for the repository's BENCHMARKS.md; else ``plots/`` beside ``md`` (smoke runs)."""
    return PLOTS_DIR if Path(md).resolve() == REPO_ROOT / "BENCHMARKS.md" else Path(md).parent / "plots"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmark machines and CI have no display
    import matplotlib.pyplot as plt

    return plt


def plot_train(r: dict, ax_row) -> None:
    """One panel per CLIP preset: the project's samples/s (median bar, repeats as dots) under its ceiling line."""
    for ax, (name, p) in zip(ax_row, r["presets"].items()):
        sps = p["samples_per_s"]
        project, ceiling = sps["project"], sps["ceiling"]["median"]
        ax.bar([0], [project["median"]], width=0.5, color="tab:blue", label="project: DataLoader + train step")
        ax.plot([0] * len(project["values"]), project["values"], "k.", label="repeats")
        ax.set_title(f"project / ceiling: {project['median'] / ceiling:.1%}", fontsize=10)
        ax.axhline(ceiling, color="tab:red", ls="--", label=f"ceiling: the step on in-memory batches ({ceiling:.4g})")
        ax.set_xlim(-1, 1)
        ax.set_ylim(0, 1.35 * max(ceiling, *project["values"]))  # headroom for the legend above the line
        ax.set_xticks([0], [f"{name} CLIP ({p['params'] / 1e6:.1f}M params), batch {p['batch_size']}"])
        ax.set_ylabel("train samples/s (phase 2: CLIP + head)")
        ax.legend(fontsize=8, loc="upper center", ncol=1)
        ax.grid(axis="y", alpha=0.3)


def plot_serving(r: dict, ax_lat, ax_rps) -> None:
    """Latency (p50 solid, p95 dashed) and req/s per runtime against concurrency; dotted: the raw forward's
    posts/s at batch 16 in its own process, the most micro-batching lets that runtime serve."""
    probe = {"torch": "main"}  # runtime -> its forward probe (the others share the runtime's name)
    for i, (rt, d) in enumerate(r["servers"].items()):
        color, label = f"C{i}", f"{rt} ({d.get('reported_runtime') or rt})"
        levels = sorted(d["levels"].items(), key=lambda kv: int(kv[0]))
        c = [int(k) for k, _ in levels]
        ax_lat.plot(c, [s["p50_ms"] for _, s in levels], "o-", color=color, label=f"{label} p50")
        ax_lat.plot(c, [s["p95_ms"] for _, s in levels], "x--", color=color, alpha=0.6, label=f"{label} p95")
        ax_rps.plot(c, [s["rps"] for _, s in levels], "o-", color=color, label=label)
        fwd = r.get("forward", {}).get(probe.get(rt, rt))
        if fwd and fwd.get("b16_per_post_ms"):
            ax_rps.axhline(1000 / fwd["b16_per_post_ms"], color=color, ls=":", alpha=0.8,
                           label=f"{rt}: model alone, batch 16")
    for ax, ylabel in ((ax_lat, "latency per request, ms (log scale)"), (ax_rps, "throughput, requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.set_xlabel("concurrent clients (hey -c)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_lat.set_yscale("log")
    ax_lat.set_title("POST /predict, 640x480 JPEG: p50 solid, p95 dashed", fontsize=10)
    ax_rps.set_title("dotted: that runtime's model alone at batch 16 (its bound)", fontsize=10)
    runtimes = [line for line in ax_rps.lines if line.get_linestyle() == "-"]  # one colour per runtime, both panels
    ax_rps.legend(runtimes, [line.get_label() for line in runtimes], title="RUNTIME (as served)", fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: clear of the lines


def plot_quality(r: dict, ax) -> None:
    """Test R² per model as bars (baselines grey), the generator's theoretical and empirical ceilings as lines."""
    r2 = {k: v for k, v in r["r2"].items() if v is not None}
    names = [k.removeprefix("baseline_").replace("_", " ") + (" (baseline)" if k.startswith("baseline_") else "")
             for k in r2]
    colors = ["tab:grey" if k.startswith("baseline_") else "tab:cyan" if k == "frozen_only" else "tab:blue" for k in r2]
    ax.barh(range(len(r2)), list(r2.values()), color=colors)
    for i, v in enumerate(r2.values()):
        ax.annotate(f"{v:.3f}", (max(v, 0), i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ceiling = r.get("ceiling_r2") or {}
    for key, ls in (("theoretical", "--"), ("empirical", ":")):
        if ceiling.get(key) is not None:
            ax.axvline(ceiling[key], color="tab:red", ls=ls, label=f"ceiling, {key} ({ceiling[key]:.3f})")
    ax.set_yticks(range(len(r2)), names)
    ax.set_xlabel("test R² (model scale)")
    ax.set_xlim(min(0.0, *r2.values()) - 0.05, 1.0)
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: clear of the bars
    run = Path(r["run_dir"])
    ax.set_title(f"run {run.parent.name}/{run.name}, test split", fontsize=10)


def draw(stem: str, r: dict, path: Path) -> Path:
    """One benchmark's figure, saved to ``path``."""
    plt = _pyplot()
    if stem == "train_datapath":
        fig, axes = plt.subplots(1, len(r["presets"]), figsize=(5.5 * len(r["presets"]), 4.2), squeeze=False)
        plot_train(r, axes[0])
    elif stem == "serving":
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        plot_serving(r, *axes)
    else:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(r["r2"]) + 1.8))
        plot_quality(r, ax)
    fig.suptitle(TITLES[stem] + ("\nSMOKE RUN: toy sizes, the figures mean nothing" if r.get("smoke") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict, out: Path) -> dict[str, Path | None]:
    """stem -> its PNG in ``out``, or None where its JSON is missing (that plot is skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = {stem: draw(stem, results[stem], out / f"{stem}.png") if stem in results else None for stem in TITLES}
    for stem in (s for s, p in drawn.items() if p is None):  # an older run's PNG would not match this report
        (out / f"{stem}.png").unlink(missing_ok=True)
    log.info("plots in %s: %s", out,
             ", ".join(f"{s} {'drawn' if p else 'skipped (no JSON)'}" for s, p in drawn.items()))
    return drawn


def markdown(drawn: dict[str, Path | None], md: Path) -> str:
    """The report's Plots section: each drawn PNG linked relative to ``md``, a note for each skipped one."""
    lines = ["## Plots", ""]
    for stem, path in drawn.items():
        if path is None:
            lines += [f"_{TITLES[stem]}: not drawn, no `{stem}.json` (run its benchmark)._", ""]
        else:
            rel = Path(os.path.relpath(Path(path).resolve(), Path(md).resolve().parent)).as_posix()
            lines += [f"![{TITLES[stem]}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"
