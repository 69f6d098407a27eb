"""Who computes the CLIP embeddings at inference: eager torch, bf16 autocast, or ONNX Runtime.

The two CLIP towers are nearly all of a prediction's cost; the head and the exact Shapley
contributions run on the (B, D) embeddings and stay in torch, fp32, either way (tiny, and exact).
``LoadedModel`` calls an ``Embedder``; ``choose_embedder`` picks one for ``load_model``:

- ``torch``: ``CLIPRegressor.embed``, eager fp32.
- ``bf16``: the same under ``torch.autocast(bfloat16)``, embeddings returned in fp32. Fast where
  the matmuls run natively in bf16 (CPUs with AMX or AVX512_BF16, GPUs), slower than fp32 elsewhere.
- ``onnx``: an ``onnxruntime.InferenceSession`` on ``MODEL_DIR/onnx/embed.onnx``, written by
  ``python -m models.export_onnx MODEL_DIR``; CPU only.
- ``int8``: the same on ``embed.int8.onnx``, its dynamic int8 quantisation, written next to it
  by ``--quantize int8``. It moves single predictions far more than bf16 does (docs/serving.md,
  "CPU runtimes"), so
  only a user who asks for it gets it: ``auto`` never picks it.
- ``auto``: every candidate this machine can run well (torch; onnx with a usable export; bf16
  where ``native_bf16()``), timed on warm-up batches of 1 and 16 posts; each batch then goes to
  the one that was fastest at the nearer timed size (on log scale: up to 4 posts, the batch-1
  pick). A server answering one request at a time and one filling micro-batches may want
  different runtimes.

The choice, and why, is recorded in a ``RuntimeInfo`` (``LoadedModel.runtime``, /metadata).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "bf16", "onnx", "int8", "auto")
ONNX_SUBDIR = "onnx"  # inside the model artifact
EMBED_FILE = "embed.onnx"  # uint8 pixels + input_ids + attention_mask -> img, txt
INT8_FILE = "embed.int8.onnx"  # embed.onnx with int8 weights (export --quantize int8)
HEAD_FILE = "head.onnx"  # img, txt, sentiment, features -> model-scale score (torch-free deploys)
EXPORT_CONFIG = "export.json"
EMBED_INPUTS = ("pixel_values", "input_ids", "attention_mask")
EMBED_OUTPUTS = ("img", "txt")
EXPORT_COMMAND = "python -m models.export_onnx {model_dir}"
INT8_COMMAND = EXPORT_COMMAND + " --quantize int8"
TIMED_BATCH_SIZES = (1, 16)  # auto: the server's lone request and a full micro-batch
SAMPLE_CAPTIONS = ("Golden hour at the beach with friends, best weekend of the summer! travel sunset friends",
                   "new shoes", "Morning coffee and a good book before work. What are you reading this week?")


class Embedder(Protocol):
    name: str

    def __call__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8, (B, T), (B, T) -> (B, D) image and (B, D) text embeddings, L2-normalised."""


class TorchEmbedder:
    """Eager ``CLIPRegressor.embed``."""

    name = "torch"

    def __init__(self, model):
        self.model = model

    def __call__(self, pixel_values, input_ids, attention_mask):
        return self.model.embed(pixel_values, input_ids, attention_mask)

    # Each tower alone (models/embedding_cache.py): an image embedded once serves many captions.
    def image(self, pixel_values):
        return self.model.embed_image(pixel_values)

    def text(self, input_ids, attention_mask):
        return self.model.embed_text(input_ids, attention_mask)


class Bf16Embedder:
    """``CLIPRegressor.embed`` under bf16 autocast; fp32 embeddings out, re-normalised in fp32."""

    name = "bf16"

    def __init__(self, model):
        self.model = model

    def __call__(self, pixel_values, input_ids, attention_mask):
        device = pixel_values.device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            img, txt = self.model.embed(pixel_values, input_ids, attention_mask)
        unit = torch.nn.functional.normalize  # the head was trained on unit fp32 embeddings
        return unit(img.float(), dim=-1), unit(txt.float(), dim=-1)

    def image(self, pixel_values):
        with torch.autocast(pixel_values.device.type, dtype=torch.bfloat16):
            img = self.model.embed_image(pixel_values)
        return torch.nn.functional.normalize(img.float(), dim=-1)

    def text(self, input_ids, attention_mask):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16):
            txt = self.model.embed_text(input_ids, attention_mask)
        return torch.nn.functional.normalize(txt.float(), dim=-1)


def native_bf16() -> str:
    """The CPU feature with which oneDNN runs bf16 matmuls natively, or "" where bf16 is emulated
    (and slower than fp32): "AMX" (Intel Sapphire Rapids and later), "AVX512_BF16" (AMD Zen 4,
    Intel Cooper Lake). Either ran B/32 about 2x faster than fp32 at a batch of posts (BENCHMARKS.md, section 4)."""
    for isa, name in (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        probe = getattr(torch.cpu, name, None)  # private, so looked up defensively
        if probe and probe():
            return isa
    return ""


class OnnxEmbedder:
    """An ONNX Runtime CPU session on the exported embedding graph (``name`` "int8" on its
    quantisation)."""

    def __init__(self, path: str | Path, threads: int | None = None, name: str = "onnx"):
        import onnxruntime as ort

        self.name = name

        opts = ort.SessionOptions()
        # The server runs one inference at a time (one inference thread), so all the threads
        # go to each op, as torch does: intra-op = torch's count, no inter-op parallelism.
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool spins inside a run (fast) and, by default, for a while after it returns, on the
        # cores that the torch head, the event loop and the next post's decoding then need.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values, input_ids, attention_mask):
        feeds = {"pixel_values": pixel_values.cpu().to(torch.uint8).numpy(),
                 "input_ids": input_ids.cpu().long().numpy(),
                 "attention_mask": attention_mask.cpu().long().numpy()}
        img, txt = self.session.run(list(EMBED_OUTPUTS), feeds)
        return torch.from_numpy(img), torch.from_numpy(txt)  # (B, D) float32 each


@dataclass
class RuntimeInfo:
    """Which runtime computes the embeddings, and why (``LoadedModel.runtime``, /metadata)."""

    name: str  # the one in use: "torch", "bf16", "onnx", "int8", or auto's picks joined, e.g. "onnx+bf16"
    requested: str  # one of RUNTIMES
    reason: str
    export: dict | None = None  # the export's export.json, when an ONNX session is in use
    # auto only: runtime -> {batch size: ms per post}, from the warm-up timing
    ms_per_post: dict[str, dict[str, float]] = field(default_factory=dict)
    by_batch_size: dict[str, str] = field(default_factory=dict)  # auto only: timed batch size -> runtime


def export_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / ONNX_SUBDIR


def read_export(model_dir: str | Path, version: str, file: str = EMBED_FILE) -> tuple[dict | None, str]:
    """(export.json, "") when ``model_dir`` has an export made from this artifact ``version``
    with ``file`` in it, else (None, why not): missing, or stale (the artifact changed after
    the export)."""
    cfg_path = export_dir(model_dir) / EXPORT_CONFIG
    command = (INT8_COMMAND if file == INT8_FILE else EXPORT_COMMAND).format(model_dir=model_dir)
    if not cfg_path.is_file() or not (export_dir(model_dir) / file).is_file():
        return None, f"{model_dir} has no ONNX export ({ONNX_SUBDIR}/{file}); run: {command}"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("source_version") != version:
        return None, (f"the ONNX export in {export_dir(model_dir)} was made from artifact version "
                      f"{cfg.get('source_version')!r}, not this one ({version!r}); re-run: {command}")
    if cfg.get("quantize") and "int8" not in cfg:  # the older layout, where embed.onnx itself was int8
        return None, (f"the ONNX export in {export_dir(model_dir)} has an int8 {EMBED_FILE} (an older "
                      f"--quantize int8, before {INT8_FILE}); re-run: {command}")
    return cfg, ""


def choose_embedder(model, model_dir: str | Path, version: str, runtime: str, device: str | torch.device,
                    batcher) -> tuple[Embedder, RuntimeInfo]:
    """The embedder ``load_model(..., runtime=)`` asked for, and the record of the choice.

    ``runtime="onnx"`` (or ``"int8"``) without a usable export raises FileNotFoundError naming
    the command to run; ``"auto"`` leaves onnx out then, and says so in the reason.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    eager = TorchEmbedder(model)
    if runtime == "torch":
        return eager, RuntimeInfo("torch", runtime, "requested (runtime=torch)")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "bf16":
        slow = on_cpu and not native_bf16()
        return Bf16Embedder(model), RuntimeInfo("bf16", runtime, "requested (runtime=bf16)" + (
            "; this CPU has neither AMX nor AVX512_BF16: bf16 is emulated, likely slower than runtime=torch"
            if slow else ""))
    if runtime in ("onnx", "int8"):
        if not on_cpu:
            raise ValueError(f"runtime={runtime!r} runs on the CPU (ONNX Runtime's CPU provider), not on {device}; "
                             "use runtime='torch' there")
        file = INT8_FILE if runtime == "int8" else EMBED_FILE
        export, why_not = read_export(model_dir, version, file)
        if export is None:
            raise FileNotFoundError(why_not)
        return (OnnxEmbedder(export_dir(model_dir) / file, name=runtime),
                RuntimeInfo(runtime, runtime, f"requested (runtime={runtime})", export))
    export, why_not = read_export(model_dir, version)
    if not on_cpu:
        return eager, RuntimeInfo("torch", runtime, f"auto: on {device} torch runs the model (ONNX here is CPU only)")
    candidates, notes = [eager], []
    if export is None:
        notes.append(why_not)
    else:
        candidates.append(OnnxEmbedder(export_dir(model_dir) / EMBED_FILE))
    if native_bf16():
        candidates.append(Bf16Embedder(model))
    else:
        notes.append("bf16 left out: this CPU has neither AMX nor AVX512_BF16 (bf16 would be emulated)")
    return fastest(candidates, batcher, export, notes)


class ByBatchSize:
    """auto's router: each batch to the embedder that was fastest at the timed batch size nearest
    its own on log scale (timed at 1 and 16: up to 4 posts take the batch-1 pick)."""

    def __init__(self, picks: dict[int, Embedder]):
        self.sizes, self.picks = sorted(picks), picks
        self.name = "+".join(dict.fromkeys(picks[size].name for size in self.sizes))

    def route(self, n: int) -> Embedder:
        for size, bigger in zip(self.sizes, self.sizes[1:]):
            if n * n <= size * bigger:  # n at most the geometric midpoint, in integers
                return self.picks[size]
        return self.picks[self.sizes[-1]]

    def __call__(self, pixel_values, input_ids, attention_mask):
        return self.route(len(pixel_values))(pixel_values, input_ids, attention_mask)


def fastest(candidates: list[Embedder], batcher, export: dict | None, notes: list[str]) -> tuple[Embedder, RuntimeInfo]:
    """Time the candidates on the same warm-up batches; at each timed batch size keep the fastest."""
    if len(candidates) == 1:
        return candidates[0], RuntimeInfo(candidates[0].name, "auto", "auto: " + "; ".join(notes))
    batches = {n: sample_batch(batcher, n) for n in TIMED_BATCH_SIZES}
    ms = {e.name: ms_per_post(e, batches) for e in candidates}
    by_name = {e.name: e for e in candidates}
    picks = {str(n): min(ms, key=lambda name: ms[name][str(n)]) for n in TIMED_BATCH_SIZES}
    router = ByBatchSize({int(n): by_name[name] for n, name in picks.items()})
    chosen = by_name[router.name] if router.name in by_name else router  # one pick: no router needed
    timed = "; ".join(f"{name} " + " / ".join(f"{v:.1f}" for v in per.values()) for name, per in ms.items())
    sizes = " / ".join(map(str, TIMED_BATCH_SIZES))
    reason = "; ".join([f"auto: ms per post at batch {sizes}: {timed}; fastest: " +
                        ", ".join(f"{name} at batch {n}" for n, name in picks.items()), *notes])
    log.info("runtime %s", reason)
    return chosen, RuntimeInfo(router.name, "auto", reason, export if "onnx" in picks.values() else None, ms, picks)


def sample_batch(batcher, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` synthetic posts (noise images, typical captions) as model tensors: timing, export, checks."""
    import numpy as np
    from PIL import Image

    from data_preprocessing.posts import Post

    rng = np.random.default_rng(seed)
    # Captions of different lengths, so a batch is padded (attention_mask has zeros) as in serving.
    posts = [Post(Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)),
                  SAMPLE_CAPTIONS[i % len(SAMPLE_CAPTIONS)], 0.5, dict.fromkeys(batcher.features.names))
             for i in range(n)]
    return batcher(posts)


@torch.no_grad()
def ms_per_post(embed: Embedder, batches: dict[int, dict[str, torch.Tensor]], repeats: int = 3) -> dict[str, float]:
    """Batch size (as a string, JSON's key type) -> the best of ``repeats`` forwards, ms per post."""
    out = {}
    for n, b in batches.items():
        args = (b["pixel_values"], b["input_ids"], b["attention_mask"])
        embed(*args)  # the first pass at a new shape pays allocation and shape inference
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            embed(*args)
            best = min(best, time.perf_counter() - t0)  # the least disturbed run: the CPU may be shared
        out[str(n)] = 1000.0 * best / n
    return out
