"""Shared helpers for the serving tests: a tiny model artifact, real image files, clients.

Imported by tests/test_serving*.py and tests/test_parity.py (not a conftest, so that it
stays out of other test files' way). The artifact is built once per test session.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_ARTIFACT: Path | None = None  # built once per session, shared by every serving test module


def build_artifact(root: Path, seed: int = 0) -> Path:
    """A complete model artifact around a random tiny CLIP: ``root/run/model``."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from models.clip_regressor import CLIPRegressor, TargetTransform, save_artifact
    from models.tiny_clip import build_tiny_clip

    clip_dir = build_tiny_clip(root / "tiny_clip", preset="tiny", seed=seed)
    torch.manual_seed(seed)  # the head's init
    model = CLIPRegressor(CLIPModel.from_pretrained(clip_dir))
    processor = CLIPProcessor.from_pretrained(clip_dir)
    extra = {"metrics": {"test": {"rmse": 1.25, "r2": 0.1}}, "git_commit": "test", "training_args": {"epochs": 0}}
    return save_artifact(model, processor, TargetTransform("log1p", 3.0, 1.5), root / "run" / "model",
                         extra_config=extra)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    global _ARTIFACT
    if _ARTIFACT is None or not (_ARTIFACT / "config.json").is_file():
        _ARTIFACT = build_artifact(tmp_path_factory.mktemp("serving_artifact"))
    return _ARTIFACT


# --- real image files -------------------------------------------------------------------


def photo_array(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus noise, so JPEG has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     np.full_like(x, rng.integers(0, 256), dtype=np.float64)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    return encode(Image.fromarray(photo_array(width, height, seed)), "JPEG", quality=90)


def png_bytes(width: int = 300, height: int = 260, seed: int = 1, alpha: bool = True) -> bytes:
    """An RGBA PNG (transparency exercises load_image's compositing) or RGB."""
    arr = photo_array(width, height, seed)
    if alpha:
        a = np.full((height, width, 1), 255, np.uint8)
        a[: height // 3] = 90
        return encode(Image.fromarray(np.concatenate([arr, a], axis=-1), "RGBA"), "PNG")
    return encode(Image.fromarray(arr), "PNG")


def corrupt_png_bytes() -> bytes:
    """A PNG whose compressed pixel data is scrambled: load_image says ``corrupt``."""
    png = png_bytes(alpha=False)
    i = png.index(b"IDAT")
    return png[:i + 100] + bytes(b ^ 0x55 for b in png[i + 100:i + 2100]) + png[i + 2100:]


def zero_size_png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# --- clients ------------------------------------------------------------------------------


@contextmanager
def serving_client(model_dir: Path, raise_server_exceptions: bool = True, **settings):
    """A TestClient whose lifespan (model load, batcher) runs for the ``with`` block."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServingSettings

    app = create_app(ServingSettings(model_dir=model_dir, **settings))
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield client


def service(client):
    """The running ``serving.app.Service`` behind a TestClient (predictor, batcher, ...)."""
    return client.app.state.service


def multipart(image: bytes, text: str | None, filename: str = "photo.jpg", mime: str = "image/jpeg") -> dict:
    """kwargs for ``client.post`` sending one post as multipart/form-data."""
    kw: dict = {"files": {"image": (filename, image, mime)}}
    if text is not None:
        kw["data"] = {"text": text}
    return kw


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
