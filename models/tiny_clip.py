"""Build a small CLIP checkpoint offline (random init).

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

CLI: ``python models/tiny_clip.py --out DIR`` writes the random-init checkpoint.
Pretraining it contrastively on a posts table is a training program, and lives in
``training/pretrain_clip.py`` (which builds its checkpoint with ``write_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

if __package__ in (None, ""):  # run as `python folder/script.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import atomic_dir, config_dict, field, parse_config, setup_logging

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


def write_checkpoint(out: Path, preset: str, seed: int, texts: Sequence[str] | None, vocab_size: int) -> dict:
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
        write_checkpoint(tmp, preset, seed, texts, vocab_size)
    return out_dir


@dataclasses.dataclass
class TinyClipConfig:
    """Build a small offline CLIP checkpoint (random init); training/pretrain_clip.py pretrains it on posts."""

    out: str = field(help="output checkpoint directory (replaced atomically if it exists)")
    preset: str = field("tiny", help="architecture: tiny (CPU tests) or b32 (ViT-B/32 shape, benchmarks)",
                        choices=PRESETS)
    seed: int = field(0, help="seed for the weights")
    vocab_size: int = field(4096, help="upper bound on the BPE vocabulary (small corpora give fewer merges)")

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}")


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_config(TinyClipConfig, argv)
    setup_logging()
    logger.info("config: %s", config_dict(cfg))
    t_start = time.perf_counter()
    out = build_tiny_clip(cfg.out, preset=cfg.preset, seed=cfg.seed, vocab_size=cfg.vocab_size)
    logger.info("wrote %s in %.1fs", out, time.perf_counter() - t_start)
    return out


if __name__ == "__main__":
    main()
