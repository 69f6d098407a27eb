"""The model artifact: one directory that rebuilds a trained model, with no defaults from code.

Its file names are spelled here and nowhere else. Layout::

    clip/                   CLIPModel.save_pretrained + processor + tokenizer
    head.safetensors        the regression head
    config.json             architecture, target transform, ``prepare`` config, cleaning version,
                            table schema, calibration, plus the caller's training args, commit, metrics
    reference.safetensors   train means of each input group (optional)
    fingerprints.npy        the train and val posts' fingerprints (optional)

- ``save_artifact``/``load_model``: write it atomically; rebuild a ``LoadedModel`` from it alone.
- ``artifact_version``: the hash that names one trained artifact.
- ``artifact_table``, ``artifact_fingerprints``, ``artifact_feature_names``/``_kinds``: read one
  part of it without loading the model.
- ``UnsafeArtifact``: an artifact that would make ``load_model`` read outside it or run its code.

Reading config.json stays light: torch, transformers and the model code are imported by the
functions that need them, so the server builds its request models before it loads the model.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from common.config import atomic_dir
from data_preprocessing.posts import Post, PrepareConfig

if TYPE_CHECKING:  # imported where used: reading config.json must not import torch
    import torch

    from models.clip_regressor import CLIPRegressor, PostBatcher, TargetTransform
    from models.explain import Calibration, Reference
    from models.runtime import Embedder, RuntimeInfo

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


def read_config(model_dir: str | os.PathLike) -> dict:
    """The artifact's config.json. Raises ``FileNotFoundError`` when ``model_dir`` holds none."""
    cfg_path = Path(model_dir) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {model_dir} is not a model artifact "
                                "(expected RUN_DIR/model written by training/train_torch.py)")
    return json.loads(cfg_path.read_text())


def no_grad(method):
    """``torch.no_grad()`` around ``method``, with torch imported at the call rather than at import."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


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

    @no_grad
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model tensors -> (model-scale scores, label-unit engagement), both (B,) float64."""
        b = self._inputs(batch)
        img, txt = self._embed(b)
        s = self.model.head_forward(img, txt, b["sentiment"], b["features"]).double().cpu()
        score = self.target.unstandardise(s)
        return score, self.target.to_label_units(score)

    @no_grad
    def explain_batch(self, batch: dict[str, torch.Tensor]) -> "Predictions":
        """Model tensors -> scores, engagement, conformal intervals and Shapley contributions."""
        b = self._inputs(batch)
        img, txt = self._embed(b)
        return self.explain_embeddings(img, txt, b["sentiment"], b["features"])

    @no_grad
    def explain_embeddings(self, img: torch.Tensor, txt: torch.Tensor, sentiment: torch.Tensor,
                           features: torch.Tensor, contributions: bool = True) -> "Predictions":
        """``explain_batch`` from the towers' output on: (B, D) img and txt, (B,) sentiment, (B, F)
        encoded features, on the head's device. ``contributions=False`` runs the head once instead
        of 2^k times (no ``contributions``; the reference score still comes with it)."""
        import torch

        from models.explain import Reference, shapley

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
        import torch

        from models.embedding_cache import has_towers

        px, ids, mask = b["pixel_values"], b["input_ids"], b["attention_mask"]
        embedder = self.embedder or self.model
        if has_towers(embedder) or embedder is self.model:
            image, text = (embedder.image, embedder.text) if has_towers(embedder) else (
                self.model.embed_image, self.model.embed_text)
            # The captions in one padded text pass, as a micro-batch of posts runs them: five
            # passes of one caption cost twice one of five. Padding moves an embedding by ~1e-7,
            # within the 1e-6 that /predict's answers are matched to (tests/test_variants.py).
            img = image(px[:1])
            txt = text(ids, mask)
        else:
            img, txt = embedder(px, ids, mask)
            img = img[:1]
        device = b["sentiment"].device
        return img.to(device), txt.to(device)

    @no_grad
    def explain_variants(self, posts: Sequence[Post], rows: Sequence[dict], best_from: int = 0) -> "VariantPredictions":
        """C captions of one image (``posts``: the same image, each post's features ``rows[0]``) at
        R feature rows (posting times): the image embedded once, each caption once, the head once per
        caption x row, and exact contributions for each caption at ``rows[0]`` and for the best pair
        among rows ``best_from`` on. Each number is what ``explain_batch`` answers for that post, up
        to float rounding."""
        import torch

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
    return read_config(model_dir).get("table")


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
    from models.clip_regressor import CLIPRegressor, HeadConfig, PostBatcher, TargetTransform
    from models.explain import Calibration, Reference
    from models.runtime import choose_embedder

    model_dir = Path(model_dir)
    check_contained(model_dir)
    config = read_config(model_dir)
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



def artifact_feature_names(model_dir) -> tuple[str, ...]:
    """The feature columns a model artifact takes, from its ``config.json`` alone (no torch,
    no weights: the server builds its request models from them before loading the model).

    () when there is no readable artifact there: loading it later says what is wrong.
    """
    try:
        return tuple(PrepareConfig.from_dict(read_config(model_dir)["prepare"]).features.names)
    except (TypeError, OSError, ValueError, KeyError):
        return ()


def artifact_feature_kinds(model_dir) -> dict[str, str]:
    """Feature column -> kind (numeric, categorical, ...) of a model artifact, as
    ``artifact_feature_names`` reads them; {} when there is no readable artifact there."""
    try:
        config = read_config(model_dir)
        return {f["column"]["name"]: f["column"]["kind"] for f in config["prepare"]["features"]["features"]}
    except (TypeError, OSError, ValueError, KeyError):
        return {}
