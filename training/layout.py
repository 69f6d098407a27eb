"""Where training reads and writes by default: a classic script layout, relative to the current directory.

    data/posts.csv               your posts table (preprocess.py's default --input)
    data/processed/              preprocess.py's output: train_torch.py's default --data
    runs/20261207-183000/        one run of train_torch.py (its default --out: a new timestamped dir)
    runs/latest -> 20261207-...  the newest *finished* run; the server's default MODEL_DIR is runs/latest/model

As in a classic script repo, these paths are relative to the current directory: run the
scripts from the repository root, or pass ``--data``/``--out``. A run whose directory sits
directly in ``runs/`` (the default, or ``--out runs/NAME``) becomes ``runs/latest`` once its
artifact and metrics are written; a run elsewhere (``--out runs/demo/run``) leaves it alone.
Nothing here imports torch: ``check_data_dir`` answers before the heavy imports.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from training.config import DEFAULT_DATA, LATEST, RUNS_DIR, DataRefused

log = logging.getLogger(__name__)

TIMESTAMP = "%Y%m%d-%H%M%S"  # local time, sorts by age: runs/20261207-183000
README_SECTION = '"On your own data"'


def check_data_dir(data: str) -> None:
    """Refuse a ``--data`` dir that holds no finished preprocessing output, saying where the
    data should come from (preprocessing writes ``meta.json`` last)."""
    from data_preprocessing.records import META_NAME

    if (Path(data) / META_NAME).is_file():
        return
    if data == DEFAULT_DATA:
        raise DataRefused(
            f"no preprocessed data in {DEFAULT_DATA}/ (the default --data, relative to the current directory "
            f"{Path.cwd()}). Put your posts table at data/posts.csv and run `python data_preprocessing/"
            f"preprocess.py` (it writes {DEFAULT_DATA}/), or pass --data DIR with a preprocess.py output. "
            f"See the README, section {README_SECTION}.")
    raise DataRefused(
        f"--data {data}: no {META_NAME} there, so it is not a finished preprocess.py output. Run `python "
        f"data_preprocessing/preprocess.py --out {data}` first, or pass another --data. See the README, "
        f"section {README_SECTION}.")


def new_run_dir(runs: str | os.PathLike = RUNS_DIR, now: datetime | None = None) -> Path:
    """Create and return a new ``runs/<timestamp>`` (``-2``, ``-3``, ... when two runs start
    in the same second): ``mkdir`` claims it, so two runs never share one."""
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime(TIMESTAMP)
    for n in range(1, 1000):
        path = runs / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{runs}: 999 runs named {stamp}-*; pass --out")


def publish_latest(run_dir: str | os.PathLike, runs: str | os.PathLike = RUNS_DIR) -> Path | None:
    """Point ``runs/latest`` at ``run_dir`` when it sits directly in ``runs``; returns the link.

    The link is relative (``latest -> 20261207-183000``), so the runs folder can move. It is
    replaced atomically: a new link under a temporary name, then ``os.replace``, so a reader
    (a server starting) sees the old run or the new one, never no link. Call it only once
    the run's artifact and metrics are written.
    """
    runs, run_dir = Path(runs), Path(run_dir).resolve()
    if not runs.is_dir() or run_dir.parent != runs.resolve():
        return None
    link, tmp = runs / LATEST, runs / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)  # a stale one from a killed run of this pid
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError as e:  # e.g. runs/latest is a real directory, or no symlinks on this filesystem
        tmp.unlink(missing_ok=True)
        log.warning("could not point %s at %s: %s", link, run_dir.name, e)
        return None
    return link
