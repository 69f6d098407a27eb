"""The phase-1 embedding cache: the frozen CLIP's embeddings of every split, computed once."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from models.clip_regressor import CLIPRegressor, TargetTransform
from training.data import CachedBatch, Collator, _Indices, make_loader
from training.loop import embed_split

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger(__name__)


class EmbeddingCache:
    """The frozen CLIP's embeddings of every split, computed once (shard-wise, then gathered).

    A frozen CLIP maps a post to the same embedding every epoch (no augmentation), so the
    frozen phase, the baselines and the linear probe all run on these. ``loader(split)``
    is the one way in for the epoch loop: the same batch size and ``EpochShuffle`` as the
    image loader, so a cached epoch sees the same batches in the same order.
    """

    def __init__(self, model: CLIPRegressor, datasets: dict, collate: Collator, cfg: TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.splits, seconds, self._loaders = {}, {}, {}
        for split, ds in datasets.items():
            t0 = time.perf_counter()
            loader = accelerator.prepare(make_loader(ds, cfg.eval_batch_size, collate, shuffle_seed=None,
                                                     num_workers=cfg.num_workers))
            self.splits[split] = embed_split(model, loader, accelerator, f"embed {split}")
            seconds[split] = round(time.perf_counter() - t0, 3)
        self.timings = {"build_seconds": round(sum(seconds.values()), 3), "seconds_per_split": seconds}
        log.info("embedding cache: %d posts embedded once in %.1f s (%s)",
                 sum(len(c["label"]) for c in self.splits.values()), self.timings["build_seconds"],
                 ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items()))

    def loader(self, split: str):
        """The prepared loader over ``split``'s cached rows, built once and reused every epoch."""
        if split not in self._loaders:
            c = self.splits[split]
            bs = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
            seed = self.cfg.seed if split == "train" else None
            self._loaders[split] = self.accelerator.prepare(make_loader(_Indices(len(c["label"])), bs, CachedBatch(c),
                                                                        shuffle_seed=seed))
        return self._loaders[split]

    def head_inputs(self, split: str) -> torch.Tensor:
        """(N, 3D+1+F) what the head sees for every post of ``split``."""
        c = self.splits[split]
        return CLIPRegressor.head_input(c["img"], c["txt"], c["sentiment"], c["features"])

    def baselines(self, target: TargetTransform, time_inputs=None) -> dict:
        """The reference models (training/baselines.py) on the test split; ``time_inputs``: which
        feature inputs come from timestamp columns (FeatureSchema.datetime_inputs)."""
        from training.baselines import baseline_metrics

        def arrays(c):
            return {"img": c["img"].numpy(), "txt": c["txt"].numpy(), "sentiment": c["sentiment"].double().numpy(),
                    "features": c["features"].double().numpy(), "z": target.to_model_scale(c["label"]).numpy()}

        out = baseline_metrics(arrays(self.splits["train"]), arrays(self.splits["test"]), time_inputs)
        for name, m in out.items():
            log.info("baseline %-21s test r2 %.4f rmse %.4f", name, m["r2"], m["rmse"])
        return out
