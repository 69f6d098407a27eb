"""Image embeddings computed once: an LRU cache keyed by the pixels' hash and the model version,
and an embedder that goes through it.

A person tweaking captions sends the same image again and again, and a /predict/batch request
may hold one image several times. ``CachingEmbedder`` wraps an embedder whose towers run apart
(``image`` and ``text``: torch and bf16, ``models.runtime``): per call, the image tower runs once
per distinct image that is not in the cache, and the text tower for every caption. The key is a
hash of the uint8 pixels the tower sees (``PostBatcher.pixels``), so two files that decode to the
same pixels share an entry, and of the model version, so an entry never serves another model.

The ONNX embedders compute both towers in one graph, so they cannot skip the image tower: they are
not wrapped (``has_towers``), and every call embeds every image, as before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch


def has_towers(embedder) -> bool:
    """Whether ``embedder`` can run the image and the text tower separately."""
    return callable(getattr(embedder, "image", None)) and callable(getattr(embedder, "text", None))


class ImageEmbeddingCache:
    """At most ``max_entries`` (D,) image embeddings, least recently used out first (0: none kept).

    ``observe(hits, misses)``, if given, is told the counts of every lookup round (the server's
    /metrics). Used from the model's one thread only, so it takes no lock.
    """

    def __init__(self, max_entries: int, version: str, observe: Callable[[int, int], None] | None = None):
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.version = version
        self.observe = observe
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, pixels: torch.Tensor) -> str:
        """(3, H, W) pixels of one image -> its key: model version, shape, dtype and bytes, hashed."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.version}|{tuple(pixels.shape)}|{pixels.dtype}|".encode())
        h.update(pixels.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        emb = self._entries.get(key)
        if emb is not None:
            self._entries.move_to_end(key)
        return emb

    def put(self, key: str, emb: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = emb.detach()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        if self.observe is not None:
            self.observe(hits, misses)

    def stats(self) -> dict:
        return {"entries": len(self), "max_entries": self.max_entries, "hits": self.hits, "misses": self.misses}


class CachingEmbedder:
    """An embedder with towers (``has_towers``) whose image tower goes through ``cache``.

    A call embeds the distinct images of its batch that the cache lacks, in one tower pass; an
    image met again (in the cache, or earlier in the same batch) counts as a hit, a distinct one
    embedded as a miss.
    """

    def __init__(self, inner, cache: ImageEmbeddingCache):
        if not has_towers(inner):
            raise ValueError(f"the {getattr(inner, 'name', inner)!r} embedder cannot run its image tower alone")
        self.inner = inner
        self.cache = cache
        self.name = inner.name

    def __call__(self, pixel_values, input_ids, attention_mask):
        return self.image(pixel_values), self.text(input_ids, attention_mask)

    def image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), each distinct image not in the cache through the tower once."""
        keys = [self.cache.key(px) for px in pixel_values]
        found = {k: e for k in dict.fromkeys(keys) if (e := self.cache.get(k)) is not None}
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            rows = [keys.index(k) for k in todo]  # the first row of each missing image
            for k, emb in zip(todo, self.inner.image(pixel_values[rows])):
                found[k] = emb
                self.cache.put(k, emb)
        self.cache.count(hits=len(keys) - len(todo), misses=len(todo))
        return torch.stack([found[k] for k in keys])

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner.text(input_ids, attention_mask)
