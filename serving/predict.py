"""Score a whole posts table with a trained model: predictions, intervals and contributions.

    python serving/predict.py --model RUN_DIR/model --input posts.csv --out predictions.csv
    torchrun --nproc_per_node 2 serving/predict.py ...        # or accelerate launch: same output

Input: the table formats and column flags of ``preprocess.py`` (CSV or JSONL; image paths
relative to the table's folder), plus every feature column the model was trained with. The
label column is optional: when the table has it, the metrics are printed and written too.

Each post goes through ``posts.prepare_post`` with the model's own ``PrepareConfig`` and
the model's ``PostBatcher``: exactly the preparation of training and of ``/predict``. Rows
are read once (a few short strings a row), prepared and batched in DataLoader workers while
the model runs, and written as they come, so memory does not grow with the images.

Output ``--out``, one line per kept row, in row order: ``row``, ``label`` (when present),
``pred_engagement`` (label units), ``pred_score`` (model scale), ``low_L``/``high_L`` for
each conformal level ``L``, and ``contrib_<group>`` for image, caption, sentiment and each
feature column (model scale; they sum to ``pred_score - reference_score``). Rows that
cannot be scored go to ``OUT.rejects.csv`` with preprocessing's reason codes
(``missing_path``, ``invalid_feature``, the image codes); a bad label is no reject here, it
only leaves the row out of the metrics. ``kept + rejected == rows read``, and the exit
status follows preprocessing: 1 when more than ``--max-reject-frac`` of the rows are rejected.

Several processes: fixed batches of consecutive rows are dealt out round-robin, each rank
writes its part, and rank 0 merges them by row. A batch holds the same rows whatever the
number of processes, so the merged output equals a one-process run's, line for line (with
the same threads per process: BLAS thread counts can move the last digits).
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.config import bar_disabled, config_dict, field, parse_config, setup_logging, write_json_atomic
from data_preprocessing.features import FeatureError
from data_preprocessing.posts import prepare_post
from data_preprocessing.prepare import ImageError
from data_preprocessing.preprocess import parse_label, read_table, resolve_image_path, write_rejects
from models.runtime import RUNTIMES

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Score a posts table (CSV/JSONL) with a trained model artifact."""

    model: str = field(help="model artifact directory (RUN_DIR/model)")
    input: str = field(help="posts table: .csv, or .jsonl/.ndjson")
    out: str = field(help="predictions CSV to write (rejects go to OUT.rejects.csv, metrics to OUT.metrics.json)")
    image_col: str = field("image_path", help="column with the image path")
    text_col: str = field("description", help="column with the raw caption")
    label_col: str = field("engagement", help="label column; optional: used for metrics when the table has it")
    rows_of: str | None = field(None, help="score only the rows of a preprocess.py split: DATA_DIR:SPLIT, "
                                           "e.g. runs/demo/data:test")
    batch_size: int = field(16, help="posts per forward pass")
    num_workers: int = field(1, help="DataLoader workers that decode and prepare posts")
    runtime: str = field("torch", choices=RUNTIMES,
                         help="who computes the CLIP embeddings, as the server's RUNTIME: bf16 is fast on CPUs "
                              "with AMX or AVX512_BF16; onnx needs `python -m models.export_onnx MODEL` first (CPU only); "
                              "int8 needs it with `--quantize int8` and moves scores more (README)")
    max_reject_frac: float = field(0.2, help="exit 1 when more than this fraction of rows is rejected")
    show: int = field(3, help="print the top and bottom N posts with their intervals and main contribution "
                               "(each post once, ranked, when there are at most 2N)")
    progress: bool = field(True, help="show a progress bar (on a terminal)")

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or not 0 <= self.max_reject_frac <= 1:
            raise ValueError("--batch-size >= 1, --num-workers >= 0 and --max-reject-frac in [0, 1]")


class TableRows(Dataset):
    """Row ``i`` of the table -> ``(row, Post)`` or ``(row, (reason, detail))``, in a worker."""

    def __init__(self, rows: list[tuple], prep):
        self.rows, self.prep = rows, prep  # (row, resolved path or "", raw caption, raw feature cells)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row, path, caption, features = self.rows[i]
        if path == "":
            return row, ("missing_path", "no image path given")
        try:
            return row, prepare_post(path, caption, features, self.prep)
        except (ImageError, FeatureError) as e:
            return row, (e.reason, e.message)
        except Exception as e:  # noqa: BLE001 - a decoder failing on a damaged header is a bad image
            return row, ("corrupt", f"could not open image: {type(e).__name__}: {e}")


class Batches:
    """Collate: the good posts become model tensors (in the worker), the bad ones rejects."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __call__(self, items):
        good = [(row, p) for row, p in items if not isinstance(p, tuple)]
        rejects = [(row, *p) for row, p in items if isinstance(p, tuple)]
        batch = self.batcher([p for _, p in good]) if good else None
        return [row for row, _ in good], batch, rejects


def read_rows(cfg: PredictConfig, prep) -> tuple[list[tuple], list | None, list]:
    """(rows for TableRows, raw labels or None, raw image cells) of the table."""
    path = Path(cfg.input).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"error: input file not found: {path}")
    names = prep.features.names
    wanted = {cfg.image_col: "--image-col", cfg.text_col: "--text-col", cfg.label_col: "--label-col",
              **{n: "a feature column of the model" for n in names}}
    table = read_table(path, wanted, optional=(cfg.label_col,))
    images = table[cfg.image_col]
    keep = range(len(images))
    if cfg.rows_of:
        keep = sorted(split_rows(cfg.rows_of))
    rows = []
    for r in keep:
        raw = "" if images[r] is None else str(images[r]).strip()
        rows.append((r, resolve_image_path(raw, path.parent) if raw else "", table[cfg.text_col][r],
                     {n: table[n][r] for n in names}))
    return rows, table.get(cfg.label_col), images


def split_rows(spec: str) -> set[int]:
    """The input rows of one split of a preprocess.py output, from ``DATA_DIR:SPLIT``."""
    from data_preprocessing.records import RecordReader

    data_dir, _, split = spec.rpartition(":")
    return {rec.row for rec in RecordReader(Path(data_dir) / f"{split}.pkl")}


def columns(loaded) -> list[str]:
    levels = list((loaded.calibration.half_widths if loaded.calibration else {}))
    groups = ["image", "caption", "sentiment", *loaded.prepare.features.names] if loaded.reference else []
    return (["row", "label", "pred_engagement", "pred_score"] + [f"{e}_{lv}" for lv in levels for e in ("low", "high")]
            + [f"contrib_{g}" for g in groups] + (["reference_score"] if groups else []))


def score_rows(cfg: PredictConfig, loaded, rows: list[tuple], labels, accelerator, part: Path) -> list[tuple]:
    """Score this rank's batches into ``part`` (CSV without header); returns its rejects."""
    from tqdm.auto import tqdm

    batches = [list(range(i, min(i + cfg.batch_size, len(rows)))) for i in range(0, len(rows), cfg.batch_size)]
    mine = batches[accelerator.process_index::accelerator.num_processes]
    loader = DataLoader(TableRows(rows, loaded.prepare), batch_sampler=mine, collate_fn=Batches(loaded.batcher),
                        num_workers=cfg.num_workers)
    rejects, levels = [], list((loaded.calibration.half_widths if loaded.calibration else {}))
    with open(part, "w", newline="") as fh:
        w = csv.writer(fh)
        for row_ids, batch, bad in tqdm(loader, desc="score", unit="batch",
                                        disable=bar_disabled(cfg.progress and accelerator.is_main_process)):
            rejects += bad
            if batch is None:
                continue
            out = loaded.explain_batch(batch)
            for j, r in enumerate(row_ids):
                label = parse_label(labels[r])[0] if labels is not None else None
                line = [r, "" if label is None else repr(label), repr(float(out.engagement[j])), repr(float(out.score[j]))]
                line += [repr(float(x[j])) for lv in levels for x in out.intervals[lv]]
                if out.contributions is not None:
                    line += [repr(float(c)) for c in out.contributions[j]] + [repr(out.reference_score)]
                w.writerow(line)
    return rejects


def merge_parts(parts: list[Path], out: Path, header: list[str]) -> None:
    """Rank parts (each in row order) -> one CSV in row order."""
    handles = [open(p, newline="") for p in parts]
    try:
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(heapq.merge(*(csv.reader(h) for h in handles), key=lambda line: int(line[0])))
    finally:
        for h in handles:
            h.close()
    for p in parts:
        p.unlink()


def summarize(cfg: PredictConfig, out: Path, loaded, n_rows: int, rejects: list) -> dict:
    """Counts, and metrics and interval coverage where labels exist; printed and written."""
    from models.clip_regressor import regression_metrics

    with open(out, newline="") as fh:
        kept = list(csv.DictReader(fh))
    summary = {"rows_read": n_rows, "kept": len(kept), "rejected": len(rejects)}
    assert summary["kept"] + summary["rejected"] == n_rows, summary
    labelled = [r for r in kept if r.get("label")]
    if labelled:
        z = loaded.target.to_model_scale(torch.tensor([float(r["label"]) for r in labelled], dtype=torch.float64))
        pred = np.array([float(r["pred_score"]) for r in labelled])
        summary["metrics_model_scale"] = regression_metrics(z.numpy(), pred)
        summary["coverage"] = {lv: float(np.mean([float(r[f"low_{lv}"]) <= float(r["label"]) <= float(r[f"high_{lv}"])
                                                  for r in labelled]))
                               for lv in (loaded.calibration.half_widths if loaded.calibration else {})}
    print(f"rows read {n_rows}: scored {len(kept)}, rejected {len(rejects)}")
    if labelled:
        m = summary["metrics_model_scale"]
        print(f"metrics ({len(labelled)} labelled posts, {loaded.target.kind} scale): r2 {m['r2']:.4f} "
              f"rmse {m['rmse']:.4f} spearman {m['spearman']:.4f}; interval coverage "
              + ", ".join(f"{float(lv):.0%} level: {c:.3f}" for lv, c in summary["coverage"].items()))
    print_extremes(kept, cfg.show)
    return summary


def print_extremes(kept: list[dict], n: int) -> None:
    """The top and bottom ``n`` posts by prediction, with their interval and main contribution;
    every post once, ranked, when there are no more than ``2 n`` (top and bottom would overlap)."""
    if not kept or n <= 0:
        return
    ranked = sorted(kept, key=lambda r: float(r["pred_engagement"]), reverse=True)
    contrib = [k for k in kept[0] if k.startswith("contrib_")]
    level = next((k[4:] for k in kept[0] if k.startswith("low_")), None)
    parts = (("top", ranked[:n]), ("bottom", ranked[-n:])) if len(ranked) > 2 * n else (("all", ranked),)
    for title, part in parts:
        print(f"{title} {len(part)} posts by predicted engagement:")
        for r in part:
            iv = f", {float(level):.0%} interval {float(r[f'low_{level}']):,.0f}-{float(r[f'high_{level}']):,.0f}" \
                if level else ""
            main = max(contrib, key=lambda k: abs(float(r[k]))) if contrib else None
            why = f"; main driver {main[8:]} {float(r[main]):+.2f}" if main else ""
            print(f"  row {r['row']}: {float(r['pred_engagement']):,.0f} likes{iv}{why}")


def main(argv: list[str] | None = None) -> int:
    # 1. parse args, one accelerator for devices and processes
    from accelerate import Accelerator

    from models.clip_regressor import load_model

    setup_logging()
    cfg = parse_config(PredictConfig, argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    log.info("config: %s", json.dumps(config_dict(cfg)))
    # 2. the model and its preparation config, then the table's rows
    loaded = load_model(cfg.model, device=accelerator.device, runtime=cfg.runtime)
    rows, labels, images = read_rows(cfg, loaded.prepare)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # 3. every rank scores its batches; rank 0 merges parts and rejects
    part = out.with_name(f".{out.name}.part{accelerator.process_index}")
    rejects = score_rows(cfg, loaded, rows, labels, accelerator, part)
    with open(part.with_suffix(part.suffix + ".rejects.json"), "w") as fh:
        json.dump(rejects, fh)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    parts = [out.with_name(f".{out.name}.part{r}") for r in range(accelerator.num_processes)]
    all_rejects = []
    for p in parts:
        rj = p.with_suffix(p.suffix + ".rejects.json")
        all_rejects += [tuple(x) for x in json.loads(rj.read_text())]
        rj.unlink()
    merge_parts(parts, out, columns(loaded))
    # rejects.csv as preprocessing writes it: row, image path as written, reason, detail
    write_rejects(out.with_name(out.name + ".rejects.csv"),
                  [(r, "" if images[r] is None else images[r], reason, detail) for r, reason, detail in all_rejects])
    # 4. account for every row; metrics where labels exist
    summary = summarize(cfg, out, loaded, len(rows), all_rejects)
    write_json_atomic(out.with_name(out.name + ".metrics.json"), summary)
    if summary["rejected"] > cfg.max_reject_frac * len(rows) or summary["kept"] == 0:
        raise SystemExit(f"error: {summary['rejected']} of {len(rows)} rows rejected (> --max-reject-frac "
                         f"{cfg.max_reject_frac:.0%}); see {out.name}.rejects.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
