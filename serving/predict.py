"""Score a whole posts table with a trained model: predictions, intervals and contributions.

    python serving/predict.py --input posts.csv --out predictions.csv    # model: runs/latest/model
    python serving/predict.py --model RUN_DIR/model --input posts.csv --out predictions.csv
    torchrun --nproc_per_node 2 serving/predict.py ...        # or accelerate launch: same output

``--model`` defaults to ``runs/latest/model`` under the current directory: the newest
finished run of a bare ``python training/train_torch.py``.

Input: a table read by ``data_preprocessing.table`` as preprocessing reads it (CSV with a
sniffed delimiter, or JSONL; image paths relative to the table's folder, or ``http(s)``
URLs downloaded once into ``--image-cache``: a URL cached by preprocessing is never
fetched again, so posts whose links have expired still score). The columns
default to those of the table the model was trained on (the artifact's ``table`` schema),
so a table of the same shape needs no column flags; ``--image-col``/``--text-col``/
``--label-col`` override them. Every feature column of the model must be there. The
label column is optional: when the table has it, the metrics are printed and written
too (``--label-col a+b`` sums count columns, as in preprocessing). The columns are
checked before the model is loaded, so a wrong table fails at once. A timestamp column
takes the same cells as in preprocessing (the model's zone and format); a bad one rejects
its row with ``invalid_datetime``.

Each post goes through ``posts.prepare_post`` with the model's own ``PrepareConfig`` and
the model's ``PostBatcher``: exactly the preparation of training and of ``/predict``. Rows
are read once (a few short strings a row), prepared and batched in DataLoader workers while
the model runs, and written as they come, so memory does not grow with the images.

Output ``--out``, one line per kept row, in row order: ``row``, the ``--keep-cols`` input
columns, ``seen_in_training`` (``true`` when the post's fingerprint, image bytes + raw
caption, is one of the model's train or val posts; empty when the model stores none),
``label`` (when present), ``pred_engagement`` (label units), ``pred_score`` (model
scale), ``low_L``/``high_L`` for each conformal level ``L``, and ``contrib_<group>`` for
image, caption, sentiment and each feature column (model scale; they sum to
``pred_score - reference_score``). Metrics and interval coverage are computed on the
labelled rows that are *not* seen in training, and ``OUT.metrics.json`` holds both
counts. Rows that cannot be scored go to ``OUT.rejects.csv`` with preprocessing's reason
codes (``missing_path``, ``invalid_feature``, ``invalid_datetime``, the download codes
``unsupported_url``/``download_failed``/``download_timeout``/``too_large``, the image codes); a
bad label is no reject here, it only leaves the row out of the metrics. ``kept +
rejected == rows read``, and the exit status follows preprocessing: 1 when more than
``--max-reject-frac`` of the rows are rejected. Cells a spreadsheet would run as formulas
are escaped in both CSVs.

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

from common.config import bar_disabled, config_dict, field, parse_config, setup_logging, write_json_atomic
from data_preprocessing.download import DownloadArgs
from data_preprocessing.features import FeatureError
from data_preprocessing.posts import prepare_post
from data_preprocessing.prepare import ImageError
from data_preprocessing.table import (ColumnMap, PostsTable, ReadOptions, TableError, encoding_field,
                                      file_fingerprint, image_source, max_cell_chars_field, read_table,
                                      resolve_image_sources, safe_csv_writer, sep_field, split_names, write_rejects)

# torch, accelerate and the model code are imported after the arguments are parsed, so
# --help and a wrong table answer at once.
log = logging.getLogger(__name__)

# The newest finished run of a bare `python training/train_torch.py` (relative to the current directory).
DEFAULT_MODEL = "runs/latest/model"

# Column names of a table the model records none for (an artifact from before schemas).
DEFAULT_COLUMNS = ColumnMap(("image_path",), "description", "engagement")
SEEN_COLUMN = "seen_in_training"
FIXED_OUTPUT = ("row", SEEN_COLUMN, "label", "pred_engagement", "pred_score", "reference_score")


@dataclass
class PredictConfig(DownloadArgs):
    """Score a posts table (CSV/JSONL) with a trained model artifact."""

    input: str = field(help="posts table: .csv, or .jsonl/.ndjson")
    out: str = field(help="predictions CSV to write (rejects go to OUT.rejects.csv, metrics to OUT.metrics.json)")
    model: str = field(DEFAULT_MODEL, help="model artifact directory (RUN_DIR/model); the default is the newest "
                                           "run of a bare training/train_torch.py, under the current directory")
    image_col: str | None = field(None, help="column(s) with the image path, comma-separated (the first non-empty "
                                             "cell wins); default: the training table's")
    text_col: str | None = field(None, help="column with the raw caption; default: the training table's")
    label_col: str | None = field(None, help="label column (or count columns summed, a+b); optional: used for "
                                             "metrics when the table has it; default: the training table's")
    keep_cols: str = field("", help="input columns to copy into the output next to row, comma-separated, "
                                    "e.g. post_id,caption")
    sep: str = sep_field()
    encoding: str = encoding_field()
    max_cell_chars: int = max_cell_chars_field()
    rows_of: str | None = field(None, help="score only the rows of a preprocess.py split: DATA_DIR:SPLIT, "
                                           "e.g. runs/demo/data:test")
    batch_size: int = field(16, help="posts per forward pass")
    num_workers: int = field(1, help="DataLoader workers that decode and prepare posts")
    # Its choices are models.runtime.RUNTIMES, checked in __post_init__ (that module imports torch).
    runtime: str = field("torch",
                         help="who computes the CLIP embeddings (torch, bf16, onnx, int8 or auto), as the "
                              "server's RUNTIME: bf16 is fast on CPUs "
                              "with AMX or AVX512_BF16; onnx needs `python -m models.export_onnx MODEL` first (CPU only); "
                              "int8 needs it with `--quantize int8` and moves scores more (README)")
    max_reject_frac: float = field(0.2, help="exit 1 when more than this fraction of rows is rejected")
    show: int = field(3, help="print the top and bottom N posts with their intervals and main contribution "
                               "(each post once, ranked, when there are at most 2N)")
    progress: bool = field(True, help="show a progress bar (on a terminal)")

    def __post_init__(self):
        super().__post_init__()  # the download flags
        if self.batch_size < 1 or self.num_workers < 0 or not 0 <= self.max_reject_frac <= 1:
            raise ValueError("--batch-size >= 1, --num-workers >= 0 and --max-reject-frac in [0, 1]")
        taken = [c for c in split_names(self.keep_cols)
                 if c in FIXED_OUTPUT or c.startswith(("low_", "high_", "contrib_"))]
        if taken:
            raise ValueError(f"--keep-cols {taken}: these names are output columns of the scorer")
        ReadOptions.of(self)
        from models.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ValueError(f"--runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}")


def table_columns(cfg: PredictConfig) -> ColumnMap:
    """The columns to read: the artifact's training table (or the defaults), the flags over
    them, the model's feature columns and ``--keep-cols``. Reads config.json only."""
    from models.artifact import artifact_feature_names, artifact_table

    if cfg.model == DEFAULT_MODEL and not Path(cfg.model).exists():
        raise SystemExit(f"error: no model at {DEFAULT_MODEL} (the default --model, under the current directory "
                         f"{Path.cwd()}): train one with `python training/train_torch.py`, which points runs/latest "
                         "at its newest finished run, or pass --model RUN_DIR/model")
    try:
        schema = artifact_table(cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --model: {e}") from None
    base = ColumnMap.from_schema(schema) if schema else DEFAULT_COLUMNS
    features = {n: "a feature column of the model" for n in artifact_feature_names(cfg.model)}
    try:
        return ColumnMap(split_names(cfg.image_col) if cfg.image_col else base.image, cfg.text_col or base.text,
                         cfg.label_col or base.label, features, split_names(cfg.keep_cols), label_optional=True)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


class TableRows:
    """Row ``i`` -> ``(row, Post, seen)`` or ``(row, (reason, detail), None)``, in a worker
    (a map-style dataset for ``DataLoader``).

    ``seen``: whether the post's fingerprint is one of ``fingerprints`` (the model's train
    and val posts, sorted); None when the model stores none.
    """

    def __init__(self, rows: list[tuple], prep, fingerprints: np.ndarray | None):
        self.rows, self.prep, self.fingerprints = rows, prep, fingerprints  # rows: (row, path, caption, features)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row, path, caption, features = self.rows[i]
        try:
            post = prepare_post(path, caption, features, self.prep)
        except (ImageError, FeatureError) as e:
            return row, (e.reason, e.message), None
        except Exception as e:  # noqa: BLE001 - a decoder failing on a damaged header is a bad image
            return row, ("corrupt", f"could not open image: {type(e).__name__}: {e}"), None
        return row, post, self.seen(file_fingerprint(path, caption))

    def seen(self, fingerprint: int) -> bool | None:
        if self.fingerprints is None:
            return None
        i = int(np.searchsorted(self.fingerprints, np.uint64(fingerprint)))
        return i < len(self.fingerprints) and int(self.fingerprints[i]) == fingerprint


class Batches:
    """Collate: the good posts become model tensors (in the worker), the bad ones rejects."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __call__(self, items):
        good = [(row, p, seen) for row, p, seen in items if not isinstance(p, tuple)]
        rejects = [(row, *p) for row, p, _ in items if isinstance(p, tuple)]
        batch = self.batcher([p for _, p, _ in good]) if good else None
        return [row for row, _, _ in good], [seen for _, _, seen in good], batch, rejects


def read_input(cfg: PredictConfig, columns: ColumnMap) -> PostsTable:
    """The table, its columns checked (one ``error:`` line when any is missing)."""
    try:
        table = read_table(Path(cfg.input).expanduser().resolve(), columns, ReadOptions.of(cfg))
    except TableError as e:
        raise SystemExit(f"error: {e}") from None
    log.info("read %d rows from %s (%s)", len(table), table.path, table.dialect.describe())
    return table


def read_rows(cfg: PredictConfig, table: PostsTable) -> tuple[list[tuple], list[tuple], int]:
    """(rows for TableRows, ``(row, reason, detail)`` rejects decided without an image,
    the number of rows to account for)."""
    keep = sorted(split_rows(cfg.rows_of)) if cfg.rows_of else range(len(table))
    sources, rejects = [], []
    for r in keep:
        if table.images[r]:
            sources.append((r, image_source(table.images[r], table.path.parent)))
        else:
            rejects.append((r, "missing_path", "no image path given"))
    # URL cells: the download seam (a URL in the cache is never fetched again)
    local, unresolved = resolve_image_sources(sources, cfg.download_config(), cfg.progress)
    rows = [(r, path, table.captions[r], table.feature_cells(r)) for r, path in local]
    return rows, rejects + unresolved, len(keep)


def split_rows(spec: str) -> set[int]:
    """The input rows of one split of a preprocess.py output, from ``DATA_DIR:SPLIT``."""
    from data_preprocessing.records import RecordReader

    data_dir, _, split = spec.rpartition(":")
    return {rec.row for rec in RecordReader(Path(data_dir) / f"{split}.pkl")}


def columns(loaded, keep: tuple[str, ...]) -> list[str]:
    levels = list((loaded.calibration.half_widths if loaded.calibration else {}))
    groups = ["image", "caption", "sentiment", *loaded.prepare.features.names] if loaded.reference else []
    return (["row", *keep, SEEN_COLUMN, "label", "pred_engagement", "pred_score"]
            + [f"{e}_{lv}" for lv in levels for e in ("low", "high")]
            + [f"contrib_{g}" for g in groups] + (["reference_score"] if groups else []))


def keep_cell(value):
    """An input cell as the output carries it: text as is, a JSON number as a number."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def seen_cell(seen: bool | None) -> str:
    return "" if seen is None else ("true" if seen else "false")


def score_rows(cfg: PredictConfig, loaded, rows: list[tuple], table: PostsTable, fingerprints, accelerator,
               part: Path) -> list[tuple]:
    """Score this rank's batches into ``part`` (CSV without header); returns its rejects."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    batches = [list(range(i, min(i + cfg.batch_size, len(rows)))) for i in range(0, len(rows), cfg.batch_size)]
    mine = batches[accelerator.process_index::accelerator.num_processes]
    loader = DataLoader(TableRows(rows, loaded.prepare, fingerprints), batch_sampler=mine,
                        collate_fn=Batches(loaded.batcher), num_workers=cfg.num_workers)
    rejects, levels = [], list((loaded.calibration.half_widths if loaded.calibration else {}))
    has_labels, keep = table.label_expr is not None, table.columns.keep
    with open(part, "w", newline="") as fh:
        w = safe_csv_writer(fh)
        for row_ids, seen, batch, bad in tqdm(loader, desc="score", unit="batch",
                                              disable=bar_disabled(cfg.progress and accelerator.is_main_process)):
            rejects += bad
            if batch is None:
                continue
            out = loaded.explain_batch(batch)
            for j, r in enumerate(row_ids):
                label = table.label(r)[0] if has_labels else None
                line = [r, *(keep_cell(table.cells[c][r]) for c in keep), seen_cell(seen[j]),
                        "" if label is None else label, float(out.engagement[j]), float(out.score[j])]
                line += [float(x[j]) for lv in levels for x in out.intervals[lv]]
                if out.contributions is not None:
                    line += [float(c) for c in out.contributions[j]] + [float(out.reference_score)]
                w.writerow(line)
    return rejects


def merge_parts(parts: list[Path], out: Path, header: list[str]) -> None:
    """Rank parts (each in row order) -> one CSV in row order."""
    handles = [open(p, newline="") for p in parts]
    try:
        with open(out, "w", newline="") as fh:
            safe_csv_writer(fh).writerow(header)  # --keep-cols names come from the user's table
            # The parts' cells were escaped when written, and are copied as they are: escaping
            # again would turn a negative number (read back as text) into a string.
            csv.writer(fh).writerows(heapq.merge(*(csv.reader(h) for h in handles), key=lambda line: int(line[0])))
    finally:
        for h in handles:
            h.close()
    for p in parts:
        p.unlink()


def summarize(cfg: PredictConfig, out: Path, loaded, n_rows: int, rejects: list, fingerprints) -> dict:
    """Counts, and metrics and interval coverage where labels exist on posts the model did
    not see in training or validation; printed and written."""
    import torch

    from common.metrics import regression_metrics

    with open(out, newline="") as fh:
        kept = list(csv.DictReader(fh))
    summary = {"rows_read": n_rows, "kept": len(kept), "rejected": len(rejects)}
    assert summary["kept"] + summary["rejected"] == n_rows, summary
    n_seen = sum(r[SEEN_COLUMN] == "true" for r in kept)
    labelled = [r for r in kept if r.get("label") and r[SEEN_COLUMN] != "true"]
    summary["rows_seen_in_training"] = None if fingerprints is None else n_seen
    summary["rows_in_metrics"] = len(labelled)
    if labelled:
        z = loaded.target.to_model_scale(torch.tensor([float(r["label"]) for r in labelled], dtype=torch.float64))
        pred = np.array([float(r["pred_score"]) for r in labelled])
        summary["metrics_model_scale"] = regression_metrics(z.numpy(), pred)
        summary["coverage"] = {lv: float(np.mean([float(r[f"low_{lv}"]) <= float(r["label"]) <= float(r[f"high_{lv}"])
                                                  for r in labelled]))
                               for lv in (loaded.calibration.half_widths if loaded.calibration else {})}
    print(f"rows read {n_rows}: scored {len(kept)}, rejected {len(rejects)}")
    if fingerprints is None:
        print(f"metrics on {len(labelled)} labelled rows; the model stores no fingerprints of its training posts, "
              "so some of these may be posts it was trained on")
    else:
        print(f"metrics on {len(labelled)} unseen rows; {n_seen} rows were in training or validation")
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
    # 1. parse args; the table's columns from the artifact's config.json and the flags
    setup_logging()
    cfg = parse_config(PredictConfig, argv)
    log.info("config: %s", json.dumps(config_dict(cfg)))
    cols = table_columns(cfg)
    # 2. the table, its columns checked before the model loads (which takes seconds)
    table = read_input(cfg, cols)
    rows, early_rejects, n_rows = read_rows(cfg, table)
    # 3. one accelerator for devices and processes; the model and its training fingerprints
    import torch
    from accelerate import Accelerator

    from models.artifact import artifact_fingerprints, load_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    loaded = load_model(cfg.model, device=accelerator.device, runtime=cfg.runtime)
    fingerprints = artifact_fingerprints(cfg.model)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # 4. every rank scores its batches; rank 0 merges parts and rejects
    part = out.with_name(f".{out.name}.part{accelerator.process_index}")
    rejects = score_rows(cfg, loaded, rows, table, fingerprints, accelerator, part)
    with open(part.with_suffix(part.suffix + ".rejects.json"), "w") as fh:
        json.dump(rejects, fh)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    parts = [out.with_name(f".{out.name}.part{r}") for r in range(accelerator.num_processes)]
    all_rejects = list(early_rejects)
    for p in parts:
        rj = p.with_suffix(p.suffix + ".rejects.json")
        all_rejects += [tuple(x) for x in json.loads(rj.read_text())]
        rj.unlink()
    merge_parts(parts, out, columns(loaded, cols.keep))
    # rejects.csv as preprocessing writes it: row, image path as written, reason, detail
    write_rejects(out.with_name(out.name + ".rejects.csv"),
                  [(r, table.images[r], reason, detail) for r, reason, detail in all_rejects])
    # 5. account for every row; metrics where labels exist, on the posts not seen in training
    summary = summarize(cfg, out, loaded, n_rows, all_rejects, fingerprints)
    write_json_atomic(out.with_name(out.name + ".metrics.json"), summary)
    if summary["rejected"] > cfg.max_reject_frac * n_rows or summary["kept"] == 0:
        raise SystemExit(f"error: {summary['rejected']} of {n_rows} rows rejected (> --max-reject-frac "
                         f"{cfg.max_reject_frac:.0%}); see {out.name}.rejects.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
