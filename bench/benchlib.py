"""What the benchmark scripts share: the machine, repeats, goals, tables, result files
(``OUT/<name>.json``), cached inputs (``OUT/work/``) and phase 2 of training."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from common.config import REPO_ROOT, config_dict, field, git_commit, parse_config, setup_logging, write_json_atomic

log = logging.getLogger(__name__)

OUT_DIR = REPO_ROOT / "bench" / "out"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "==": operator.eq}
PHOTO_SIZE = (640, 480)  # (W, H) of the photo pool: a typical downscaled phone upload


def machine_info() -> dict:
    """CPU, usable cores, RAM, library versions, date and commit of this run."""
    cpu = [line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")]
    info = {"cpu_model": cpu[0] if cpu else platform.machine(), "cpus_usable": len(os.sched_getaffinity(0)),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            **{pkg: metadata.version(pkg) for pkg in ("torch", "transformers")},
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}
    torch = sys.modules.get("torch")  # threads and GPU only where the script already imported torch
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class BenchConfig:
    """The options every benchmark script takes; each script's config adds its own."""

    out_dir: str = field(str(OUT_DIR), help="where the result JSON and the cached inputs (work/) go")
    smoke: bool = field(False, help="toy sizes: checks the script runs; the numbers mean nothing")


def start(config_cls, argv: list[str] | None, doc: str):
    """Every script's preamble: parse the config (``--help`` shows ``doc``'s title), log it, start the clock."""
    cfg = parse_config(config_cls, argv, description=doc.strip().splitlines()[0])
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    return cfg, time.perf_counter()


def summarize(values: Sequence[float], digits: int = 4) -> dict:
    """Median (the figure we report) and every repeat's value."""
    vals = [round(float(v), digits) for v in values]
    return {"median": round(statistics.median(vals), digits) if vals else None, "n": len(vals), "values": vals}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def goal(name: str, measured: float | None, op: str, target: float, unit: str = "", note: str = "") -> dict:
    """One row of BENCHMARKS.md's goal table; ``met`` is decided here, from the figure (None: not measured)."""
    met = None if measured is None else bool(OPS[op](measured, target))
    return {"goal": name, "measured": measured, "op": op, "target": target, "unit": unit, "met": met, "note": note}


def table(header: list[str], rows: list[list], note: str = "") -> dict:
    """One table of a script's BENCHMARKS.md section; run_all.py formats the numbers, ``note`` goes under it."""
    return {"header": header, "rows": rows, "note": note}


def timed(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()`` took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat_interleaved(variants: dict[str, Callable[[], float]], repeats: int, digits: int) -> dict[str, dict]:
    """Run the variants round-robin (A B C A B C ...), so machine noise hits all alike; ``summarize`` each."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            out[name].append(fn())
            log.info("repeat %d/%d %s: %.4g", r + 1, repeats, name, out[name][-1])
    return {k: summarize(v, digits) for k, v in out.items()}


def matmul_tflops(n: int, device: str = "cpu", dtype=None, iters: int = 10, repeats: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul on ``device`` (fp32 unless ``dtype``), best of ``repeats``: the
    realistic peak that a model's matmuls are measured against."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up (and is then beaten)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 * iters / best / 1e12, 4)


def counted_flops(fn: Callable[[], object]) -> float:
    """The FLOPs torch's ``FlopCounterMode`` counts in ``fn()``: matmuls and convolutions (not CPU attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def write_result(name: str, payload: dict, cfg, t_start: float, doc: str) -> Path:
    """``cfg.out_dir/{name}.json``: the payload, the machine, config, smoke flag, wall time and ``about``, the
    script's docstring past its title as one Markdown paragraph (its BENCHMARKS.md section's text)."""
    about = " ".join(doc.partition("\n\n")[2].split()).replace("``", "`")
    obj = {"benchmark": name, "smoke": cfg.smoke, "wall_s": round(time.perf_counter() - t_start, 1),
           "machine": machine_info(), "config": config_dict(cfg), "about": about, **payload}
    path = Path(cfg.out_dir) / f"{name}.json"
    write_json_atomic(path, obj)
    log.info("wrote %s (%.1f s)", path, obj["wall_s"])
    return path


def work_dir(out_dir: str | os.PathLike, *parts: str) -> Path:
    """``OUT/work/...``, made: the cached inputs."""
    path = Path(out_dir, "work", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_posts(out_dir: str | os.PathLike, n: int, seed: int = 0, workers: int = 2) -> Path:
    """make_demo_data posts (posts.csv, images/, meta.json with the R² ceiling), cached by n and seed."""
    from data_preprocessing.make_demo_data import make_posts

    posts = work_dir(out_dir, f"demo-n{n}-s{seed}")
    if not (posts / "meta.json").is_file():  # make_posts writes meta.json last
        make_posts(posts, n=n, seed=seed, workers=workers, progress=False, overwrite=True)
    return posts


def demo_records(out_dir: str | os.PathLike, n: int, seed: int = 0, workers: int = 2) -> Path:
    """preprocess.py's 224 px records of ``demo_posts``; rebuilt when the cleaning version changed."""
    from data_preprocessing import preprocess
    from data_preprocessing.prepare import CLEANING_VERSION

    posts = demo_posts(out_dir, n, seed, workers)
    records = posts / "records-224"
    meta = records / "meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("cleaning_version") != CLEANING_VERSION:
        preprocess.main(["--input", str(posts / "posts.csv"), "--out", str(records), "--workers", str(workers),
                         "--resize-shortest-edge", "224", "--no-progress"])
    return records


def clip_checkpoint(out_dir: str | os.PathLike, preset: str, seed: int = 0) -> Path:
    """A random-init CLIP of a models/tiny_clip.py preset (``tiny``, ``b32``), cached."""
    from models.tiny_clip import build_tiny_clip

    path = work_dir(out_dir) / f"clip-{preset}-s{seed}"
    if not (path / "model.safetensors").is_file():
        build_tiny_clip(path, preset=preset, seed=seed)
    return path


def train_run(out_dir: str | os.PathLike, records: Path, run_dir: Path, *args: str, smoke: bool) -> dict:
    """``train_torch.main(args)`` on the tiny CLIP into a fresh ``run_dir``; its metrics.json."""
    from training import train_torch

    shutil.rmtree(run_dir, ignore_errors=True)  # train_torch refuses to overwrite a run
    smoke_args = ["--batch-size", "16", "--num-workers", "0"] if smoke else []  # starting workers would dominate
    clip_dir = clip_checkpoint(out_dir, "tiny")
    train_torch.main(["--data", str(records), "--out", str(run_dir), "--clip-model", str(clip_dir), *smoke_args, *args])
    return json.loads((run_dir / "metrics.json").read_text())


def artifact(out_dir: str | os.PathLike, preset: str, timestamp_column: str | None = None) -> Path:
    """A servable model artifact around a random-init CLIP of ``preset`` (cached); with
    ``timestamp_column``, its head also takes that datetime feature (hour and weekday)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from data_preprocessing.features import FeatureColumn, FeatureSchema
    from data_preprocessing.posts import PrepareConfig
    from data_preprocessing.prepare import ResizePolicy
    from models.artifact import CONFIG_FILE, save_artifact
    from models.clip_regressor import CLIPRegressor, TargetTransform

    path = work_dir(out_dir) / (f"artifact-{preset}" + (f"-{timestamp_column}" if timestamp_column else ""))
    if not (path / CONFIG_FILE).is_file():
        clip_dir = clip_checkpoint(out_dir, preset)
        processor = CLIPProcessor.from_pretrained(clip_dir)
        schema = FeatureSchema()
        if timestamp_column:  # fitted on a few times, as preprocessing fits a train split
            column = FeatureColumn(timestamp_column, "datetime")
            times = [column.parse(f"2025-03-{d:02d}T{h:02d}:00") for d in range(3, 10) for h in (8, 13, 19)]
            schema = FeatureSchema.fit((column,), {timestamp_column: times})
        torch.manual_seed(0)
        save_artifact(CLIPRegressor(CLIPModel.from_pretrained(clip_dir), n_features=schema.width), processor,
                      TargetTransform(kind="log1p", mean=4.0, std=1.2), path,  # a plausible likes scale
                      prepare=PrepareConfig(ResizePolicy.from_image_processor(processor.image_processor),
                                            features=schema),
                      extra_config={"run_name": f"bench-{preset}", "note": "random weights, for benchmarks only"})
    return path


def photo_table(out_dir: str | os.PathLike, images: int, rows: int) -> Path:
    """``posts-ROWS.csv`` over a cached pool of ``images`` demo photos fitted to exactly 640x480 (every post
    costs the same to decode), with distinct captions (preprocess.py rejects a repeated image + caption)."""
    from PIL import Image, ImageOps

    src, pool = demo_posts(out_dir, images), work_dir(out_dir, f"photos-n{images}")
    with open(src / "posts.csv", newline="") as fh:
        posts = list(csv.DictReader(fh))
    if not (pool / "posts.csv").is_file():
        for row in posts:
            (pool / row["image_path"]).parent.mkdir(parents=True, exist_ok=True)
            ImageOps.fit(Image.open(src / row["image_path"]).convert("RGB"), PHOTO_SIZE).save(
                pool / row["image_path"], quality=90)
        shutil.copy(src / "posts.csv", pool / "posts.csv")  # last: marks the pool complete
    path = pool / f"posts-{rows}.csv"
    if not path.is_file():
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(posts[0]))
            w.writeheader()
            w.writerows({**posts[i % len(posts)], "description": f"{posts[i % len(posts)]['description']} #{i}"}
                        for i in range(rows))
    return path


def run_measured(cmd: Sequence[str], log_path: Path, interval_s: float = 0.02) -> dict:
    """Run ``cmd`` in the repo root: wall time; the peak RSS of it and its workers summed (sampled), and the
    kernel's exact peak of its largest single process (``maxrss_mib``, from wait4)."""
    import psutil  # an accelerate dependency

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)  # we reap the child, so its rusage is ours
            if pid == proc.pid:
                break
            with contextlib.suppress(psutil.Error):  # a worker that just exited: sample again
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            time.sleep(interval_s)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed; log {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"wall_s": round(wall, 3), "peak_tree_rss_mib": round(peak / 2**20, 1),
            "maxrss_mib": round(rusage.ru_maxrss / 1024, 1)}


class Phase2:
    """Phase 2 of training (CLIP and head trainable) as train_torch sets it up from TrainConfig's defaults."""

    def __init__(self, clip_dir: Path, records_dir: Path, accelerator, batch_size: int, seed: int = 0,
                 compile: bool = False):
        import torch
        from transformers import CLIPProcessor

        from models.clip_regressor import CLIPRegressor, PostBatcher, TargetTransform
        from training.train_torch import (Collator, EngagementDataset, NonFiniteGuard, TrainConfig,
                                          resolve_num_workers, start_phase)

        torch.manual_seed(seed)
        self.model = CLIPRegressor.from_pretrained(str(clip_dir)).to(accelerator.device)  # as train_torch loads it
        self.train = EngagementDataset(records_dir, "train")
        batcher = PostBatcher.from_clip(CLIPProcessor.from_pretrained(clip_dir), self.model.clip.config)
        self.collate = Collator(batcher, TargetTransform.fit(self.train.labels()))
        self.cfg = TrainConfig(data=str(records_dir), out="", frozen_epochs=0, finetune_epochs=1, batch_size=batch_size,
                               compile=compile)
        resolve_num_workers(self.cfg, accelerator)  # train_torch's default for this device
        self.accelerator, self.guard = accelerator, NonFiniteGuard(self.cfg.max_nonfinite_steps)
        self.step, self.optimizer, self.scheduler = start_phase("finetune", self.model, accelerator, self.cfg,
                                                                -(-len(self.train) // batch_size))

    def loader(self, num_workers: int | None = None, pin_memory: bool = False):
        """train_torch's ``make_loader`` over the train split (default: train_torch's ``--num-workers``)."""
        from training.train_torch import make_loader

        return make_loader(self.train, self.cfg.batch_size, self.collate, shuffle_seed=0, pin_memory=pin_memory,
                           num_workers=self.cfg.num_workers if num_workers is None else num_workers)

    def samples_per_s(self, batches, steps: int, warmup: int = 0, train: bool = True) -> float:
        """samples/s of ``steps`` train steps (``train=False``: batches drawn, nothing else) after ``warmup``
        untimed ones from the same iterator (a loader keeps prefetching); the GPU finishes inside the clock."""
        import torch

        it, samples = iter(batches), [0]
        sync = torch.cuda.synchronize if self.accelerator.device.type == "cuda" else lambda: None
        run = self.run if train else lambda b, desc="": [x["target"].sum().item() for x in b]  # .item(): on device

        def timed():  # counts what was timed: the last batch of an epoch may be short
            for b in itertools.islice(it, steps):
                samples[0] += len(b["target"])
                yield b

        run(itertools.islice(it, warmup))
        sync()
        t0 = time.perf_counter()
        run(timed())
        sync()
        return samples[0] / (time.perf_counter() - t0)

    def run(self, batches, desc: str = "bench") -> None:
        """``train_torch.train_one_epoch`` over ``batches`` (any iterable of batches)."""
        from training.train_torch import train_one_epoch

        train_one_epoch(self.step, batches, self.optimizer, self.scheduler, self.accelerator, self.guard,
                        max_grad_norm=self.cfg.max_grad_norm, desc=desc)
