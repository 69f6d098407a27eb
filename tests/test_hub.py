"""Tests for common/hub.py: a CLIP name resolves fast, or fails fast, without a hub.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, so
each hub case runs ``resolve_pretrained`` in a fresh interpreter with its own
environment. The hub is a loopback port (closed, silent, or a tiny HTTP server), never
the network, so the results do not depend on where the tests run.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common import hub
from common.hub import PretrainedUnavailable, resolve_pretrained

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "acme/tiny-clip"
COMMIT = "a" * 40
RESOLVE = """
import json, sys, time
from common.hub import PretrainedUnavailable, resolve_pretrained
t0 = time.perf_counter()
try:
    out = {"path": resolve_pretrained(sys.argv[1], timeout=float(sys.argv[2]))}
except PretrainedUnavailable as e:
    out = {"error": str(e)}
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def resolve_in_subprocess(tmp_path: Path, env: dict, timeout: float = 1.0) -> dict:
    """Run resolve_pretrained(NAME) with ``env`` over a clean HF environment; its JSON result."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    base.update(PYTHONPATH=str(REPO_ROOT), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", RESOLVE, NAME, str(timeout)], env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections (the kernel's backlog) and never answers: a dropped hub."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def answering_endpoint():
    """A hub that answers every request with 404: reachable, so names must pass through."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def cache_model(tmp_path: Path) -> Path:
    """Lay out NAME in the HF cache as a download would: refs/main -> snapshots/<commit>/."""
    repo = tmp_path / "cache" / f"models--{NAME.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_local_directory_passes_through_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "probe_hub", lambda *a, **k: pytest.fail("probed the hub for a local directory"))
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_missing_path_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(PretrainedUnavailable, match="no such directory, and not a hub model name"):
        resolve_pretrained(str(tmp_path / "runs" / "clip"))


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_unreachable_hub_fails_in_seconds_with_one_line_that_says_what_to_do(tmp_path, kind, request):
    endpoint = closed_port() if kind == "refused" else request.getfixturevalue("silent_endpoint")
    result = resolve_in_subprocess(tmp_path, {"HF_ENDPOINT": endpoint}, timeout=1.0)
    message = result["error"]
    assert "\n" not in message and f"the hub at {endpoint} is not reachable" in message
    assert "local CLIP directory" in message and "set HF_HUB_OFFLINE=1" in message
    # A refused port fails at once; a silent one after the 1 s probe timeout, not minutes of retries.
    assert result["seconds"] < (1.0 if kind == "refused" else 3.0), result


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "closed"}], ids=["offline", "unreachable"])
def test_cached_name_loads_from_the_cache_without_a_hub(tmp_path, env):
    snapshot = cache_model(tmp_path)
    env = {k: (closed_port() if v == "closed" else v) for k, v in env.items()}
    result = resolve_in_subprocess(tmp_path, env)
    assert Path(result["path"]) == snapshot, result


def test_offline_without_the_model_cached_says_to_unset_offline(tmp_path):
    result = resolve_in_subprocess(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE is set" in result["error"] and "unset HF_HUB_OFFLINE" in result["error"]


def test_reachable_hub_keeps_the_name_even_when_cached(tmp_path, answering_endpoint):
    cache_model(tmp_path)  # cached, but a reachable hub still gets to revalidate it as usual
    result = resolve_in_subprocess(tmp_path, {"HF_ENDPOINT": answering_endpoint})
    assert result["path"] == NAME, result
