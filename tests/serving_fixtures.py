"""Helpers for the serving tests: a tiny model artifact, real image files, clients, and a
spy on the model. The fixtures themselves live in tests/conftest.py.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data_preprocessing.features import FeatureColumn, FeatureSchema
from data_preprocessing.posts import PrepareConfig


FEATURE_COLUMNS = (FeatureColumn("followers", "numeric", 0.0, None), FeatureColumn("platform", "categorical"))


def build_artifact(root: Path, seed: int = 0, features: bool = False, datetime_column: str | None = None) -> Path:
    """A complete model artifact around a random tiny CLIP: ``root/run/model``, with a
    conformal calibration (80%: +-0.7 on the model scale) and a contributions reference;
    ``features=True`` adds a numeric ``followers`` and a categorical ``platform`` column,
    ``datetime_column`` a timestamp column of that name (the datetime kind of issue 30)."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from data_preprocessing.prepare import ResizePolicy
    from models.artifact import save_artifact
    from models.clip_regressor import CLIPRegressor, TargetTransform
    from models.explain import Calibration, Reference
    from models.tiny_clip import build_tiny_clip

    clip_dir = build_tiny_clip(root / "tiny_clip", preset="tiny", seed=seed)
    processor = CLIPProcessor.from_pretrained(clip_dir)
    schema = FeatureSchema()
    columns, values = (FEATURE_COLUMNS, {"followers": [10.0, 1000.0, 50000.0, None],
                                         "platform": ["x", "tiktok", "x", None]}) if features else ((), {})
    if datetime_column:
        column = FeatureColumn(datetime_column, "datetime")
        columns += (column,)
        values[datetime_column] = [column.parse(t) for t in ("2025-03-03T08:00", "2025-03-05T19:30",
                                                             "2025-03-08T23:00", None)]
    if columns:
        schema = FeatureSchema.fit(columns, values)
    torch.manual_seed(seed)  # the head's init
    model = CLIPRegressor(CLIPModel.from_pretrained(clip_dir), n_features=schema.width)
    torch.nn.init.normal_(model.head.mlp[-1].weight, std=0.5)  # not just the linear path
    d = model.clip.config.projection_dim
    g = torch.Generator().manual_seed(seed + 1)
    ref = Reference(torch.randn(d, generator=g), torch.randn(d, generator=g), torch.tensor(0.1),
                    torch.from_numpy(schema.encode([{"followers": 1000.0, "platform": "x"}])[0]))  # others missing
    prep = PrepareConfig(ResizePolicy.from_image_processor(processor.image_processor), features=schema)
    extra = {"metrics": {"test": {"rmse": 1.25, "r2": 0.1}}, "git_commit": "test", "training_args": {"epochs": 0}}
    return save_artifact(model, processor, TargetTransform("log1p", 3.0, 1.5), root / "run" / "model",
                         prepare=prep, extra_config=extra, calibration=Calibration({"0.8": 0.7}, 50), reference=ref)


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


class ModelSpy:
    """Stands in for the loaded model (``LoadedModel``) and passes everything through;
    ``before(batch)``, when set, first sees each batch's model tensors (in the inference
    thread). tests/test_parity.py records them; the load tests sleep or raise in it."""

    def __init__(self) -> None:
        self.loaded = None
        self.before: Callable[[dict], None] | None = None

    def load(self, model_dir: Path, runtime: str = "torch") -> "ModelSpy":
        from models.artifact import load_model

        self.loaded = load_model(model_dir, runtime=runtime)
        return self

    def __getattr__(self, name: str):
        return getattr(self.loaded, name)

    def explain_batch(self, batch: dict):
        if self.before is not None:
            self.before(batch)
        return self.loaded.explain_batch(batch)


def serving_app(model_dir: Path, spy: ModelSpy | None = None, **settings):
    """The app for ``model_dir`` and these settings; with ``spy``, the model is loaded
    through it (the ``get_model_loader`` seam)."""
    from serving.app import create_app
    from serving.predictor import get_model_loader
    from serving.settings import ServingSettings

    app = create_app(ServingSettings(model_dir=model_dir, **settings))
    if spy is not None:
        app.dependency_overrides[get_model_loader] = lambda: spy.load
    return app


@contextmanager
def serving_client(model_dir: Path, raise_server_exceptions: bool = True, spy: ModelSpy | None = None, **settings):
    """A TestClient whose lifespan (model load, batcher) runs for the ``with`` block."""
    from fastapi.testclient import TestClient

    with TestClient(serving_app(model_dir, spy, **settings), raise_server_exceptions=raise_server_exceptions) as client:
        yield client


@contextmanager
def loopback(app):
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process (so a
    test can reach ``app.state``); yields the base URL once the lifespan has run."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def service(client):
    """The running ``serving.service.Service`` behind a TestClient (predictor, batcher, ...)."""
    return client.app.state.service


def multipart(image: bytes, text: str | None, filename: str = "photo.jpg", mime: str = "image/jpeg") -> dict:
    """kwargs for ``client.post`` sending one post as multipart/form-data."""
    kw: dict = {"files": {"image": (filename, image, mime)}}
    if text is not None:
        kw["data"] = {"text": text}
    return kw


def numbered(files: list, **columns: list) -> dict:
    """kwargs for ``client.post`` sending a multipart batch: ``files`` (filename, bytes, mime) and each
    column's values (text, followers, ...) as post i's fields image_i, text_i, followers_i, ..."""
    data = {f"{name}_{i}": v for name, values in columns.items() for i, v in enumerate(values)}
    return {"files": {f"image_{i}": f for i, f in enumerate(files)}, "data": data}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
