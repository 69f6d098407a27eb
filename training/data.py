"""Training's data: the record splits, their batches and loaders, and what meta.json says about them.

``EngagementDataset`` reads one split's records lazily; ``Collator`` turns records into
model tensors plus targets; ``make_loader`` builds a loader whose shuffle is a function of
``(seed, epoch)``. ``check_data`` refuses a data dir the model would see differently from
serving, ``check_split_sizes`` one with an empty split; ``split_rule`` and
``label_expression`` read what a reader of the results must know (how the test posts were
chosen, what the label is) from the data's meta.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.config import bar_disabled
from data_preprocessing.posts import PrepareConfig, Record
from data_preprocessing.records import RecordReader, check_cleaning_version, check_record_format, load_meta
from models.clip_regressor import PostBatcher, TargetTransform
from training.config import DataRefused

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger(__name__)

# What the test figures of data written before split rules were recorded mean.
LEGACY_SPLIT = "random split (seeded shuffle)"


class EngagementDataset(Dataset):
    """One split of preprocessed posts; ``[i]`` is its ``posts.Record``, read from disk on access."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.split = split
        self.reader = RecordReader(Path(data_dir) / f"{split}.pkl")

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Record:
        return self.reader[i]

    def labels(self) -> np.ndarray:
        """(N,) float64 labels of the whole split (reads every record once)."""
        from tqdm.auto import tqdm

        return np.array([r.label for r in tqdm(self.reader, total=len(self), desc=f"{self.split} labels",
                                                     leave=False, disable=bar_disabled())], dtype=np.float64)


class Collator:
    """Records -> model tensors via ``PostBatcher`` (one processor call per batch), plus targets.

    ``label`` is the raw label (float64, label units); ``target`` the standardised model
    scale (float32) the head regresses. Both only when ``target`` is given.
    """

    def __init__(self, batcher: PostBatcher, target: TargetTransform | None = None):
        self.batcher = batcher
        self.target = target

    def __call__(self, records: Sequence[Record]) -> dict[str, torch.Tensor]:
        batch = self.batcher(records)
        if self.target is not None:
            label = torch.tensor([float(r.label) for r in records], dtype=torch.float64)  # (B,)
            batch["label"] = label
            batch["target"] = self.target.standardise(self.target.to_model_scale(label)).float()  # (B,)
        return batch


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that is a pure function of ``(seed, epoch)``.

    Accelerate shards its batches across ranks, and every rank computes the same order
    without communicating. Call ``set_epoch`` (via the DataLoader) before each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class _Indices(Dataset):
    """``range(n)`` as a Dataset: the cached loaders batch indices into the embedding cache."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class CachedBatch:
    """Collate for the embedding cache: a list of indices -> the cached rows as a batch."""

    def __init__(self, cache: dict[str, torch.Tensor]):
        self.cache = cache

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.cache.items()}


def make_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, *, shuffle_seed: int | None,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader with its own RNG, so creating an iterator never draws from the global one."""
    return DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_fn,
        sampler=EpochShuffle(len(dataset), shuffle_seed) if shuffle_seed is not None else None,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),  # worker base seeds; the collate is deterministic
    )


def default_num_workers(cuda: bool, processes: int = 1) -> int:
    """``--num-workers`` when it is not given. On a GPU the CPUs are free to prepare batches: up to 8
    workers, one CPU per process kept for its loop. On the CPU the step's intra-op threads already
    use the cores, and a worker on one of them stalls them all at each parallel region (2 cores,
    tiny CLIP: 0.88 of the in-memory ceiling with 1 worker, 1.00 preparing in the main process;
    docs/design-notes.md, "Loader workers on small CPUs"), so workers get only the cores that torch's threads leave free."""
    cpus = len(os.sched_getaffinity(0)) // max(1, processes)
    if cuda:
        return max(1, min(8, cpus - 1))
    return max(0, min(8, cpus - torch.get_num_threads()))


def resolve_num_workers(cfg: "TrainConfig", accelerator) -> int:
    """``cfg.num_workers``, set to ``default_num_workers`` (and logged) when it was not given."""
    if cfg.num_workers is None:
        cfg.num_workers = default_num_workers(accelerator.device.type == "cuda", accelerator.num_processes)
        log.info("--num-workers not given: %d DataLoader workers on %s", cfg.num_workers, accelerator.device)
    return cfg.num_workers


def model_prepare_config(meta: dict, image_processor) -> PrepareConfig:
    """How serving must prepare a post for the model trained on this data.

    The feature schema (fitted on the train split) comes from the data; the resize policy
    is the processor's own, which gives the model the same tensors as the data's
    pre-resizing (check_data refused data resized below it).
    """
    from data_preprocessing.features import FeatureSchema
    from data_preprocessing.prepare import MAX_PIXELS, ResizePolicy

    data_prepare = meta.get("prepare") or {}  # absent in data written before feature columns
    return PrepareConfig(ResizePolicy.from_image_processor(image_processor),
                         int((meta.get("image_size_policy") or {}).get("max_pixels", MAX_PIXELS)),
                         FeatureSchema.from_dict(data_prepare.get("features")))


def check_data(data_dir: str | os.PathLike, image_processor) -> dict:
    """Refuse data the model would see differently from serving; return its meta.json."""
    from data_preprocessing.prepare import ResizePolicy

    try:
        meta = load_meta(data_dir)
        check_record_format(meta, data_dir)
        check_cleaning_version(meta, data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise DataRefused(str(e)) from None
    edge = (meta.get("image_size_policy") or {}).get("shortest_edge")
    need = ResizePolicy.from_image_processor(image_processor)
    if edge is None:
        raise DataRefused(f"{data_dir}/meta.json has no image_size_policy.shortest_edge; re-run preprocess.py")
    if 0 < int(edge) < need.shortest_edge:  # 0 = kept at full size: never smaller than the processor wants
        raise DataRefused(
            f"{data_dir} holds images pre-resized to a shortest edge of {edge}px, but the CLIP processor "
            f"resizes to {need.shortest_edge}px: every image would be upsampled (blurred) before the model "
            f"sees it. Re-run preprocess.py with --resize-shortest-edge {need.shortest_edge} (or 0).")
    if int(edge) > 0 and int(meta["image_size_policy"].get("resample", need.resample)) != need.resample:
        log.warning("data was pre-resized with resample=%s but the processor uses %s; inputs differ slightly "
                    "from serving's", meta["image_size_policy"].get("resample"), need.resample)
    return meta


def open_splits(data_dir: str | os.PathLike) -> dict[str, EngagementDataset]:
    """Every split of the data, refused when one is empty (``check_split_sizes``)."""
    from data_preprocessing.records import SPLITS

    datasets = {s: EngagementDataset(data_dir, s) for s in SPLITS}
    log.info("data %s: %s", data_dir, ", ".join(f"{s} {len(d)}" for s, d in datasets.items()))
    check_split_sizes({s: len(d) for s, d in datasets.items()}, data_dir)
    return datasets


def check_split_sizes(sizes: Mapping[str, int], data_dir: str | os.PathLike) -> None:
    """Refuse data with an empty split: train fits the model, val picks the epoch and
    calibrates the intervals, test scores it; none of them can be left out."""
    empty = [s for s, n in sizes.items() if n == 0]
    if empty:
        counts = ", ".join(f"{s} {n}" for s, n in sizes.items())
        raise DataRefused(
            f"{data_dir} has no posts in its {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} ({counts}): "
            "training needs all three (train fits the model, val picks the epoch and calibrates the intervals, "
            "test scores it). Add posts, or re-run preprocess.py with larger --val-frac/--test-frac; its "
            "rejects.csv lists the rows it left out.")


def split_rule(meta: Mapping) -> dict:
    """How the data's posts were split, for metrics.json and the end of the log:
    ``{"description": one line, "summary": meta.json's split summary or None}``."""
    from data_preprocessing.splits import describe_split

    summary = meta.get("split")
    if isinstance(summary, str) and summary:  # only the rule's name, e.g. "time:posted_at"
        return {"description": f"split {summary}", "summary": None}
    if not isinstance(summary, Mapping) or "achieved_fracs" not in summary:  # data from before split rules
        return {"description": LEGACY_SPLIT, "summary": None}
    return {"description": describe_split(summary), "summary": dict(summary)}


def label_expression(meta: Mapping) -> dict | None:
    """The label's expression (``LabelExpr.to_dict``: which counts add up to it) from
    meta.json's ``label``, else from the table schema's label column; None when neither."""
    from data_preprocessing.label_expr import LabelExpr

    label = meta.get("label")
    if isinstance(label, Mapping) and label.get("columns"):
        return LabelExpr(tuple(label["columns"])).to_dict()
    column = ((meta.get("table") or {}).get("columns") or {}).get("label")
    return LabelExpr.parse(column).to_dict() if column else None
