"""What every benchmark script shares: the machine, repeat statistics, goals, result files
and cached inputs (demo posts, record files, CLIP checkpoints).

Results are one JSON file per script in ``bench/out/`` (git-ignored), each holding the
machine it ran on, so ``bench/report.py`` can write BENCHMARKS.md from them alone.
Inputs that take long to make (the demo set, a ViT-B/32-shaped checkpoint) are cached
under ``bench/out/work/`` and reused while their generator and cleaning versions match.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from common.config import REPO_ROOT, git_commit, write_json_atomic

log = logging.getLogger(__name__)

BENCH_DIR = REPO_ROOT / "bench"
OUT_DIR = BENCH_DIR / "out"
WORK_SUBDIR = "work"  # cached inputs, under the out dir


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, cores, RAM, library versions, date and commit of this run."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    if "torch" in sys.modules:  # only describe threads/GPU if the script already paid the import
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------
# Statistics and goals
# ---------------------------------------------------------------------------------------


def summarize(values: Sequence[float], digits: int = 4) -> dict:
    """Median (the figure we report), min, max and every repeat's value."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(statistics.median(vals), digits), "min": round(min(vals), digits),
            "max": round(max(vals), digits), "n": len(vals), "values": [round(v, digits) for v in vals]}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def goal(name: str, measured: float | None, op: str, target: float, unit: str = "", note: str = "") -> dict:
    """One goal line for BENCHMARKS.md: MET / NOT MET is decided here, from the figure."""
    if measured is None:
        met = None
    elif op == ">=":
        met = measured >= target
    elif op == "<=":
        met = measured <= target
    elif op == ">":
        met = measured > target
    elif op == "==":
        met = measured == target
    else:
        raise ValueError(f"unknown goal operator {op!r}")
    return {"goal": name, "measured": measured, "op": op, "target": target, "unit": unit, "met": met,
            "note": note}


def repeat_interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run ``variants`` round-robin ``repeats`` times (A B C A B C ...), so a slow patch of
    machine noise hits every variant alike and the ratios stay fair."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            value = fn()
            out[name].append(value)
            log.info("repeat %d/%d %s: %.4g", r + 1, repeats, name, value)
    return out


# ---------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------


def write_result(out_dir: str | os.PathLike, name: str, payload: dict, *, smoke: bool, t_start: float,
                 config: dict | None = None) -> Path:
    """Write ``OUT/{name}.json``: the payload plus machine, config, smoke flag and wall time."""
    obj = {
        "benchmark": name,
        "smoke": smoke,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": machine_info(),
        "config": config or {},
        **payload,
    }
    path = Path(out_dir) / f"{name}.json"
    write_json_atomic(path, obj)
    log.info("wrote %s (%.1f s)", path, obj["wall_s"])
    return path


def work_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / WORK_SUBDIR
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------
# Cached inputs
# ---------------------------------------------------------------------------------------


@dataclass
class DemoData:
    posts_dir: Path  # posts.csv, images/, meta.json (generator meta with the R² ceiling)
    data_dir: Path  # preprocess.py output: {train,val,test}.pkl/.idx, meta.json
    posts_meta: dict
    data_meta: dict

    @property
    def posts_csv(self) -> Path:
        return self.posts_dir / "posts.csv"


def demo_posts(root: Path, n: int, seed: int, workers: int = 0) -> tuple[Path, dict]:
    """make_demo_data posts under ``root``, regenerated only if n/seed/version changed."""
    from data_preprocessing.make_demo_data import GENERATOR_VERSION, make_posts

    posts_dir = root / f"demo-n{n}-s{seed}"
    meta_path = posts_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("n"), meta.get("seed"), meta.get("generator_version")) == (n, seed, GENERATOR_VERSION):
            log.info("reusing demo posts %s", posts_dir)
            return posts_dir, meta
    log.info("generating %d demo posts into %s", n, posts_dir)
    meta = make_posts(posts_dir, n=n, seed=seed, workers=workers, progress=False, overwrite=True)
    return posts_dir, meta


def preprocessed(posts_csv: Path, data_dir: Path, workers: int = 2, resize_shortest_edge: int = 224,
                 extra_args: Sequence[str] = ()) -> dict:
    """preprocess.py output for ``posts_csv`` in ``data_dir``; reused if the source hash,
    cleaning version and resize match a previous complete run."""
    from data_preprocessing import preprocess
    from data_preprocessing.prepare import CLEANING_VERSION

    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("cleaning_version") == CLEANING_VERSION
                and meta.get("source", {}).get("sha256") == preprocess.sha256_file(posts_csv)
                and meta.get("image_size_policy", {}).get("shortest_edge") == resize_shortest_edge):
            log.info("reusing records %s", data_dir)
            return meta
    argv = ["--input", str(posts_csv), "--out", str(data_dir), "--workers", str(workers),
            "--resize-shortest-edge", str(resize_shortest_edge), "--no-progress", *extra_args]
    preprocess.main(argv)
    return json.loads(meta_path.read_text())


def demo_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, workers: int = 2) -> DemoData:
    """The demo set every training benchmark shares (posts + 224 px records), cached."""
    posts_dir, posts_meta = demo_posts(work_dir(out_dir), n, seed, workers)
    data_dir = posts_dir / "records-224"
    data_meta = preprocessed(posts_dir / "posts.csv", data_dir, workers=workers)
    return DemoData(posts_dir, data_dir, posts_meta, data_meta)


def clip_checkpoint(out_dir: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """A random-init CLIP (``tiny`` or ``b32``) from models/tiny_clip.py, cached by preset."""
    from models.tiny_clip import build_tiny_clip

    path = work_dir(out_dir) / f"clip-{preset}-s{seed}"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        log.info("reusing %s CLIP %s", preset, path)
        return path
    t0 = time.perf_counter()
    build_tiny_clip(path, preset=preset, seed=seed)
    log.info("built %s CLIP in %.1f s", preset, time.perf_counter() - t0)
    return path


# ---------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------


def python_cmd(script: str, *args: str) -> list[str]:
    """``python path/to/script.py args...`` with this interpreter (the venv's)."""
    return [sys.executable, str(REPO_ROOT / script), *map(str, args)]


def run_measured(cmd: Sequence[str], log_path: Path, env: dict | None = None, interval_s: float = 0.02,
                 timeout_s: float = 3600.0) -> dict:
    """Run ``cmd`` and return wall time, exit status and peak memory.

    ``peak_tree_rss_mib``: the largest sum of RSS over the process and all its
    descendants (workers), sampled every ``interval_s`` -- the real footprint.
    ``maxrss_mib``: the kernel's exact peak RSS of the single largest process among the
    child and the descendants it waited for (``wait4`` rusage).
    """
    import psutil  # an accelerate dependency, so always installed with requirements.txt

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=log_fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, **(env or {})})
        ps = psutil.Process(proc.pid)
        peak = 0
        while True:
            # wait4 with WNOHANG reaps the child ourselves, so its rusage is not lost.
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            try:
                procs = [ps, *ps.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak = max(peak, total)
            except psutil.NoSuchProcess:
                pass
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
            time.sleep(interval_s)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}; log {log_path}:\n{tail}")
    return {"wall_s": round(wall, 3), "peak_tree_rss_mib": round(peak / 2**20, 1),
            "maxrss_mib": round(rusage.ru_maxrss / 1024, 1)}
