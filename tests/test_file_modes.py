"""Files the pipeline writes get the user's umask (0644 / 0755 under umask 022), so a
server running as another user can read a model that training wrote."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.config import atomic_dir, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_dir_gives_umask_modes_to_every_file_and_directory(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "clip").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "head.safetensors"))  # safetensors writes 0600
        (tmp / "clip" / "config.json").write_text("{}")
    modes = _modes(tmp_path / "model")
    assert modes == {".": 0o755, "clip": 0o755, "head.safetensors": 0o644, "clip/config.json": 0o644}


def test_write_json_atomic_gives_umask_mode(tmp_path, umask_022):
    write_json_atomic(tmp_path / "meta.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "meta.json").stat().st_mode) == 0o644


def test_a_trained_artifact_is_readable_by_other_users(model_dir):
    """The artifact the tests' tiny training writes: group and others can read every file
    and enter every directory (the process umask in tests and CI is 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    if mask & 0o055:
        pytest.fail(f"this process runs with umask {mask:03o}; the check needs group/other read (022)")
    bad = {name: oct(m) for name, m in _modes(Path(model_dir)).items() if m & 0o044 != 0o044}
    assert bad == {}
