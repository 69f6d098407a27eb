"""A model artifact is data: ``load_model`` never runs its code nor reads outside its directory.

Each test copies the tiny artifact of tests/conftest.py and changes the one thing an attacker
would: an ``auto_map`` to a module in the artifact, a ``clip_subdir`` that climbs out, a symlink.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from models.artifact import CONFIG_FILE, UnsafeArtifact, load_model

# A module that would prove it ran: it writes MARKER when imported.
CUSTOM_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import CLIPImageProcessor, CLIPTokenizer
class EvilImageProcessor(CLIPImageProcessor): pass
class EvilTokenizer(CLIPTokenizer): pass
"""


def copy_artifact(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "run" / "model"
    shutil.copytree(model_dir, dst)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def ask_for_image_processor_code(clip: Path) -> None:
    """The issue's reproduction: an unknown image processor class, mapped to the artifact's module;
    transformers has no class of its own to fall back on, so without trust_remote_code=False it asks."""
    def change(cfg):
        cfg["image_processor"]["image_processor_type"] = "EvilImageProcessor"
        cfg["image_processor"]["auto_map"] = {"AutoImageProcessor": "custom.EvilImageProcessor"}
    edit_json(clip / "processor_config.json", change)


def ask_for_tokenizer_code(clip: Path) -> None:
    def change(cfg):
        cfg["tokenizer_class"] = "EvilTokenizer"
        cfg["auto_map"] = {"AutoTokenizer": ["custom.EvilTokenizer", None]}
    edit_json(clip / "tokenizer_config.json", change)


@pytest.mark.parametrize("ask, file", [(ask_for_image_processor_code, "processor_config.json"),
                                       (ask_for_tokenizer_code, "tokenizer_config.json")])
def test_custom_code_in_the_artifact_never_runs(model_dir, tmp_path, monkeypatch, ask, file):
    artifact = copy_artifact(model_dir, tmp_path)
    marker = tmp_path / "custom_code_ran"
    (artifact / "clip" / "custom.py").write_text(CUSTOM_MODULE.format(marker=str(marker)))
    ask(artifact / "clip")
    # A user who would answer yes: transformers' prompt reads stdin through input().
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(UnsafeArtifact, match=rf"clip/{file} asks for custom code \(auto_map\)"):
        load_model(artifact)
    assert not marker.exists()
    assert sys.stdin.read() == "y\n"  # never prompted


@pytest.mark.parametrize("clip_subdir", ["../../elsewhere/clip", "ABSOLUTE"])
def test_clip_subdir_outside_the_model_dir_is_refused(model_dir, tmp_path, clip_subdir):
    artifact = copy_artifact(model_dir, tmp_path)
    elsewhere = tmp_path / "runs" / "elsewhere" / "clip"  # a loadable CLIP: only the rule can refuse it
    shutil.copytree(artifact / "clip", elsewhere)
    clip_subdir = str(elsewhere) if clip_subdir == "ABSOLUTE" else clip_subdir
    edit_json(artifact / CONFIG_FILE, lambda cfg: cfg["architecture"].update(clip_subdir=clip_subdir))
    with pytest.raises(UnsafeArtifact) as refused:
        load_model(artifact)
    message = str(refused.value)
    assert f"architecture.clip_subdir={clip_subdir!r}" in message
    assert f"resolves to {elsewhere.resolve()}, outside the model directory {artifact.resolve()}" in message


@pytest.mark.parametrize("entry", ["clip", "clip/model.safetensors", "head.safetensors", "onnx/embed.onnx"])
def test_a_symlink_out_of_the_model_dir_is_refused(model_dir, tmp_path, entry):
    artifact = copy_artifact(model_dir, tmp_path)
    if entry.startswith("onnx/"):  # no export in the fixture: the link is refused before anything reads it
        (artifact / entry).parent.mkdir()
        (artifact / entry).write_bytes(b"an export")
    outside = tmp_path / "outside" / Path(entry).name
    outside.parent.mkdir()
    (artifact / entry).rename(outside)  # the same bytes, now reached through a link
    (artifact / entry).symlink_to(outside)
    with pytest.raises(UnsafeArtifact) as refused:
        load_model(artifact)
    assert (f"{artifact.resolve() / entry} is a symlink to {outside.resolve()}, outside the model directory "
            f"{artifact.resolve()}") in str(refused.value)


def test_links_that_stay_inside_are_loaded(model_dir, tmp_path):
    """A MODEL_DIR reached through a link (runs/latest), and a link within the artifact, are fine."""
    artifact = copy_artifact(model_dir, tmp_path)
    (artifact / "clip").rename(artifact / "clip_v1")
    (artifact / "clip").symlink_to("clip_v1")
    latest = tmp_path / "latest"
    latest.symlink_to(artifact)
    loaded = load_model(latest)
    assert loaded.path == latest
    original = load_model(model_dir).model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.parametrize("clip_subdir", ["", 7, None])
def test_a_clip_subdir_that_is_not_a_relative_path_is_refused(model_dir, tmp_path, clip_subdir):
    artifact = copy_artifact(model_dir, tmp_path)
    edit_json(artifact / CONFIG_FILE, lambda cfg: cfg["architecture"].update(clip_subdir=clip_subdir))
    with pytest.raises(UnsafeArtifact) as refused:
        load_model(artifact)
    assert "architecture.clip_subdir in" in str(refused.value)
    assert str(refused.value).endswith(f"must be a relative path inside {artifact.resolve()}, not {clip_subdir!r}")
