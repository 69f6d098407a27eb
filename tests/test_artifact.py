"""models/artifact.py: reading one part of an artifact without loading the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_feature_columns_are_read_without_importing_torch(featured_model_dir):
    """The server builds its request models from config.json before the lifespan loads the model,
    so reading the feature columns imports neither torch, transformers nor the model code."""
    code = ("import json, sys\n"
            "from models.artifact import artifact_feature_kinds, artifact_feature_names\n"
            f"model = {str(featured_model_dir)!r}\n"
            "print(json.dumps([artifact_feature_names(model), artifact_feature_kinds(model),\n"
            "                  sorted(m for m in ('torch', 'transformers', 'models.clip_regressor') if m in sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names, kinds, heavy = json.loads(out.stdout)
    assert names == ["followers", "platform"]
    assert kinds == {"followers": "numeric", "platform": "categorical"}
    assert heavy == []


def test_feature_columns_of_a_folder_without_an_artifact_are_empty(tmp_path):
    """No config.json there: no columns, and loading the model later says what is wrong."""
    from models.artifact import CONFIG_FILE, artifact_feature_kinds, artifact_feature_names

    (tmp_path / CONFIG_FILE).write_text("{not json")
    assert artifact_feature_names(tmp_path / "missing") == () and artifact_feature_kinds(tmp_path / "missing") == {}
    assert artifact_feature_names(tmp_path) == () and artifact_feature_kinds(tmp_path) == {}
