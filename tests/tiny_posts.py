"""A tiny preprocessed dataset for training tests, written straight to record files.

Not a test module: ``test_train.py`` and ``test_train_ddp.py`` import it. It writes what
``data_preprocessing/preprocess.py`` writes (records + meta.json) without decoding JPEGs,
so a 48-post set takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_preprocessing.posts import Record
from data_preprocessing.prepare import CLEANING_VERSION
from data_preprocessing.records import RecordWriter

WORDS = "sunset beach dog pizza coffee city forest gym cat happy love new morning friends".split()


def write_tiny_posts(out_dir: Path, counts=(("train", 32), ("val", 8), ("test", 8)), seed: int = 0,
                     shortest_edge: int = 224) -> Path:
    """Posts whose label depends on image colour and sentiment (so there is signal to learn)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row = 0
    for split, n in counts:
        writer = RecordWriter(out_dir, split)
        for _ in range(n):
            colour = rng.integers(0, 256, 3)
            # Already at the processor's resize size, as preprocess.py would leave it.
            pixels = np.clip(rng.normal(colour, 30, (shortest_edge, shortest_edge + 32, 3)), 0, 255)
            sentiment = float(rng.uniform(-1, 1))
            likes = float(np.round(np.expm1(3 + colour[0] / 100 + sentiment + rng.normal(0, 0.3))))
            writer.write(Record(image=Image.fromarray(pixels.astype(np.uint8)),
                                text=" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))),
                                sentiment=sentiment, label=likes, row=row))
            row += 1
        writer.close()
    meta = {"cleaning_version": CLEANING_VERSION, "counts": {"splits": dict(counts)},
            "image_size_policy": {"shortest_edge": shortest_edge, "resample": 3, "resample_name": "BICUBIC"}}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir
