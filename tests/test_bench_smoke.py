"""Smoke test of the benchmark suite (bench/): every CPU script runs end to end in its
``--smoke`` mode and writes the JSON keys that bench/report.py reads; the report renders.

No timing is asserted: smoke sizes measure nothing. The load tool is hey where it is
installed and the built-in Python generator otherwise, so this passes on a bare machine.
"""

from __future__ import annotations

import json

import pytest

# Keys report.py reads from each result, plus the common envelope of write_result.
ENVELOPE = ("benchmark", "smoke", "wall_s", "machine", "config", "goals")
EXPECTED = {
    "preprocess": ("image_size", "throughput", "memory", "record_bytes"),
    "train_datapath": ("torch_threads", "posts", "presets"),
    "phase1": ("frozen_epochs", "phase1_seconds", "speedup_cache", "runs", "splits"),
    "quality": ("ceiling_r2", "r2", "share_of_ceiling", "baselines", "test", "test_after_frozen"),
    "serving": ("load_tool", "model", "request", "modes", "overload", "ratios"),
}
MACHINE = ("cpu_model", "cpus_usable", "ram_gib", "torch", "transformers", "date_utc", "git_commit")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from bench import run_all

    out = tmp_path_factory.mktemp("bench_smoke")
    result = run_all.main(["--smoke", "--in-process", "--out-dir", str(out)])
    return out, result, {name: json.loads((out / f"{name}.json").read_text()) for name in EXPECTED}


def test_every_benchmark_writes_its_keys(smoke):
    _, result, results = smoke
    assert set(result["seconds"]) == set(EXPECTED)
    for name, keys in EXPECTED.items():
        r = results[name]
        missing = [k for k in (*ENVELOPE, *keys) if k not in r]
        assert not missing, f"{name}.json lacks {missing}"
        assert r["benchmark"] == name and r["smoke"] is True
        assert all(k in r["machine"] for k in MACHINE), r["machine"]
        for g in r["goals"]:
            assert set(g) >= {"goal", "measured", "op", "target", "met"}
            assert g["met"] in (True, False, None)


def test_figures_are_filled_in(smoke):
    _, _, r = smoke
    tiny = r["train_datapath"]["presets"]["tiny"]
    assert all(tiny["samples_per_s"][v]["median"] > 0 for v in ("project", "ceiling", "naive"))
    assert tiny["ratios"]["project_over_ceiling"] > 0
    assert r["phase1"]["phase1_seconds"]["cache"]["median"] > 0
    assert r["phase1"]["phase1_seconds"]["no_cache"]["median"] > 0
    pre = r["preprocess"]
    assert pre["throughput"]["speedup_2_vs_1"] > 0
    assert pre["memory"]["large"]["peak_tree_rss_mib"] > 0
    # Full-size 640x480 records hold more pixels than 224 px ones, whatever the timing.
    assert pre["record_bytes"]["full_over_resized"] > 1
    q = r["quality"]
    assert q["ceiling_r2"]["theoretical"] is not None and 0 < q["ceiling_r2"]["theoretical"] < 1
    assert set(q["r2"]) == {"baseline_mean", "baseline_sentiment_linear", "baseline_frozen_clip_ridge",
                            "frozen_only", "fine_tuned"}
    s = r["serving"]
    on = s["modes"]["micro_batching_on"]["levels"]
    assert set(on) == {"1", "4"}
    # Nominal load is far below the queue: every request answered 200.
    assert all(lv["errors"] == 0 and lv["status"].get("200", 0) > 0 for lv in on.values())
    assert s["model"]["forward_b1_ms"] > 0
    assert s["overload"]["requests"] > 0 and s["overload"]["transport_errors"] == 0


def test_report_renders_goals_tables_and_plots(smoke, tmp_path):
    from bench import report

    out, result, _ = smoke
    md = (out / "BENCHMARKS.md").read_text()
    assert result["md"] == str(out / "BENCHMARKS.md")
    assert "SMOKE RUN" in md and "## Goals" in md and "## Machine" in md
    assert "MET" in md
    for plot in ("train_datapath.png", "serving.png", "quality.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    # Without any GPU result the GPU rows say "not run" instead of failing.
    md2 = report.main(["--in-dir", str(out), "--md", str(tmp_path / "B.md"), "--plots-dir", str(tmp_path / "p"),
                       "--gpu-json", str(tmp_path / "absent.json")]).read_text()
    assert "1b. Training on GPU" in md2 and "not run" in md2


def test_load_summary_counts_unanswered_requests_as_errors():
    from bench.serve_bench import level_summary, percentile_ms

    assert percentile_ms([0.010, 0.020, 0.030, 0.040], 50) == 20.0
    assert percentile_ms([0.010, 0.020, 0.030, 0.040], 99) == 40.0
    assert percentile_ms([], 50) is None
    # 10 sent, 8 answered (two 503s among them): 2 transport errors + 2 non-200s.
    run = {"lat_s": [0.01] * 8, "status": [200] * 6 + [503] * 2, "sent": 10, "wall_s": 2.0}
    s = level_summary([run])
    assert s["transport_errors"] == 2 and s["errors"] == 4
    assert s["status"] == {"200": 6, "503": 2}
    assert s["rps"] == 3.0  # successful responses per second
