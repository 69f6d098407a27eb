"""CLIPRegressor: CLIP image + text embeddings + caption sentiment -> engagement score.

This module owns everything that turns prepared posts into a prediction, so training,
evaluation and serving share it:

- ``PostBatcher``: prepared posts (``data_preprocessing.posts.Post``) -> model tensors,
  through the CLIP processor saved with the model (one call per batch, dynamic padding)
  and the feature schema fitted on the train split.
- ``CLIPRegressor``: the network, with named ``freeze_clip``/``unfreeze_clip`` phases.
- ``TargetTransform``: label units <-> the model's scale (log1p by default), and the
  train-split standardisation the head actually regresses.
- ``save_artifact``/``load_model``: a self-contained, atomically written model directory.

Scales used throughout: *label units* (likes); the *model scale* = the target transform
of the label (log1p(likes)); the head's raw output is the standardised model scale.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import atomic_dir
from common.hub import DEFAULT_CLIP
from data_preprocessing.features import FeatureSchema
from data_preprocessing.posts import Post, PrepareConfig
from models.explain import Calibration, Reference
from models.runtime import Embedder, RuntimeInfo, choose_embedder

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 2  # 2: "prepare" (resize policy, feature schema) and a linear + MLP head
CLIP_SUBDIR = "clip"  # save_pretrained output: CLIP weights, processor, tokenizer
HEAD_FILE = "head.safetensors"
REFERENCE_FILE = "reference.safetensors"  # train means of each input group (explain.Reference)
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "sentiment", "features")
CONFIG_FILE = "config.json"
# uint64 fingerprints (data_preprocessing.table.post_fingerprint) of the train and val posts,
# sorted: the table scorer marks the rows the model was fit or calibrated on.
FINGERPRINTS_FILE = "fingerprints.npy"
VOCAB_FILES = ("tokenizer.json", "vocab.json")  # token data: "auto_map" there may be a token, not a setting


# ---------------------------------------------------------------------------------------
# Target transform
# ---------------------------------------------------------------------------------------


@dataclass
class TargetTransform:
    """label -> model scale (``kind``) -> standardised with the train split's mean/std."""

    kind: str = "log1p"  # "log1p" for counts, "none" for already well-scaled targets
    mean: float = 0.0  # of the model-scale train labels
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in ("log1p", "none"):
            raise ValueError(f"unknown target transform {self.kind!r}; use log1p or none")

    @classmethod
    def fit(cls, labels: Sequence[float], kind: str = "log1p") -> "TargetTransform":
        t = torch.as_tensor(list(labels), dtype=torch.float64)
        z = cls(kind).to_model_scale(t)
        std = float(z.std()) if len(z) > 1 else 1.0
        return cls(kind, float(z.mean()), std if std > 1e-12 else 1.0)

    def to_model_scale(self, y: torch.Tensor) -> torch.Tensor:
        return torch.log1p(y) if self.kind == "log1p" else y

    def to_label_units(self, z: torch.Tensor) -> torch.Tensor:
        # log1p is for counts: a score below 0 (fewer than 0 likes) means 0, never negative likes
        return torch.expm1(z).clamp(min=0) if self.kind == "log1p" else z

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def unstandardise(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.std + self.mean


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


class PostBatcher:
    """Prepared posts -> the tensors ``CLIPRegressor.forward`` takes.

    The one place the CLIP processor is called (or, where it would only crop, its crop is
    done here, to its very pixels) and features are encoded, by the training
    collate function and by the server alike, so both feed the model identical tensors
    for the same post. Text is padded to the longest caption in the batch (dynamic
    padding) and truncated to the text model's maximum length, read from the CLIP config,
    never hard-coded.
    """

    def __init__(self, processor, max_length: int, features: FeatureSchema | None = None):
        self.processor = processor
        self.max_length = int(max_length)
        self.features = features or FeatureSchema()

    @classmethod
    def from_clip(cls, processor, clip_config, features: FeatureSchema | None = None) -> "PostBatcher":
        return cls(processor, clip_config.text_config.max_position_embeddings, features)

    def already_resized(self, images) -> bool:
        """Whether every image's shortest edge is already the processor's resize target.

        Records and served posts are pre-resized to exactly that (``ResizePolicy``), where
        the processor's resize is an identity copy that still costs about a third of a
        DataLoader worker's time per post (numpy -> PIL -> numpy), time a small model's step
        on few cores waits for. tests/test_train.py checks the pixels are the resize's own."""
        edge = getattr(self.processor.image_processor.size, "shortest_edge", None)
        return bool(edge) and all(min(im.size) == edge for im in images)

    def only_crops(self, images) -> bool:
        """Whether the PIL processor would only centre-crop these images: all RGB (so its RGB
        conversion copies them unchanged), already resized, at least the crop size, no padding."""
        ip = self.processor.image_processor
        crop = ip.crop_size
        return (getattr(ip, "backend", None) == "pil" and bool(ip.do_center_crop) and not getattr(ip, "do_pad", None)
                and self.already_resized(images) and all(im.mode == "RGB" and im.height >= crop.height
                                                         and im.width >= crop.width for im in images))

    def pixels(self, images) -> torch.Tensor:
        """(B, 3, H, W) uint8: resized and cropped, but not rescaled or normalised (a quarter of
        float32's bytes through the DataLoader and onto the device; CLIPRegressor.embed normalises
        there with this processor's own rescale factor, mean and std)."""
        if not self.only_crops(images):
            return self.processor.image_processor(
                images=images, do_resize=not self.already_resized(images), do_rescale=False, do_normalize=False,
                return_tensors="pt")["pixel_values"].to(torch.uint8)
        # What the PIL processor does to such images, without its per-image RGB copy and its stack
        # of strided views: this call on a batch of 32 costs 0.49 ms per post, not 0.58 (2 AMD cores), time
        # a small model's step waits for. Its crop offsets, (size - crop) // 2 (the torchvision
        # backend rounds, hence "pil" only); tests/test_train.py checks the pixels are torch.equal.
        crop = self.processor.image_processor.crop_size
        out = np.empty((len(images), crop.height, crop.width, 3), dtype=np.uint8)
        for k, im in enumerate(images):
            top, left = (im.height - crop.height) // 2, (im.width - crop.width) // 2
            out[k] = np.asarray(im)[top:top + crop.height, left:left + crop.width]
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def __call__(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        pixel_values = self.pixels([p.image for p in posts])
        tok = self.processor.tokenizer([p.text for p in posts], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
        return {
            "pixel_values": pixel_values,  # (B, 3, H, W) uint8, 0-255
            "input_ids": tok["input_ids"],  # (B, T) T = longest caption in batch, <= max_length
            "attention_mask": tok["attention_mask"],  # (B, T)
            "sentiment": torch.tensor([float(p.sentiment) for p in posts], dtype=torch.float32),  # (B,)
            # (B, F) float32, F = features.width (0 without feature columns)
            "features": torch.from_numpy(self.features.encode([p.features for p in posts])),
        }


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


@dataclass
class HeadConfig:
    hidden: int = 256
    dropout: float = 0.1


class RegressionHead(nn.Module):
    """A linear path plus an MLP on the same input: ``linear(x) + mlp(x)``.

    The linear path is where phase 1 starts: training sets it to the closed-form ridge
    solution on the frozen embeddings (the linear probe of LP-FT), and the MLP's last
    layer starts at zero, so the head starts exactly at the probe and phase 1 refines it
    with whatever the MLP can add (the image-caption interaction, for instance).
    """

    def __init__(self, in_features: int, cfg: HeadConfig):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.mlp = nn.Sequential(nn.Linear(in_features, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)  # zero output at start: the head *is* the linear path
        nn.init.zeros_(self.mlp[-1].bias)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B,)
        return (self.linear(x) + self.mlp(x)).squeeze(-1)


class CLIPRegressor(nn.Module):
    """CLIP towers + an MLP head over [img, txt, img*txt, sentiment, features] -> one score.

    The embeddings are CLIP's projected, L2-normalised embeddings (as in the contrastive
    objective). The element-wise product gives the head direct access to image-caption
    agreement, which a plain concatenation would leave to the MLP to discover. The head's
    input size is derived from the CLIP config's ``projection_dim`` and the feature
    schema's encoded width ``n_features``.
    """

    def __init__(self, clip, head: HeadConfig | None = None, n_features: int = 0, image_processor=None):
        super().__init__()
        self.clip = clip
        self.pixel_rescale = None
        if image_processor is not None:
            self.set_pixel_normalization(image_processor)
        self.head_config = head or HeadConfig()
        self.n_features = int(n_features)
        d = clip.config.projection_dim
        self.head = RegressionHead(3 * d + 1 + self.n_features, self.head_config)
        self._clip_frozen = False

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_CLIP, head: HeadConfig | None = None,
                        n_features: int = 0) -> "CLIPRegressor":
        from transformers import CLIPImageProcessor, CLIPModel

        # The model comes with its transforms (open_clip's create_model_and_transforms): the
        # image processor beside the weights says how to normalise pixels.
        from common.hub import resolve_pretrained

        # Raises PretrainedUnavailable in seconds when a hub name can't be had (no hub, not cached).
        source = resolve_pretrained(name_or_path)
        return cls(CLIPModel.from_pretrained(source), head, n_features, CLIPImageProcessor.from_pretrained(source))

    def set_pixel_normalization(self, image_processor) -> None:
        """Normalise uint8 pixels on the device with the processor's rescale factor, mean and std."""
        shape = (1, -1, 1, 1)  # broadcast over (B, 3, H, W)
        # Non-persistent buffers: they move with .to(device), stay out of the state dict, and
        # come back from the processor saved with the weights.
        self.register_buffer("pixel_mean", torch.tensor(image_processor.image_mean).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(image_processor.image_std).view(shape), persistent=False)
        self.pixel_rescale = float(image_processor.rescale_factor)

    # -- phases ---------------------------------------------------------------------------
    def freeze_clip(self) -> None:
        """Phase 1: only the head trains; CLIP is fixed and in eval mode."""
        self.clip.requires_grad_(False)
        self._clip_frozen = True
        self.train(self.training)
        self._log_trainable("froze CLIP")

    def unfreeze_clip(self) -> None:
        """Phase 2: everything trains, CLIP included (at its own, lower LR)."""
        self.clip.requires_grad_(True)
        # The contrastive temperature is not on the embed() path, so it never gets a
        # gradient; left trainable it would stall DDP's all-reduce and inflate the count.
        self.clip.logit_scale.requires_grad_(False)
        self._clip_frozen = False
        self.train(self.training)
        self._log_trainable("unfroze CLIP")

    @property
    def clip_frozen(self) -> bool:
        return self._clip_frozen

    def train(self, mode: bool = True):
        super().train(mode)
        if self._clip_frozen:
            self.clip.eval()  # a frozen backbone must not drift through dropout/batch stats
        return self

    def trainable_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total

    def _log_trainable(self, what: str) -> None:
        trainable, total = self.trainable_counts()
        log.info("%s: %s of %s parameters trainable (%.1f%%)", what, f"{trainable:,}", f"{total:,}",
                 100.0 * trainable / max(total, 1))

    # -- forward --------------------------------------------------------------------------
    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float32 normalised as the processor would; floats pass through."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        if self.pixel_rescale is None:
            raise RuntimeError("uint8 pixels need set_pixel_normalization(image_processor) first")
        return (pixel_values.float() * self.pixel_rescale - self.pixel_mean) / self.pixel_std

    def embed(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image and (B, D) text embeddings, projected and L2-normalised.

        ``pixel_values`` is uint8 (``PostBatcher``), normalised here, or already-normalised floats.
        """
        return self.embed_image(pixel_values), self.embed_text(input_ids, attention_mask)

    def embed_image(self, pixel_values) -> torch.Tensor:
        """(B, D) image embeddings alone, as ``embed`` computes them (the towers are independent)."""
        img = self.clip.get_image_features(pixel_values=self.normalize_pixels(pixel_values)).pooler_output
        return F.normalize(img, dim=-1)

    def embed_text(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, D) caption embeddings alone, as ``embed`` computes them."""
        txt = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(txt, dim=-1)

    @staticmethod
    def head_input(img: torch.Tensor, txt: torch.Tensor, sentiment: torch.Tensor,
                   features: torch.Tensor) -> torch.Tensor:
        """(B, 3D+1+F) head input: [img, txt, img*txt, sentiment, features]."""
        img, txt = img.float(), txt.float()
        return torch.cat([img, txt, img * txt, sentiment.float().unsqueeze(-1), features.float()], dim=-1)

    def head_forward(self, img: torch.Tensor, txt: torch.Tensor, sentiment: torch.Tensor,
                     features: torch.Tensor) -> torch.Tensor:
        """Embeddings -> (B,) standardised score. Phase 1 calls this on cached embeddings."""
        return self.head(self.head_input(img, txt, sentiment, features))

    def forward(self, pixel_values, input_ids, attention_mask, sentiment, features) -> torch.Tensor:
        img, txt = self.embed(pixel_values, input_ids, attention_mask)
        return self.head_forward(img, txt, sentiment, features)


# ---------------------------------------------------------------------------------------
# Artifact
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """What ``load_model`` returns: everything needed to predict, rebuilt from disk alone."""

    model: CLIPRegressor
    batcher: PostBatcher
    target: TargetTransform
    prepare: PrepareConfig  # how a raw post becomes a ``Post`` for this model
    config: dict
    path: Path
    calibration: Calibration | None = None  # conformal half-widths (absent in artifacts without one)
    reference: Reference | None = None  # train means, the "absent" value for contributions
    embedder: Embedder | None = None  # who computes the CLIP embeddings (models.runtime); None: model.embed
    runtime: RuntimeInfo | None = None  # which runtime that is, and why

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs on its device, the model in eval mode. ``eval()`` only when needed: it
        walks every module (about 1.5 ms for ViT-B/32 on 2 cores), a fixed cost on each served batch."""
        if self.model.training:
            self.model.eval()
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}

    def _embed(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) img and txt embeddings, L2-normalised, on the head's device."""
        embed = self.embedder or self.model.embed
        img, txt = embed(b["pixel_values"], b["input_ids"], b["attention_mask"])
        device = b["sentiment"].device
        return img.to(device), txt.to(device)  # an ONNX session answers on the CPU

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model tensors -> (model-scale scores, label-unit engagement), both (B,) float64."""
        b = self._inputs(batch)
        img, txt = self._embed(b)
        s = self.model.head_forward(img, txt, b["sentiment"], b["features"]).double().cpu()
        score = self.target.unstandardise(s)
        return score, self.target.to_label_units(score)

    @torch.no_grad()
    def explain_batch(self, batch: dict[str, torch.Tensor]) -> "Predictions":
        """Model tensors -> scores, engagement, conformal intervals and Shapley contributions."""
        b = self._inputs(batch)
        img, txt = self._embed(b)
        return self.explain_embeddings(img, txt, b["sentiment"], b["features"])

    @torch.no_grad()
    def explain_embeddings(self, img: torch.Tensor, txt: torch.Tensor, sentiment: torch.Tensor,
                           features: torch.Tensor, contributions: bool = True) -> "Predictions":
        """``explain_batch`` from the towers' output on: (B, D) img and txt, (B,) sentiment, (B, F)
        encoded features, on the head's device. ``contributions=False`` runs the head once instead
        of 2^k times (no ``contributions``; the reference score still comes with it)."""
        from models.explain import shapley

        device = sentiment.device
        ref_t = None if self.reference is None else Reference(
            **{k: v.to(device) for k, v in vars(self.reference).items()})
        if ref_t is None or not contributions:
            s = self.model.head_forward(img, txt, sentiment, features).double().cpu()
            groups, phi = [], None
            ref = None if ref_t is None else float(self.model.head_forward(
                ref_t.img[None], ref_t.txt[None], ref_t.sentiment.reshape(1), ref_t.features[None]).double()[0])
        else:
            groups, phi, s, ref = shapley(self.model, img, txt, sentiment, features, ref_t,
                                          self.prepare.features.slices())
            s, phi = s.cpu(), phi.cpu() * self.target.std  # contributions on the model scale
        if ref is not None:
            ref = float(self.target.unstandardise(torch.tensor(ref, dtype=torch.float64)))
        score = self.target.unstandardise(s)
        intervals = {}
        for level in (self.calibration.half_widths if self.calibration else {}):
            low, high = self.calibration.interval(score, level)
            intervals[level] = (self.target.to_label_units(low), self.target.to_label_units(high))
        return Predictions(score, self.target.to_label_units(score), intervals, groups, phi, ref)

    def _embed_one_image(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D) img of the batch's first image and (B, D) txt of every caption: the image tower
        runs once where the embedder can run its towers apart (torch, bf16), else (an ONNX graph
        computes both) once per caption, as ``_embed`` would."""
        from models.embedding_cache import has_towers

        px, ids, mask = b["pixel_values"], b["input_ids"], b["attention_mask"]
        embedder = self.embedder or self.model
        if has_towers(embedder) or embedder is self.model:
            image, text = (embedder.image, embedder.text) if has_towers(embedder) else (
                self.model.embed_image, self.model.embed_text)
            # Each caption alone, unpadded: the very shapes, so the very numbers, of a lone /predict
            # (padding a short caption to a long one moves its embedding by ~1e-7).
            n = mask.sum(1)
            img = image(px[:1])
            txt = torch.cat([text(ids[i:i + 1, :n[i]], mask[i:i + 1, :n[i]]) for i in range(len(ids))])
        else:
            img, txt = embedder(px, ids, mask)
            img = img[:1]
        device = b["sentiment"].device
        return img.to(device), txt.to(device)

    @torch.no_grad()
    def explain_variants(self, posts: Sequence[Post], rows: Sequence[dict], best_from: int = 0) -> "VariantPredictions":
        """C captions of one image (``posts``: the same image, each post's features ``rows[0]``) at
        R feature rows (posting times): the image embedded once, each caption once, the head once per
        caption x row, and exact contributions for each caption at ``rows[0]`` and for the best pair
        among rows ``best_from`` on. Each number is what ``explain_batch`` answers for that post, up
        to float rounding."""
        b = self._inputs(self.batcher(posts))
        img, txt = self._embed_one_image(b)
        feats = torch.from_numpy(self.batcher.features.encode(list(rows))).to(txt.device)  # (R, F)
        c, r = len(posts), len(rows)
        ci, ri = torch.arange(c).repeat_interleave(r), torch.arange(r).repeat(c)  # caption-major pairs
        grid = self.explain_embeddings(img.expand(c * r, -1), txt[ci], b["sentiment"][ci], feats[ri],
                                       contributions=False)
        best = int(torch.argmax(grid.score.view(c, r)[:, best_from:].flatten()))
        best = (best // (r - best_from)) * r + best_from + best % (r - best_from)  # back to the (C * R) index
        # Contributions one post at a time: the head's shapes, so its numbers, of a lone /predict
        # (2^k tiny head passes each; the cost is in the towers).
        pairs = [(i, 0) for i in range(c)] + [(best // r, best % r)]
        explained = [self.explain_embeddings(img, txt[i:i + 1], b["sentiment"][i:i + 1], feats[j:j + 1])
                     for i, j in pairs]
        return VariantPredictions(grid, r, explained, pairs[-1])

    @property
    def resize_policy(self):
        return self.prepare.resize


@dataclass
class Predictions:
    """``LoadedModel.explain_batch``'s answer for B posts."""

    score: torch.Tensor  # (B,) float64, model scale
    engagement: torch.Tensor  # (B,) float64, label units
    intervals: dict[str, tuple[torch.Tensor, torch.Tensor]]  # level -> (low, high), label units
    groups: list[str]  # contribution groups: image, caption, sentiment, then each feature column
    contributions: torch.Tensor | None  # (B, len(groups)) model scale; sums to score - reference_score
    reference_score: float | None  # the prediction for the reference post (train means), model scale


@dataclass
class VariantPredictions:
    """``LoadedModel.explain_variants``'s answer for C captions at R feature rows."""

    grid: Predictions  # (C * R,) caption-major: caption i at row j is entry i * rows + j; no contributions
    rows: int
    # C + 1 predictions of one post each, with contributions: each caption at row 0, then the best pair
    explained: list[Predictions]
    best: tuple[int, int]  # (caption, row) of the highest score in the grid


def save_artifact(model: CLIPRegressor, processor, target: TargetTransform, out_dir: str | os.PathLike,
                  prepare: PrepareConfig | None = None, extra_config: dict | None = None,
                  calibration: Calibration | None = None, reference: Reference | None = None,
                  table: dict | None = None, fingerprints: np.ndarray | None = None) -> Path:
    """Write a self-contained model directory atomically (temp dir, then rename).

    Layout: ``clip/`` (CLIPModel.save_pretrained + processor + tokenizer),
    ``head.safetensors`` and ``config.json`` (architecture, target transform, the
    ``prepare`` config with the feature schema, cleaning version, the ``table`` schema it
    was trained on (columns and dialect, from preprocessing's meta.json), plus whatever
    the caller adds: training args, git commit, metrics). ``prepare`` defaults to the
    processor's own resize policy and no features. ``fingerprints`` (the train and val
    posts') go to ``FINGERPRINTS_FILE``, sorted and distinct.
    """
    from safetensors.torch import save_file

    from data_preprocessing.prepare import CLEANING_VERSION, ResizePolicy

    prepare = prepare or PrepareConfig(ResizePolicy.from_image_processor(processor.image_processor))
    if prepare.features.width != model.n_features:
        raise ValueError(f"the head takes {model.n_features} feature inputs but the schema encodes "
                         f"{prepare.features.width}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.clip.save_pretrained(tmp / CLIP_SUBDIR)
        processor.save_pretrained(tmp / CLIP_SUBDIR)
        head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head_state, str(tmp / HEAD_FILE))
        if reference is not None:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in reference.tensors().items()},
                      str(tmp / REFERENCE_FILE))
        if fingerprints is not None:
            fingerprints = np.unique(np.asarray(fingerprints, dtype=np.uint64))
            np.save(tmp / FINGERPRINTS_FILE, fingerprints, allow_pickle=False)
        config = {
            "format": ARTIFACT_FORMAT,
            "architecture": {
                "class": "CLIPRegressor",
                "clip_subdir": CLIP_SUBDIR,
                "projection_dim": model.clip.config.projection_dim,
                "head": asdict(model.head_config),
                "head_input": "[img, txt, img*txt, sentiment, features] (L2-normalised CLIP projections)",
                "head_form": "linear(x) + mlp(x)",
                "n_features": model.n_features,
                "max_text_length": model.clip.config.text_config.max_position_embeddings,
            },
            "target_transform": asdict(target),
            "prepare": prepare.to_dict(),
            "calibration": asdict(calibration) if calibration is not None else None,
            "cleaning_version": CLEANING_VERSION,
            "table": table,
            "fingerprints": None if fingerprints is None else {"count": int(fingerprints.size),
                                                               "posts": "train and val"},
            **(extra_config or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out_dir


def artifact_table(model_dir: str | os.PathLike) -> dict | None:
    """The table schema the artifact was trained on (``config.json["table"]``: columns and
    dialect), read without loading the model; None for an artifact that has none.
    Raises ``FileNotFoundError`` when ``model_dir`` holds no config."""
    cfg_path = Path(model_dir) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {model_dir} is not a model artifact "
                                "(expected RUN_DIR/model written by training/train_torch.py)")
    return json.loads(cfg_path.read_text()).get("table")


def artifact_fingerprints(model_dir: str | os.PathLike) -> np.ndarray | None:
    """The sorted uint64 fingerprints of the posts the model was trained and calibrated on,
    or None when the artifact stores none."""
    path = Path(model_dir) / FINGERPRINTS_FILE
    return np.load(path, allow_pickle=False).astype(np.uint64) if path.is_file() else None


def artifact_version(model_dir: str | os.PathLike) -> str:
    """12 hex of the sha256 of the artifact's config.json and head: names one trained artifact."""
    import hashlib

    digest = hashlib.sha256()
    for part in (CONFIG_FILE, HEAD_FILE):
        f = Path(model_dir) / part
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


class UnsafeArtifact(ValueError):
    """An artifact that would make ``load_model`` read outside its directory or run its code."""


def artifact_path(model_dir: str | os.PathLike, relative, key: str) -> Path:
    """``model_dir / relative`` resolved, for a path that config.json names under ``key``.

    Refused unless it stays inside ``model_dir`` once ``..``, absolute paths and symlinks are
    resolved: the loader reads its own directory and nothing else.
    """
    root = Path(model_dir).resolve()
    if not isinstance(relative, str) or not relative:
        raise UnsafeArtifact(f"{key} in {root / CONFIG_FILE} must be a relative path inside {root}, "
                             f"not {relative!r}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UnsafeArtifact(f"{key}={relative!r} in {root / CONFIG_FILE} resolves to {path}, outside the "
                             f"model directory {root}; load_model reads nothing outside MODEL_DIR")
    return path


def check_contained(model_dir: str | os.PathLike) -> None:
    """Refuse an artifact with a symlink, at any depth, that resolves outside ``model_dir``
    (``clip/model.safetensors`` or ``onnx/embed.onnx`` pointing elsewhere, say)."""
    root = Path(model_dir).resolve()
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is checked, not entered
        for name in dirs + files:
            entry = Path(folder) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise UnsafeArtifact(f"{entry} is a symlink to {entry.resolve()}, outside the model "
                                     f"directory {root}; load_model reads nothing outside MODEL_DIR")


def refuse_custom_code(clip_dir: Path) -> None:
    """Refuse a CLIP folder whose configs ask for custom code (an ``auto_map`` at any depth, as
    transformers reads it in processor_config.json, tokenizer_config.json or config.json).

    ``trust_remote_code=False`` already keeps transformers from running it; this names the file,
    where transformers would fail, or quietly load its own class, with advice to trust the code.
    """
    def has_auto_map(node) -> bool:
        if isinstance(node, dict):
            return "auto_map" in node or any(has_auto_map(v) for v in node.values())
        return isinstance(node, list) and any(has_auto_map(v) for v in node)

    for f in sorted(clip_dir.glob("*.json")):
        if f.name in VOCAB_FILES:
            continue
        if has_auto_map(json.loads(f.read_text())):
            raise UnsafeArtifact(f"{f} asks for custom code (auto_map); load_model never runs code from an "
                                 "artifact: save the CLIP with a built-in transformers class")


def load_clip(model_dir: Path, clip_subdir) -> tuple:
    """The artifact's CLIPModel and CLIPProcessor, from ``clip_subdir`` (config.json's
    ``architecture.clip_subdir``) inside ``model_dir``, without running or fetching anything."""
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = artifact_path(model_dir, clip_subdir, "architecture.clip_subdir")
    if not clip_dir.is_dir():
        raise FileNotFoundError(f"architecture.clip_subdir={clip_subdir!r}: {clip_dir} is not a directory")
    refuse_custom_code(clip_dir)
    # Never run code from the artifact (transformers would prompt on a terminal, or run it
    # when told to), never fetch from the hub, never unpickle: weights come from safetensors.
    no_code = {"trust_remote_code": False, "local_files_only": True}
    clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True, **no_code)
    return clip, CLIPProcessor.from_pretrained(clip_dir, **no_code)


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
               runtime: str = "torch") -> LoadedModel:
    """Rebuild a saved artifact from its directory alone (no defaults from code).

    ``runtime`` says who computes the CLIP embeddings (``models.runtime``): ``"torch"``,
    ``"bf16"`` (autocast), ``"onnx"`` (the export ``python -m models.export_onnx MODEL_DIR``
    wrote; CPU), or ``"auto"`` (the fastest per batch size, timed on warm-up batches). The
    head and the contributions run in fp32 torch either way.
    """
    from safetensors.torch import load_file

    from data_preprocessing.prepare import CLEANING_VERSION

    model_dir = Path(model_dir)
    cfg_path = model_dir / CONFIG_FILE
    check_contained(model_dir)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {model_dir} is not a model artifact "
                                "(expected RUN_DIR/model written by training/train_torch.py)")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"artifact format {config.get('format')!r} is not supported (expected {ARTIFACT_FORMAT})")
    if str(config.get("cleaning_version")) != CLEANING_VERSION:
        raise ValueError(f"model was trained on text cleaning version {config.get('cleaning_version')!r} "
                         f"but this code cleans with {CLEANING_VERSION!r}; serving would feed it "
                         "differently cleaned captions")
    arch = config["architecture"]
    clip, processor = load_clip(model_dir, arch["clip_subdir"])
    prepare = PrepareConfig.from_dict(config["prepare"])
    model = CLIPRegressor(clip, HeadConfig(**arch["head"]), n_features=prepare.features.width,
                          image_processor=processor.image_processor)
    model.head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
    ref_path = model_dir / REFERENCE_FILE
    reference = Reference.from_tensors(load_file(str(ref_path))) if ref_path.is_file() else None
    calibration = Calibration(**config["calibration"]) if config.get("calibration") else None
    model.to(device).eval()
    batcher = PostBatcher(processor, arch["max_text_length"], prepare.features)
    embedder, runtime_info = choose_embedder(model, model_dir, artifact_version(model_dir), runtime, device, batcher)
    return LoadedModel(
        model=model,
        batcher=batcher,
        target=TargetTransform(**config["target_transform"]),
        prepare=prepare,
        config=config,
        path=model_dir,
        calibration=calibration,
        reference=reference,
        embedder=embedder,
        runtime=runtime_info,
    )

