"""Build a small CLIP checkpoint offline, optionally pretrained on a posts table.

No model hub is reachable in tests or CI, yet training and serving load CLIP through
``CLIPModel.from_pretrained(dir)`` / ``CLIPProcessor.from_pretrained(dir)`` exactly as they
load "openai/clip-vit-base-patch32" in production. This module writes a directory that
those calls accept: ``config.json``, ``model.safetensors``, a real CLIP byte-level BPE
tokenizer learned locally, and the standard CLIP image processor config.

Presets (``tiny_clip_config``):

| preset | vision            | text              | proj | use                         |
|--------|-------------------|-------------------|------|-----------------------------|
| tiny   | 224/32, 128x4, 4h | 128x4, 4h, 77 pos | 128  | tests and CPU demos (~3M p) |
| b32    | CLIPConfig() defaults (ViT-B/32 shape, random init)  | benchmarks (~151M p)  |

Library use::

    from models.tiny_clip import build_tiny_clip
    path = build_tiny_clip(tmp_path / "clip")          # seconds, random init
    model = CLIPModel.from_pretrained(path)

CLI (``python models/tiny_clip.py --help``) can also pretrain the tiny model contrastively
on a posts table, so that a demo run starts from a CLIP whose towers already agree a little.
A few thousand posts overfit within a few epochs, so every epoch is scored on held-out
posts and the epoch that retrieves best (``retrieval_scores``' rank score) is the one saved;
``pretrain.json`` holds the per-epoch curve and the choice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import atomic_dir, bar_disabled, config_dict, field, git_commit, parse_config, setup_logging, write_json_atomic
from data_preprocessing.download import DownloadArgs, DownloadConfig
from data_preprocessing.table import (ColumnMap, PostsTable, ReadOptions, TableError, encoding_field, image_source,
                                      max_cell_chars_field, read_table, resolve_image_sources, sep_field,
                                      split_names)

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "b32")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also pad and unk, as in OpenAI CLIP
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer split (the same regex transformers' CLIPTokenizer installs), so the
# merges are learned on exactly the pieces the saved tokenizer will see.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Sub-config overrides per preset; anything not named keeps the CLIPConfig() default.
# "tiny" keeps image_size 224 / patch 32 / 77 positions so the processor is the stock CLIP one.
_PRESET_OVERRIDES: dict[str, dict[str, dict]] = {
    "tiny": {
        "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       image_size=224, patch_size=32),
        "text": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=77),
        "top": dict(projection_dim=128),
    },
    "b32": {"vision": {}, "text": {}, "top": {}},
}

# Used when no captions are given: enough everyday English for common words and affixes
# to get their own merges. Anything else still tokenizes, byte by byte.
_BUILTIN_CORPUS = """\
A photo of a dog playing in the park on a sunny afternoon.
Sunset over the ocean, the sky turned orange, pink and purple.
Best pizza in town! Fresh mozzarella, basil and a crispy crust.
Morning coffee and a good book, the perfect way to start the weekend.
We finally made it to the top of the mountain after hiking for six hours.
My cat is sleeping on the keyboard again, so no work today.
New recipe: chocolate chip cookies with sea salt and brown butter.
Throwback to our summer holiday at the beach with friends and family.
The city lights at night look amazing from the rooftop bar.
Happy birthday to my best friend, love you so much!
Just finished my first marathon, tired but so happy and proud.
Rainy days are for staying inside with tea, blankets and movies.
Check out the new collection in our shop, link in bio.
This little garden is growing flowers, tomatoes, herbs and strawberries.
A quiet walk through the forest, green trees and the sound of birds.
Wedding day! Thank you to everyone who came to celebrate with us.
The new album is out now, listen to it everywhere and tell us what you think.
Delicious breakfast with pancakes, berries, maple syrup and orange juice.
Road trip across the country, stopping at small towns and beautiful lakes.
Training hard at the gym every morning, no excuses, stay strong.
Our puppy learned to sit and give paw this week, such a good boy.
Snow covered the streets overnight and the children built a snowman.
Fashion week looks: black dress, red shoes, white jacket and gold earrings.
Homemade bread fresh out of the oven, warm and soft inside.
Watching the football game with the whole team, what a goal!
The museum has a new exhibition of paintings, photographs and sculptures.
Spring is here, the flowers are blooming and the days are getting longer.
Late night coding session, building something exciting, stay tuned.
Thank you for one million followers, we could not have done it without you.
Sale ends tonight, get twenty percent off everything in the store.
Travelling through Italy: Rome, Florence, Venice and the coast of Amalfi.
The kids painted the fence blue and yellow, it looks wonderful.
Yoga on the beach at sunrise, breathing, stretching and feeling grateful.
Quick and healthy dinner: grilled chicken, rice, avocado and salad.
Concert last night was incredible, the crowd was singing every song.
Cozy autumn evening with pumpkin soup, candles and falling leaves.
Beautiful architecture, old buildings, narrow streets and colourful windows.
Learning to play the guitar, practicing a little bit every single day.
Family dinner at grandma's house, she cooked her famous lasagna.
Good vibes only, smiling, laughing and enjoying the little things.
What a view from the plane window, clouds, mountains and blue water.
I can't believe how fast this year went, thank you all for the support.
They're opening a new cafe downtown, we'll be there on Saturday.
You've got to try these tacos, they're the best I've ever had.
Amazing work by the whole team, proud of what we built together.
Car wash, oil change and a long drive on the highway, feeling free.
The baby smiled for the first time today, our hearts are full.
Golden hour light in the field, wild horses running across the grass.
Meal prep Sunday: vegetables, pasta, soup and fruit for the week.
Celebrating ten years of our small business, thank you to our customers.
"""


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def builtin_corpus() -> list[str]:
    """Text for merges when no captions are given: the sentences above, VADER's ~7.5k
    English lexicon words and its emoji names ("😍 smiling face with heart-eyes").

    vaderSentiment is already a runtime dependency (``prepare.sentiment``), and its word
    list gives a few thousand English merges plus merged emoji byte sequences.
    """
    texts = _BUILTIN_CORPUS.splitlines()
    try:
        import vaderSentiment

        folder = Path(vaderSentiment.__file__).parent
        words = (folder / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines()
        texts += [line.split("\t", 1)[0] for line in words if line.strip()]
        emoji = (folder / "emoji_utf8_lexicon.txt").read_text(encoding="utf-8").splitlines()
        texts += [line.replace("\t", " ") for line in emoji if line.strip()]
    except (ImportError, OSError):  # still a working tokenizer, just fewer merges
        logger.warning("vaderSentiment lexicon not found; learning merges from the short built-in text only")
    return texts


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable unicode char table (GPT-2/CLIP byte-level BPE alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted above 255,
    so every byte sequence (emoji, CJK, control bytes) becomes a string of vocab chars.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pre_tokenizer():
    """transformers' CLIPTokenizer normalizer + pre-tokenizer (NFC, whitespace, lower-case;
    CLIP split, then byte-level), so merges are learned on the pieces encoding will see."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return normalizer, pre_tokenizer


def _word_freqs(texts: Iterable[str]) -> tuple[list[list[str]], list[int]]:
    """Distinct pre-tokenized words of ``texts`` (sorted) and their counts; a word is its
    byte-level chars with ``</w>`` fused onto the last one."""
    normalizer, pre_tokenizer = _clip_pre_tokenizer()
    counts: Counter = Counter()
    for text in texts:
        if text and text.strip():
            counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in sorted(counts)]
    return words, [counts[w] for w in sorted(counts)]


def _merge_pair(pair: tuple[str, str], words: list[list[str]], freqs: list[int], where: dict,
                pair_counts: Counter) -> set:
    """Merge ``pair`` in every word that holds it, updating ``pair_counts`` and ``where``
    in place; return the pairs whose counts changed."""
    a, b = pair
    merged = a + b
    touched = set()
    for wi in sorted(where.pop(pair)):
        w, f = words[wi], freqs[wi]
        new_w, i = [], 0
        while i < len(w):
            if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                new_w.append(merged)
                i += 2
            else:
                new_w.append(w[i])
                i += 1
        if len(new_w) == len(w):
            continue  # the index is a superset; this word no longer holds the pair
        for q in zip(w, w[1:]):
            pair_counts[q] -= f
            touched.add(q)
        for q in zip(new_w, new_w[1:]):
            pair_counts[q] += f
            where[q].add(wi)
            touched.add(q)
        words[wi] = new_w
    return touched


def learn_clip_bpe(texts: Iterable[str] | None = None, vocab_size: int = 4096,
                   min_frequency: int = 2) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style BPE ``(vocab, merges)`` from ``texts`` (built-in corpus if None).

    The layout copies OpenAI's: the 256 byte chars, the same 256 with ``</w>``, then one
    token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last. Every byte is
    in the vocab with and without ``</w>``, so no input ever needs the unknown token.
    ``vocab_size`` is an upper bound; a small corpus yields fewer merges. Deterministic:
    equal counts are broken by the smaller pair (the Rust ``BpeTrainer`` breaks ties by
    hash order, so its merges change between runs).
    """
    import heapq
    from collections import defaultdict

    texts = builtin_corpus() if texts is None else list(texts)
    base = list(bytes_to_unicode().values())
    n_fixed = 2 * len(base) + 2  # bytes, bytes+</w>, two specials
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size must be >= {n_fixed} (byte alphabet x2 + specials), got {vocab_size}")
    vocab: dict[str, int] = {}
    for tok in base + [b + END_OF_WORD for b in base]:
        vocab[tok] = len(vocab)
    words, freqs = _word_freqs(texts)

    # Pair counts plus an index pair -> words holding it, so each merge touches only
    # those words; a heap of (-count, pair) with lazy deletion picks the next merge.
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size - 2:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed when it changed
        if -neg < min_frequency:
            break
        merges.append(pair)
        # A token can be reached by two merge paths ("ab"+"c", "a"+"bc"); it gets one id.
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        touched = _merge_pair(pair, words, freqs, where, pair_counts)
        pair_counts.pop(pair, None)
        for q in touched:
            if q != pair and pair_counts.get(q, 0) > 0:
                heapq.heappush(heap, (-pair_counts[q], q))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 4096, model_max_length: int = 77):
    """A ``CLIPTokenizer`` with merges learned from ``texts`` (see ``learn_clip_bpe``)."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_clip_bpe(texts, vocab_size=vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         unk_token=EOS_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


# ---------------------------------------------------------------------------------------
# Config, model and processor
# ---------------------------------------------------------------------------------------


def tiny_clip_config(preset: str = "tiny", vocab_size: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | None = None):
    """The ``CLIPConfig`` of a preset, with the text tower sized and keyed to our tokenizer.

    ``tiny`` uses exactly the tokenizer's vocab. ``b32`` keeps the default 49408 rows (or
    more if the tokenizer is bigger) so its parameter count and memory match ViT-B/32;
    rows past the tokenizer are simply never looked up. Without ``vocab_size`` the text
    tower keeps CLIP's default vocab and special ids (a shape check, not a model to use).
    """
    from transformers import CLIPConfig, CLIPTextConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    over = _PRESET_OVERRIDES[preset]
    text = dict(over["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size if preset == "tiny" else max(vocab_size, CLIPTextConfig().vocab_size)
    if eos_token_id is not None:
        # The text tower pools at the first eos token; pad == eos as in OpenAI CLIP.
        text.update(eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if bos_token_id is not None:
        text["bos_token_id"] = bos_token_id
    projection_dim = over["top"].get("projection_dim", CLIPConfig().projection_dim)
    text["projection_dim"] = projection_dim
    vision = dict(over["vision"], projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_processor(tokenizer, config):
    """The stock CLIP processor, its sizes taken from the vision config (224 -> 224/224)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    side = int(config.vision_config.image_size)
    # Defaults give the OpenAI recipe: bicubic shortest-edge resize, centre crop, CLIP mean/std.
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _write_checkpoint(out: Path, preset: str, seed: int, texts: Sequence[str] | None, vocab_size: int) -> dict:
    """Write a random-init checkpoint into the existing dir ``out``; return build info."""
    import torch
    from transformers import CLIPModel

    t0 = time.perf_counter()
    # The tokenizer truncates at the text tower's positions (77 for both presets).
    text_max = tiny_clip_config(preset).text_config.max_position_embeddings
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, model_max_length=text_max)
    config = tiny_clip_config(preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)  # the init is a pure function of (preset, seed, tokenizer size)
    model = CLIPModel(config)
    model.save_pretrained(out)
    build_processor(tokenizer, config).save_pretrained(out)
    info = {"preset": preset, "seed": seed, "params": count_params(model), "tokenizer_vocab": len(tokenizer),
            "tokenizer_merges_from": "builtin corpus" if texts is None else f"{len(texts)} texts",
            "build_seconds": round(time.perf_counter() - t0, 3)}
    logger.info("built %s CLIP: %s params, vocab %d, %.1fs", preset, f"{info['params']:,}", len(tokenizer),
                info["build_seconds"])
    return info


def build_tiny_clip(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                    texts: Sequence[str] | None = None, vocab_size: int = 4096) -> Path:
    """Write a randomly initialised CLIP checkpoint that ``from_pretrained(out_dir)`` loads.

    The directory holds config.json, model.safetensors, the tokenizer files (BPE learned
    from ``texts``, or a built-in English corpus) and the processor config. It is written
    atomically and replaces ``out_dir`` if it exists. The same arguments give the same
    weights and tokenizer. Returns ``out_dir`` as a ``Path``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    out_dir = Path(out_dir)
    texts = list(texts) if texts is not None else None
    with atomic_dir(out_dir) as tmp:
        _write_checkpoint(tmp, preset, seed, texts, vocab_size)
    return out_dir


# ---------------------------------------------------------------------------------------
# Contrastive pretraining on a posts table
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyClipConfig(DownloadArgs):
    """Build a small offline CLIP checkpoint (optionally pretrained contrastively on posts).

    Pretrain only on posts kept apart from your evaluation split (for example a demo set
    generated with another seed), or the test metrics will be optimistic.
    """

    out: str = field(help="output checkpoint directory (replaced atomically if it exists)")
    preset: str = field("tiny", help="architecture: tiny (CPU tests) or b32 (ViT-B/32 shape, benchmarks)",
                        choices=PRESETS)
    seed: int = field(0, help="seed for weights, data split and shuffling")
    vocab_size: int = field(4096, help="upper bound on the BPE vocabulary (small corpora give fewer merges)")
    pretrain_on: str | None = field(
        None, help="posts table (CSV or JSONL, read as preprocess.py reads it) to pretrain on "
                   "contrastively; use posts kept apart from the test split (e.g. a demo set made with "
                   "another seed) so test metrics stay honest")
    image_col: str = field("image_path", help="--pretrain-on: column(s) with the image path (relative to the "
                                              "table's folder) or http(s) URL (downloaded once into --image-cache), "
                                              "comma-separated; the first non-empty cell wins")
    text_col: str = field("description", help="--pretrain-on: column with the raw caption")
    sep: str = sep_field()
    encoding: str = encoding_field()
    max_cell_chars: int = max_cell_chars_field()
    pretrain_minutes: float = field(6.0, help="wall-clock safety cap: pretraining stops here even if the "
                                              "epochs are not done (then the result depends on machine speed)")
    pretrain_epochs: int = field(20, help="pretraining epochs; the LR schedule runs over these, so a run that "
                                          "finishes them is reproducible for a seed. The checkpoint kept is the "
                                          "epoch with the best held-out retrieval, not the last")
    batch_size: int = field(32, help="contrastive batch size (in-batch negatives)")
    lr: float = field(5e-4, help="peak AdamW learning rate (cosine decay, 5%% warmup)")
    weight_decay: float = field(0.1, help="AdamW weight decay")
    heldout_fraction: float = field(0.1, help="fraction of posts held out: retrieval on them, measured after "
                                              "every epoch, chooses the checkpoint kept")

    def __post_init__(self):
        super().__post_init__()  # the download flags (--image-cache, ...) of an image-URL table
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}")
        if self.pretrain_on is not None and not Path(self.pretrain_on).is_file():
            raise ValueError(f"--pretrain-on: no such file {self.pretrain_on}")
        if self.pretrain_minutes <= 0 or self.pretrain_epochs < 1:
            raise ValueError("--pretrain-minutes must be > 0 and --pretrain-epochs >= 1")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2 (contrastive loss needs negatives)")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError("--heldout-fraction must be in (0, 1)")
        self.table_columns()
        ReadOptions.of(self)

    def table_columns(self) -> ColumnMap:
        """Image and caption columns; pretraining reads no label."""
        return ColumnMap(split_names(self.image_col), self.text_col, label=None)


def read_pretrain_table(cfg: TinyClipConfig) -> PostsTable:
    """The ``--pretrain-on`` table through ``data_preprocessing.table`` (one ``error:`` line if unreadable)."""
    try:
        return read_table(Path(cfg.pretrain_on).resolve(), cfg.table_columns(), ReadOptions.of(cfg))
    except TableError as e:
        raise SystemExit(f"error: --pretrain-on: {e}") from None


@dataclasses.dataclass
class Post:
    image: object  # PIL.Image, pre-resized by the processor's policy
    caption: str  # clean_text(description)


def load_posts(table: PostsTable, image_processor,
               download: DownloadConfig | None = None) -> tuple[list[Post], dict]:
    """Decode every usable post once (pre-resized, so they are small); also return counts.
    Image URLs are fetched through ``download`` (its cache first; default: the default
    cache and limits) as preprocessing fetches them."""
    from tqdm.auto import tqdm

    from data_preprocessing.prepare import ImageError, ResizePolicy, clean_text, load_image, pre_resize

    policy = ResizePolicy.from_image_processor(image_processor)
    rejects = Counter()
    todo = []  # (row, image source, cleaned caption) of the rows worth decoding
    for row, (raw, desc) in enumerate(zip(table.images, table.captions)):
        caption = clean_text(desc)
        if not caption:
            rejects["empty_caption"] += 1
        elif not raw:
            rejects["missing_path"] += 1
        else:  # a relative path hangs off the table's folder, not the working directory
            todo.append((row, image_source(raw, table.path.parent), caption))
    # URL cells: the download seam (a URL preprocessing cached is not fetched again)
    local, unresolved = resolve_image_sources([(row, src) for row, src, _ in todo], download or DownloadConfig())
    rejects.update(reason for _, reason, _ in unresolved)
    captions = {row: caption for row, _, caption in todo}
    posts = []
    for row, path in tqdm(local, desc="decode images", unit="img", disable=bar_disabled()):
        try:
            im = load_image(path)
        except ImageError as e:
            rejects[e.reason] += 1
            continue
        posts.append(Post(pre_resize(im, policy), captions[row]))
    counts = {"rows": len(table), "usable": len(posts), "rejected": dict(rejects)}
    logger.info("posts: %d rows, %d usable, rejected %s", len(table), len(posts), dict(rejects) or "none")
    return posts, counts


def caption_texts(table: PostsTable) -> list[str]:
    """The cleaned, non-empty captions of a posts table: the tokenizer's training text."""
    from data_preprocessing.prepare import clean_text

    return [c for c in (clean_text(d) for d in table.captions) if c]


@dataclasses.dataclass
class PostTensors:
    """Every post run through the processor once, so no training step re-processes an image.

    Pixels stay uint8 after the processor's resize and centre crop (a quarter of float32's
    memory: ~150 kB a post at 224 px); ``make_batch`` normalises a batch with the
    processor's own rescale/normalise, so the model sees exactly the processor's tensors.
    """

    pixels: "torch.Tensor"  # (N, 3, H, W) uint8, resized and centre-cropped
    input_ids: "torch.Tensor"  # (N, T) int64, padded with eos to the longest caption, T <= max length
    attention_mask: "torch.Tensor"  # (N, T) 1 on real tokens

    def __len__(self) -> int:
        return len(self.pixels)

    def subset(self, rows: Sequence[int]) -> "PostTensors":
        return PostTensors(self.pixels[rows], self.input_ids[rows], self.attention_mask[rows])


def encode_posts(processor, posts: Sequence[Post], chunk: int = 128) -> PostTensors:
    """Tokenize every caption and resize/crop every image once (in chunks, to bound peak memory)."""
    import torch

    pixels = [processor.image_processor(images=[p.image for p in part], do_rescale=False, do_normalize=False,
                                        return_tensors="pt")["pixel_values"] for part in _chunks(posts, chunk)]
    text = processor.tokenizer([p.caption for p in posts], padding=True, truncation=True, return_tensors="pt")
    return PostTensors(torch.cat(pixels), text["input_ids"], text["attention_mask"])


def make_batch(processor, posts: PostTensors, rows: Sequence[int] | None = None) -> dict:
    """Model inputs for ``rows`` of ``posts`` (all if None): pixel_values (B, 3, H, W) float,
    input_ids/attention_mask (B, T) cut to the batch's longest caption, as per-batch padding gives."""
    part = posts if rows is None else posts.subset(list(rows))
    # Resize and crop already happened; the processor only rescales and normalises here.
    pixel_values = processor.image_processor(images=part.pixels, do_resize=False, do_center_crop=False,
                                             return_tensors="pt")["pixel_values"]
    t = int(part.attention_mask.sum(dim=1).max())
    return {"pixel_values": pixel_values, "input_ids": part.input_ids[:, :t],
            "attention_mask": part.attention_mask[:, :t]}


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def evaluate(model, processor, posts: PostTensors, batch_size: int) -> dict:
    """Held-out contrastive loss and image->text retrieval over all ``posts``.

    ``loss`` is CLIP's own, averaged over batches of ``batch_size`` as in training (chance
    about ln(batch_size)); ``retrieval_top1`` and ``rank_score`` rank all N captions for
    each image (see ``retrieval_scores``).
    """
    import torch

    model.eval()
    loss_sum, n_loss, img, txt = 0.0, 0, [], []
    with torch.no_grad():
        for rows in _chunks(range(len(posts)), batch_size):
            out = model(**make_batch(processor, posts, rows), return_loss=True)
            if len(rows) >= 2:  # one pair has no negatives: no loss
                loss_sum += float(out.loss) * len(rows)
                n_loss += len(rows)
            img.append(out.image_embeds)  # (b, D) L2-normalised
            txt.append(out.text_embeds)  # (b, D) L2-normalised
    if n_loss == 0:
        return {"loss": None, "retrieval_top1": None, "rank_score": None, "n": len(posts)}
    top1, rank_score = retrieval_scores(torch.cat(img) @ torch.cat(txt).T, posts.input_ids)
    return {"loss": round(loss_sum / n_loss, 4), "retrieval_top1": round(top1, 4),
            "rank_score": round(rank_score, 4), "n": len(posts)}


def retrieval_scores(sims, input_ids) -> tuple[float, float]:
    """Image->text retrieval from similarities ``sims`` (N images, N captions; pair i is true).

    ``top1``: share of images whose most similar caption is their own (chance ~1/N).
    ``rank_score``: the share of other captions that rank below the true one, averaged
    over images (chance 0.5, perfect 1; similarity ties count half). It uses every rank,
    not just the first, so it still resolves models whose top-1 is a handful of hits: on
    the 193 held-out demo posts top-1 moved between 1 and 4 hits over 20 epochs, noise
    that picked an overfit epoch. Captions identical to the true one, token for token,
    count as the true caption in both scores, so posts sharing a caption are no misses.
    """
    import torch

    group = torch.unique(input_ids, dim=0, return_inverse=True)[1]  # (N,) one id per distinct caption
    same = group[:, None] == group[None, :]  # (N, N) caption j is image i's caption
    top1 = same[torch.arange(len(sims)), sims.argmax(dim=1)].float().mean()
    true = sims.diagonal()[:, None]  # (N, 1) similarity to the true caption
    below = ((sims < true) & ~same).sum(dim=1) + 0.5 * ((sims == true) & ~same).sum(dim=1)
    others = (~same).sum(dim=1)
    if int(others.max()) == 0:  # every post has the same caption: nothing to rank against
        return float(top1), 1.0
    keep = others > 0
    return float(top1), float((below[keep] / others[keep]).mean())


def is_better(candidate: dict, best: dict | None) -> bool:
    """Model selection: the higher held-out ``rank_score`` wins; a tie goes to the lower
    held-out loss. Strict comparisons keep the earlier epoch on a full tie, so the choice
    is reproducible."""
    if best is None:
        return True
    if candidate["heldout_rank_score"] != best["heldout_rank_score"]:
        return candidate["heldout_rank_score"] > best["heldout_rank_score"]
    return candidate["heldout_loss"] < best["heldout_loss"]


def _lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warmup then cosine to 0 over ``progress`` in [0, 1]."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


def _optimizer(model, cfg: TinyClipConfig):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # No decay on biases, norms, embeddings and the temperature (CLIP/open_clip recipe).
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


@dataclasses.dataclass
class _Run:
    """Where pretraining stands: the step counter drives the LR, the deadline is the minutes cap."""

    opt: object
    gen: object  # torch.Generator for the epoch shuffles
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    deadline: float  # time.perf_counter() value
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)  # per-step training loss
    stopped_by: str = "epochs"


def train_one_epoch(model, processor, train: PostTensors, run: _Run, cfg: TinyClipConfig, bar) -> float:
    """One shuffled pass of contrastive steps (CLIP's own loss); returns the epoch's mean loss.

    Stops early, setting ``run.stopped_by``, when the wall-clock cap is reached.
    """
    import torch

    model.train()
    order = torch.randperm(len(train), generator=run.gen).tolist()
    first = len(run.losses)
    for b in range(run.steps_per_epoch):
        if time.perf_counter() >= run.deadline:
            logger.warning("pretraining hit the %.1f-minute cap after %d of %d steps; the LR had not decayed "
                           "and the result depends on machine speed", cfg.pretrain_minutes, run.step, run.total_steps)
            run.stopped_by = "minutes"
            break
        # The schedule follows steps only, never the clock: a wall-clock term made the
        # LR, and so the demo's CLIP, depend on how busy the machine was.
        lr = cfg.lr * _lr_factor(run.step / run.total_steps)
        for g in run.opt.param_groups:
            g["lr"] = lr
        batch = make_batch(processor, train, order[b * run.batch_size:(b + 1) * run.batch_size])
        loss = model(**batch, return_loss=True).loss
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        run.losses.append(round(loss.item(), 4))
        run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}", lr=f"{lr:.1e}")
    done = run.losses[first:]
    return round(sum(done) / len(done), 4) if done else float("nan")


def pretrain(model, processor, train: PostTensors, heldout: PostTensors, cfg: TinyClipConfig) -> dict:
    """Train for the epochs (or minutes) budget, evaluate on ``heldout`` after every epoch,
    and leave ``model`` holding the epoch with the best held-out retrieval.

    Small posts tables overfit within a few epochs (held-out loss rises while train loss
    falls), so the last epoch is rarely the best one; the whole curve is returned.
    """
    import torch
    from tqdm.auto import tqdm

    bs = min(cfg.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // bs)  # drop the ragged last batch: 1-2 pairs give a near-free loss
    t0 = time.perf_counter()
    run = _Run(_optimizer(model, cfg), torch.Generator().manual_seed(cfg.seed), bs, steps_per_epoch,
               steps_per_epoch * cfg.pretrain_epochs, deadline=t0 + cfg.pretrain_minutes * 60.0)
    curve, best, best_state = [], None, None
    bar = tqdm(total=run.total_steps, desc="pretrain", unit="step", disable=bar_disabled())
    for epoch in range(1, cfg.pretrain_epochs + 1):
        steps_before = run.step
        train_loss = train_one_epoch(model, processor, train, run, cfg, bar)
        if run.step == steps_before:
            break  # the cap fell before this epoch's first step: nothing new to evaluate (step 0: the random init)
        held = evaluate(model, processor, heldout, cfg.batch_size)
        row = {"epoch": epoch, "step": run.step, "train_loss": train_loss, "heldout_loss": held["loss"],
               "heldout_rank_score": held["rank_score"], "heldout_top1": held["retrieval_top1"]}
        curve.append(row)
        if is_better(row, best):
            # A copy, not a reference: the next optimizer step updates the tensors in place.
            best, best_state = row, {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info("epoch %d: train loss %.4f, held-out loss %.4f, rank score %.4f, top-1 %.4f%s", epoch,
                    train_loss, held["loss"], held["rank_score"], held["retrieval_top1"],
                    "  (best so far)" if best is row else "")
        if run.stopped_by == "minutes":
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"steps": run.step, "epochs_completed": run.step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "batch_size": bs, "stopped_by": run.stopped_by, "train_seconds": round(time.perf_counter() - t0, 2),
            "losses": run.losses, "curve": curve, "best": best}


def split_posts(posts: Sequence[Post], cfg: TinyClipConfig) -> tuple[list[Post], list[Post]]:
    """(train, held-out): a seeded shuffle, ``heldout_fraction`` of the posts (at least 2) held out."""
    import torch

    perm = torch.randperm(len(posts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_held = max(2, round(len(posts) * cfg.heldout_fraction))
    return [posts[i] for i in perm[n_held:]], [posts[i] for i in perm[:n_held]]


def _log_choice(run: dict, before: dict) -> None:
    def scores(m: dict) -> str:
        return (f"rank score {m['heldout_rank_score']:.4f}, top-1 {m['heldout_top1']:.4f}, "
                f"loss {m['heldout_loss']:.4f}")

    best, last = run["best"], run["curve"][-1]
    untrained = {"heldout_rank_score": before["rank_score"], "heldout_top1": before["retrieval_top1"],
                 "heldout_loss": before["loss"]}
    logger.info("kept epoch %d of %d (best held-out retrieval rank score): %s; last epoch: %s; untrained: %s",
                best["epoch"], last["epoch"], scores(best), scores(last), scores(untrained))
    if best["heldout_rank_score"] <= before["rank_score"]:
        logger.warning("no epoch retrieved better than the untrained model on the held-out posts")


def pretrain_record(cfg: TinyClipConfig, data: dict, build_info: dict, seconds: dict, run: dict,
                    before: dict) -> dict:
    """``pretrain.json``: how the checkpoint was made, and which epoch it is and why.

    ``selection.curve`` has one row per epoch (train loss; held-out loss, rank score, top-1);
    ``heldout`` gives the untrained model (``before``), the kept epoch (``after``) and the last.
    """
    best = run["best"]
    return {
        "config": config_dict(cfg),
        "data": data,
        "model": build_info,
        "seconds": seconds,
        "training": {k: v for k, v in run.items() if k not in ("losses", "curve", "best")},
        "selection": {"rule": "epoch with the highest held-out image->text rank_score (ties: lower held-out "
                              "loss, then the earlier epoch)",
                      "best_epoch": best["epoch"] if best else None, "best": best, "curve": run["curve"]},
        "heldout": {"before": before, "after": best, "last": run["curve"][-1] if run["curve"] else None},
        "losses": run["losses"],
        "git_commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> Path:
    # 1. Parse args and log the resolved config.
    cfg = parse_config(TinyClipConfig, argv)
    setup_logging()
    logger.info("config: %s", config_dict(cfg))
    out = Path(cfg.out)
    t_start = time.perf_counter()

    if cfg.pretrain_on is None:
        # 2a. Random init only.
        build_tiny_clip(out, preset=cfg.preset, seed=cfg.seed, vocab_size=cfg.vocab_size)
        logger.info("wrote %s in %.1fs", out, time.perf_counter() - t_start)
        return out

    from transformers import CLIPModel, CLIPProcessor

    table = read_pretrain_table(cfg)
    with atomic_dir(out) as tmp:
        # 2b. Tokenizer from the table's captions, then the same random init that
        # build_tiny_clip(texts=caption_texts(table)) gives, so "before" is reproducible.
        texts = caption_texts(table)
        build_info = _write_checkpoint(tmp, cfg.preset, cfg.seed, texts, cfg.vocab_size)
        model = CLIPModel.from_pretrained(tmp)
        processor = CLIPProcessor.from_pretrained(tmp)

        # 3. Decode, resize/crop and tokenize every post once; split off a held-out set.
        t_decode = time.perf_counter()
        posts, counts = load_posts(table, processor.image_processor, cfg.download_config())
        if len(posts) < 4:
            raise SystemExit(f"--pretrain-on {table.path}: only {len(posts)} usable posts, need >= 4")
        train_posts, held_posts = split_posts(posts, cfg)
        train, heldout = encode_posts(processor, train_posts), encode_posts(processor, held_posts)
        del posts, train_posts, held_posts  # the PIL images; the tensors hold what training needs
        decode_s = time.perf_counter() - t_decode
        logger.info("pretraining on %d posts, %d held out", len(train), len(heldout))

        # 4. Train, evaluating every epoch; the model comes back holding the best epoch.
        before = evaluate(model, processor, heldout, cfg.batch_size)
        logger.info("held-out before: loss %s, image->text rank score %s, top-1 %s", before["loss"],
                    before["rank_score"], before["retrieval_top1"])
        run = pretrain(model, processor, train, heldout, cfg)
        if run["best"] is not None:
            _log_choice(run, before)

        # 5. Save the chosen weights over the random init, plus the record of how they were made.
        model.save_pretrained(tmp)
        seconds = {"decode": round(decode_s, 2), "train": run["train_seconds"],
                   "total": round(time.perf_counter() - t_start, 2)}
        data = {"source": str(table.path), "table": table.schema(), "tokenizer_texts": len(texts), **counts, "train": len(train),
                "heldout": len(heldout)}
        write_json_atomic(tmp / "pretrain.json", pretrain_record(cfg, data, build_info, seconds, run, before))
    logger.info("wrote %s in %.1fs", out, time.perf_counter() - t_start)
    return out


if __name__ == "__main__":
    main()
