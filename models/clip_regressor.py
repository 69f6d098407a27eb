"""CLIPRegressor: CLIP image + text embeddings + caption sentiment -> engagement score.

This module owns everything that turns prepared posts into a prediction, so training,
evaluation and serving share it:

- ``PostBatcher``: prepared posts (``data_preprocessing.posts.Post``) -> model tensors,
  through the CLIP processor saved with the model (one call per batch, dynamic padding)
  and the feature schema fitted on the train split.
- ``CLIPRegressor``: the network, with named ``freeze_clip``/``unfreeze_clip`` phases.
- ``TargetTransform``: label units <-> the model's scale (log1p by default), and the
  train-split standardisation the head actually regresses.

``models.artifact`` saves and loads the model directory (``save_artifact``/``load_model``).

Scales used throughout: *label units* (likes); the *model scale* = the target transform
of the label (log1p(likes)); the head's raw output is the standardised model scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.hub import DEFAULT_CLIP
from data_preprocessing.features import FeatureSchema
from data_preprocessing.posts import Post

log = logging.getLogger(__name__)


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


def processor_normalization(image_processor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The CLIP processor's rescale factor, and its mean and std shaped (1, 3, 1, 1) to
    broadcast over (B, 3, H, W) pixels."""
    shape = (1, -1, 1, 1)
    return (float(image_processor.rescale_factor), torch.tensor(image_processor.image_mean).view(shape),
            torch.tensor(image_processor.image_std).view(shape))


def normalize_uint8(pixel_values: torch.Tensor, rescale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 as the processor normalises: rescale, then (x - mean) / std."""
    return (pixel_values.float() * rescale - mean) / std


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
        self.pixel_rescale, mean, std = processor_normalization(image_processor)
        # Non-persistent buffers: they move with .to(device), stay out of the state dict, and
        # come back from the processor saved with the weights.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

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
        return normalize_uint8(pixel_values, self.pixel_rescale, self.pixel_mean, self.pixel_std)

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
