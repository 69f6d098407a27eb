"""Serving settings: one pydantic-settings object, read from environment variables.

Every knob of the server lives here, with its default and its reason, so ``/metadata``
and the README table are generated from one place. Variable names are the field names in
upper case (``MODEL_DIR``, ``MAX_BATCH_SIZE``, ...), no prefix.

The app reads settings only through the ``get_settings`` dependency. Tests override it
(``app.dependency_overrides[get_settings] = lambda: ServingSettings(...)``); the lifespan
resolves the same override, so startup, middleware and endpoints see one object.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from data_preprocessing.prepare import MAX_PIXELS as PREPARE_MAX_PIXELS


class ServingSettings(BaseSettings):
    """Environment configuration of ``serving.app`` (the README's Settings table)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    model_dir: Path | None = Field(
        Path("runs/latest/model"),
        description="model artifact directory (RUN_DIR/model written by training/train_torch.py); default the "
                    "newest finished run's, runs/latest/model, relative to the current directory (README, "
                    "\"On your own data\")")
    max_batch_size: int = Field(
        16, ge=1, le=1024, description="most posts one forward pass takes (micro-batch size cap)")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000,
        description="longest a micro-batch waits for requests that are still being decoded (a lone request "
                    "never waits); trades a little latency for throughput")
    max_queue: int = Field(
        64, ge=1, description="posts waiting for the model before new requests get 503 + Retry-After")
    request_timeout_s: float = Field(
        30.0, gt=0, description="per-request deadline from the end of its headers: reading the body (past it 408), "
                                "then decode + queue + inference (past it 504)")
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024,
        description="largest request body, counted as it streams (chunked bodies too); past it 413")
    max_inflight_bytes: int = Field(
        128 * 1024 * 1024, ge=1024,
        description="request body bytes held across the server at once (each request's Content-Length, or its bytes "
                    "as they stream); past it 503 overloaded. A request is always let in when no other body is held")
    max_pixels: int = Field(
        PREPARE_MAX_PIXELS, ge=1,
        description="largest image (width x height), checked from the header before decoding; past it 413")
    max_decode_pixels: int = Field(
        64_000_000, ge=1,
        description="pixels (width x height, from each image's header) being decoded at once across the server; a "
                    "post waits up to DECODE_WAIT_S for room, else the request gets 503 overloaded. An image larger "
                    "than this (within MAX_PIXELS) is decoded when no other is; the default fits one image at MAX_PIXELS and "
                    "phone photos beside it")
    decode_wait_s: float = Field(
        2.0, gt=0, description="longest a post waits for room in MAX_DECODE_PIXELS before its request gets 503")
    max_caption_chars: int = Field(
        2200, ge=1, description="longest raw caption accepted (Instagram's own limit); past it 422")
    max_posts_per_request: int = Field(
        32, ge=1, description="most posts in one /predict/batch request; past it 413")
    image_cache_size: int = Field(
        256, ge=0, description="image embeddings kept (LRU, by pixels and model version) so a repeated image "
                               "skips the image tower (/predict/variants while captions are tweaked); 0 keeps "
                               "none. Torch and bf16 runtimes only: the ONNX graphs run both towers at once")
    micro_batching: bool = Field(
        True, description="group concurrent requests into micro-batches; 0 runs each post alone (benchmarks)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads for inference; unset keeps torch's default")
    runtime: Literal["torch", "bf16", "onnx", "int8", "auto"] = Field(
        "torch", description="who computes the CLIP embeddings: torch (eager fp32), bf16 (torch bf16 autocast: fast "
                             "on CPUs with AMX or AVX512_BF16), onnx (ONNX Runtime on the CPU, needs `python -m models.export_onnx "
                             "MODEL_DIR` first), int8 (ONNX Runtime on the int8 export, `--quantize int8`; moves single "
                             "predictions more, see README), or auto (times torch, onnx and bf16 at startup and keeps the "
                             "fastest per batch size; never int8); /metadata says which and why")

    def limits(self) -> dict:
        """The settings as plain JSON values (for /metadata); model_dir by its names, never
        the absolute path (/metadata is open to anyone who can reach the server)."""
        out = self.model_dump()
        out["model_dir"] = short_path(self.model_dir) if self.model_dir is not None else None
        return out


def short_path(path: str | Path) -> str:
    """A path as its last two names ("run/model" of RUN_DIR/model), for answers that must
    not show where files live on the server."""
    parts = Path(path).parts[-2:]
    return "/".join(p for p in parts if p not in ("/", "\\")) or "."


# The defaults, built without reading the environment (so importing never fails): what
# the body limit and the placeholder routes use before the lifespan resolves settings.
DEFAULT_SETTINGS = ServingSettings.model_construct()


@lru_cache(maxsize=1)
def get_settings() -> ServingSettings:
    """The FastAPI dependency that provides settings; read from the environment once."""
    return ServingSettings()
