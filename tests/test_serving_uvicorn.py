"""The server as users run it: `python -m uvicorn serving.app:app` on a loopback port,
called with a real HTTP client (httpx) and with the README's literal curl command."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving_fixtures import free_port, jpeg_bytes, model_dir, png_bytes  # noqa: F401 - model_dir: fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
BODY_LIMIT = 1_000_000


def start_server(env_extra: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **env_extra,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"uvicorn exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"uvicorn not ready after {timeout}s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("uvicorn") / "server.log"
    proc, base = start_server({"MODEL_DIR": str(model_dir), "MAX_BODY_BYTES": str(BODY_LIMIT),
                               "MAX_WAIT_MS": "50", "MAX_BATCH_SIZE": "8"}, log_path)
    try:
        wait_ready(proc, base, log_path)
        yield base, proc, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_predict_over_http(server):
    base, _, _ = server
    image = jpeg_bytes(seed=11)
    with httpx.Client(base_url=base, timeout=30) as client:
        a = client.post("/predict", files={"image": ("photo.jpg", image, "image/jpeg")},
                        data={"text": "Sunset at the beach! #travel"})
        b = client.post("/predict", json={"image_base64": base64.b64encode(image).decode(),
                                          "text": "Sunset at the beach! #travel"})
        assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
        assert a.json()["cleaned_text"] == "Sunset at the beach! travel"
        assert a.json()["score"] == pytest.approx(b.json()["score"], abs=1e-9)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/metadata").json()["settings"]["max_body_bytes"] == BODY_LIMIT
        assert "/predict/batch" in client.get("/openapi.json").json()["paths"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_contract(server, tmp_path):
    base, _, _ = server
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(seed=12))
    (tmp_path / "other.png").write_bytes(png_bytes(seed=13))
    # The README's command, character for character, run by a shell.
    cmd = f"curl -sS -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' {base}/predict"
    out = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["cleaned_text"] == "Sunset at the beach! travel"
    assert set(body) == {"engagement", "score", "sentiment", "cleaned_text", "model"}
    # Batch: repeated fields, paired by order.
    cmd = (f"curl -sS -F image=@photo.jpg -F 'text=first' -F image=@other.png -F 'text=' "
           f"{base}/predict/batch")
    out = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    results = json.loads(out.stdout)["results"]
    assert [(r["index"], r["status"], r["cleaned_text"]) for r in results] == [(0, 200, "first"), (1, 200, "")]
    # curl's own error path: a bad file gets a JSON 4xx, with the code curl reports.
    (tmp_path / "notes.txt").write_text("not an image")
    cmd = f"curl -sS -o /dev/null -w '%{{http_code}}' -F image=@notes.txt -F text=hi {base}/predict"
    out = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout == "415"


def test_body_limit_over_real_http(server):
    base, _, _ = server
    with httpx.Client(base_url=base, timeout=30) as client:
        # Declared Content-Length over the limit: refused before the body is read.
        r = client.post("/predict", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["reason"] == "body_too_large"

    def chunks():  # no Content-Length: Transfer-Encoding chunked, counted as it streams
        for _ in range(40):
            yield b"x" * 50_000

    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_concurrent_http_requests_are_micro_batched(server):
    base, _, _ = server
    with httpx.Client(base_url=base, timeout=60) as client:
        before = client.get("/metadata").json()["settings"]["batching"]

        def one(i):
            return client.post("/predict", files={"image": ("p.jpg", jpeg_bytes(seed=i % 4), "image/jpeg")},
                               data={"text": f"post {i}"}).status_code

        with ThreadPoolExecutor(12) as ex:
            codes = list(ex.map(one, range(12)))
        after = client.get("/metadata").json()["settings"]["batching"]
    assert codes == [200] * 12
    assert after["posts"] - before["posts"] == 12
    assert after["batches"] - before["batches"] < 12  # some requests shared a forward pass
    assert after["largest_batch"] > 1


def test_zz_sigterm_shuts_down_cleanly(server):
    # Runs last in this module: it stops the shared server.
    _, proc, log_path = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit too.
    assert proc.wait(30) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "loaded model run" in log and "model unloaded" in log
    assert "Traceback" not in log


def test_missing_model_dir_fails_startup(tmp_path):
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MODEL_DIR"}
    env["MODEL_DIR"] = str(tmp_path / "no_such_run" / "model")
    proc, _ = start_server(env, log_path)
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0
    log = log_path.read_text()
    assert "MODEL_DIR=" in log and "is not a directory" in log
