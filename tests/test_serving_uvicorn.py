"""The server as users run it: `python -m uvicorn serving.app:app` on a loopback port,
called with a real HTTP client (httpx) and with the README's literal curl commands."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.serving_fixtures import free_port, jpeg_bytes, png_bytes

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


def wait_for_log_line(log_path: Path, wanted, timeout: float = 10.0) -> bool:
    """Whether a line of the server log satisfies ``wanted`` within ``timeout``: the access
    line is written once the response is sent, so it can trail the client by a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(wanted(line) for line in log_path.read_text().splitlines()):
            return True
        time.sleep(0.1)
    return False


@contextmanager
def running_server(model_dir, tmp_path_factory, **env):
    """A started server; yields (base URL, process, log path) and stops it afterwards."""
    log_path = tmp_path_factory.mktemp("uvicorn") / "server.log"
    proc, base = start_server({"MODEL_DIR": str(model_dir), **env}, log_path)
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


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory, MAX_BODY_BYTES=str(BODY_LIMIT), MAX_WAIT_MS="50",
                        MAX_BATCH_SIZE="8") as running:
        yield running


def test_predict_over_http(server):
    base, _, _ = server
    image = jpeg_bytes(seed=11)
    with httpx.Client(base_url=base, timeout=30) as client:
        a = client.post("/predict", files={"image": ("photo.jpg", image, "image/jpeg")},
                        data={"text": "Sunset at the beach! #travel"})
        b = client.post("/predict/json", json={"image_base64": base64.b64encode(image).decode(),
                                               "text": "Sunset at the beach! #travel"})
        assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
        assert a.json()["cleaned_text"] == "Sunset at the beach! travel"
        assert a.json()["score"] == pytest.approx(b.json()["score"], abs=1e-9)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/metadata").json()["settings"]["max_body_bytes"] == BODY_LIMIT
        assert "/predict/batch" in client.get("/openapi.json").json()["paths"]


# The README's commands, character for character; only localhost:8000 becomes the test port.
README_CURL = "curl -F image=@photo.jpg -F 'text=Sunset at the beach! #travel' localhost:8000/predict"
README_JSON = ("""python -c 'import base64,json; print(json.dumps({"image_base64": base64.b64encode(open("photo.jpg","rb")"""
               """.read()).decode(), "text": "Sunset!"}))' \\\n"""
               "  | curl -H 'Content-Type: application/json' -d @- localhost:8000/predict/json")
README_BATCH = "curl -F image_0=@a.jpg -F 'text_0=first' -F image_1=@b.png -F 'text_1=' localhost:8000/predict/batch"
README_METRICS = "curl localhost:8000/metrics"


def _sh(cmd: str, cwd: Path, base: str) -> subprocess.CompletedProcess:
    """Run a README command in a shell, against ``base``; `python` is this interpreter."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.run(cmd.replace("http://localhost:8000", base).replace("localhost:8000", base), shell=True,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_curl_contract(server, tmp_path):
    # The README's commands are curl commands: without curl they cannot be checked, and a
    # skip would hide that. Fail instead.
    assert shutil.which("curl"), "curl is not installed (apt-get install curl): the README's commands need it"
    base, _, log_path = server
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(seed=12))
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(seed=14))
    (tmp_path / "b.png").write_bytes(png_bytes(seed=13))
    out = _sh(README_CURL, tmp_path, base)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["cleaned_text"] == "Sunset at the beach! travel"
    assert set(body) == {"engagement", "score", "sentiment", "cleaned_text", "interval", "contributions",
                         "reference_score", "model"}
    out = _sh(README_JSON, tmp_path, base)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cleaned_text"] == "Sunset!"
    # Batch: post i's fields numbered i; text_1= (empty) is an image-only post.
    out = _sh(README_BATCH, tmp_path, base)
    results = json.loads(out.stdout)["results"]
    assert [(r["index"], r["status"], r["cleaned_text"]) for r in results] == [(0, 200, "first"), (1, 200, "")]
    # curl's own error path: a bad file gets a JSON 4xx, with the code curl reports.
    (tmp_path / "notes.txt").write_text("not an image")
    out = _sh("curl -sS -o /dev/null -w '%{http_code}' -F image=@notes.txt -F text=hi localhost:8000/predict",
              tmp_path, base)
    assert out.stdout == "415"
    # A request ID sent by the client comes back, and the access log line carries it.
    out = _sh("curl -i -H 'X-Request-ID: readme-trace-7' -F image=@photo.jpg -F text=hi localhost:8000/predict",
              tmp_path, base)
    assert "x-request-id: readme-trace-7" in out.stdout.lower()
    assert wait_for_log_line(log_path, lambda line: '"POST /predict" 200' in line
                             and line.endswith("request_id=readme-trace-7"))


def test_metrics_over_http(server, tmp_path):
    base, _, _ = server
    assert shutil.which("curl"), "curl is not installed (apt-get install curl): the README's commands need it"
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(3):
            assert client.post("/predict", files={"image": ("p.jpg", jpeg_bytes(seed=i), "image/jpeg")},
                               data={"text": f"post {i}"}).status_code == 200
    out = _sh(README_METRICS, tmp_path, base)
    assert out.returncode == 0, out.stderr
    series = {line.split(" ")[0] for line in out.stdout.splitlines() if line and not line.startswith("#")}
    for name in ('http_requests_total{method="POST",path="/predict",status="200"}',
                 'http_request_duration_seconds_count{path="/predict"}', "prediction_queue_depth",
                 "prediction_batch_size_count", "prediction_batch_duration_seconds_count", "model_load_seconds"):
        assert name in series, name
    assert 'prediction_rejected_total' in out.stdout  # declared, even before any 503/504


def test_body_limit_over_real_http(server):
    base, _, _ = server
    with httpx.Client(base_url=base, timeout=30) as client:
        # Declared Content-Length over the limit: refused before the body is read.
        r = client.post("/predict/json", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["reason"] == "body_too_large"

    def chunks():  # no Content-Length: Transfer-Encoding chunked, counted as it streams
        for _ in range(40):
            yield b"x" * 50_000

    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/predict/json", content=chunks(), headers={"content-type": "application/json"})
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


def test_sigterm_shuts_down_cleanly(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory) as (base, proc, log_path):
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
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


# --- hostile clients (issue 28) ------------------------------------------------------------


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock``: it reads as end of file (or a reset)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536) == b""
    except OSError:
        return True


def test_log_lines_cannot_be_forged(server):
    base, _, log_path = server
    forged = b"/x%0a17:49:00%20INFO%20serving.access:...request_id=forged"
    with _connect(base) as sock:
        sock.sendall(b"GET " + forged + b" HTTP/1.1\r\nHost: x\r\nX-Request-ID: forge-1\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
    assert wait_for_log_line(log_path, lambda line: line.endswith("request_id=forge-1"))
    # Lines that read as our access lines (uvicorn's own shows the raw path, still encoded).
    lines = [line for line in log_path.read_text().splitlines()
             if re.match(r"\d\d:\d\d:\d\d INFO serving\.access:", line) and "forged" in line]
    assert len(lines) == 1, lines  # one access line, not a second one that looks real
    assert '"GET /x\\n17:49:00 INFO serving.access:...request_id=forged" 404' in lines[0]
    assert lines[0].endswith("request_id=forge-1")


@pytest.fixture(scope="module")
def serve_main(model_dir, tmp_path_factory):
    """`python -m serving.app` as the README runs it, with a 2 s header timeout and a 2 s
    request deadline; yields its base URL."""
    log_path = tmp_path_factory.mktemp("serve_main") / "server.log"
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(model_dir), "REQUEST_TIMEOUT_S": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serving.app", "--port", str(port), "--header-timeout-s", "2"],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_connections_trickling_headers_are_closed(serve_main):
    socks = [_connect(serve_main) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert httpx.get(f"{serve_main}/health", timeout=5).status_code == 200  # the server answers meanwhile
        still_open = list(socks)
        deadline = time.monotonic() + 15  # the header timeout is 2 s
        while still_open and time.monotonic() < deadline:
            for sock in still_open:
                with contextlib.suppress(OSError):
                    sock.send(b"a")  # one more header byte each
            time.sleep(0.5)
            still_open = [sock for sock in still_open if not _closed_by_server(sock)]
        assert len(still_open) == 0, f"{len(still_open)} of 200 connections still open"
        assert httpx.get(f"{serve_main}/health", timeout=5).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_trickled_upload_is_cut_at_the_deadline(serve_main):
    with _connect(serve_main) as sock:
        sock.sendall(b"POST /predict/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        deadline = time.monotonic() + 15  # the request deadline is 2 s
        while time.monotonic() < deadline and not select.select([sock], [], [], 0)[0]:
            with contextlib.suppress(OSError):
                sock.send(b" ")  # one body byte at a time
            assert httpx.get(f"{serve_main}/health", timeout=5).status_code == 200
            select.select([sock], [], [], 0.5)
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):  # to the end: the server closes the connection
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
        assert json.loads(body)["reason"] == "body_timeout"
