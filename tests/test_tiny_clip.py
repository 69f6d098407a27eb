"""Tests for models/tiny_clip.py: the offline CLIP checkpoint every other test loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from models.tiny_clip import build_tiny_clip, learn_clip_bpe, tiny_clip_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip", preset="tiny", seed=0)



def test_tiny_checkpoint_loads_and_runs(tiny_dir):
    names = set(os.listdir(tiny_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    model = CLIPModel.from_pretrained(tiny_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_dir)
    assert type(AutoProcessor.from_pretrained(tiny_dir)).__name__ == "CLIPProcessor"
    cfg = model.config

    # The processor is the stock CLIP recipe, sized from the vision config.
    ip = processor.image_processor
    assert ip.size["shortest_edge"] == cfg.vision_config.image_size
    assert (ip.crop_size["height"], ip.crop_size["width"]) == (cfg.vision_config.image_size,) * 2
    assert processor.tokenizer.model_max_length == cfg.text_config.max_position_embeddings
    assert len(processor.tokenizer) == cfg.text_config.vocab_size
    assert cfg.text_config.eos_token_id == processor.tokenizer.eos_token_id == processor.tokenizer.pad_token_id

    images = [Image.new("RGB", (300 + 10 * i, 200), (40 * i, 90, 160)) for i in range(3)]
    texts = ["a blue photo", "word " * 200, "🔥🔥 lit"]  # the long one must be truncated
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    assert batch["input_ids"].shape == (3, cfg.text_config.max_position_embeddings)
    assert batch["pixel_values"].shape == (3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).pooler_output
    assert img.shape == (3, cfg.projection_dim) and txt.shape == (3, cfg.projection_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert img.std() > 0  # distinct images give distinct embeddings, not a constant


@pytest.mark.parametrize("text", [
    "Sunset 😍🔥 at the beach!!! 👨‍👩‍👧",
    "see https://example.com/a?b=1&c=%20 and www.x.co",
    "Ünïcödé 日本語 مرحبا \x07 tab\there",
    "@user <url> #1 café",
])
def test_tokenizer_byte_fallback_round_trips(tiny_dir, tmp_path, text):
    tok = CLIPProcessor.from_pretrained(tiny_dir).tokenizer
    ids = tok(text)["input_ids"]
    # Only the first and last ids are specials: nothing fell back to unk (== eos).
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1] and tok.bos_token_id not in ids[1:-1]
    # Decoding gives back the lower-cased text (CLIP's decoder re-spaces word pieces).
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "".join(decoded.split()) == "".join(text.lower().split())
    # Saving and reloading gives the same tokenizer.
    tok.save_pretrained(tmp_path / "tok")
    assert CLIPTokenizer.from_pretrained(tmp_path / "tok")(text)["input_ids"] == ids


def test_bpe_is_deterministic_and_learns_caption_words():
    texts = ["engagement through the roof", "more engagement please", "engagement engagement"] * 3
    vocab, merges = learn_clip_bpe(texts, vocab_size=1000)
    assert (vocab, merges) == learn_clip_bpe(texts, vocab_size=1000)
    assert "engagement</w>" in vocab  # a frequent caption word becomes one token
    assert len(vocab) <= 1000 and list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    builtin, _ = learn_clip_bpe(vocab_size=4096)
    assert 2000 < len(builtin) <= 4096  # "a few thousand" from the built-in corpus
    with pytest.raises(ValueError):
        learn_clip_bpe(texts, vocab_size=100)


def test_b32_config_is_vit_b32_shape():
    ref = CLIPConfig()
    cfg = tiny_clip_config("b32", vocab_size=4096, bos_token_id=4094, eos_token_id=4095)
    for sub in ("text_config", "vision_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(getattr(cfg, sub), key) == getattr(getattr(ref, sub), key), (sub, key)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (
        ref.vision_config.image_size, ref.vision_config.patch_size)
    assert cfg.projection_dim == ref.projection_dim
    # Embedding rows stay at the ViT-B/32 count so parameter count and memory match.
    assert cfg.text_config.vocab_size == ref.text_config.vocab_size
    assert cfg.text_config.eos_token_id == cfg.text_config.pad_token_id == 4095
    with pytest.raises(ValueError):
        tiny_clip_config("b16")


def test_build_is_reproducible_and_replaces_atomically(tmp_path, tiny_dir):
    out = tmp_path / "clip"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_clip(out, seed=0)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temp or backup dirs left
    a = CLIPModel.from_pretrained(out).state_dict()
    b = CLIPModel.from_pretrained(tiny_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed -> same weights
    with pytest.raises(ValueError):
        build_tiny_clip(tmp_path / "x", preset="nope")


def test_cli_runs_as_script_and_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}  # the script must find the repo root by itself
    helped = subprocess.run([sys.executable, "models/tiny_clip.py", "--help"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    help_text = " ".join(helped.stdout.split())  # argparse wraps at the terminal width
    assert "--preset" in help_text and "training/pretrain_clip.py" in help_text

    out = tmp_path / "cli"
    built = subprocess.run([sys.executable, "-m", "models.tiny_clip", "--out", str(out), "--seed", "1"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert CLIPModel.from_pretrained(out).config.projection_dim == tiny_clip_config("tiny").projection_dim
