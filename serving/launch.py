"""Start the API as users run it (``python -m uvicorn serving.app:app``) on loopback, wait
until the model is loaded, and stop it again: the one launcher for benchmarks, tests and
the demo.

    with run_server("runs/demo/run/model", env={"MICRO_BATCHING": "0"}) as base_url:
        httpx.get(base_url + "/health")

    python -m serving.launch --model-dir runs/demo/run/model --port 8000            # serve until Ctrl-C
    python -m serving.launch --model-dir runs/demo/run/model --port 8000 -- \\
        curl -sS -F image=@photo.jpg -F text=hi http://127.0.0.1:8000/predict       # run one command, stop

The command after ``--`` runs with ``BASE_URL`` in its environment; its exit status is
the launcher's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):  # run as `python serving/launch.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import REPO_ROOT, config_dict, field, parse_config, setup_logging

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # loopback only: the launcher is for local runs, never for exposing the API


def free_port() -> int:
    """A TCP port the kernel says is free on loopback now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting; 503 while the model loads
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_server(model_dir: str | os.PathLike, *, port: int | None = None, env: dict | None = None,
               log_path: str | os.PathLike | None = None, ready_timeout: float = 120.0,
               uvicorn_args: Sequence[str] = ()) -> Iterator[str]:
    """Run ``uvicorn serving.app:app`` with ``MODEL_DIR=model_dir`` (plus ``env``) on
    127.0.0.1 for the ``with`` block; yields its base URL once GET /ready answers 200.

    Server output goes to ``log_path`` (default: a temp file). If the process exits or is
    not ready within ``ready_timeout`` s, raises RuntimeError with the log's tail.
    """
    port = port or free_port()
    base_url = f"http://{HOST}:{port}"
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="serving-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}, "MODEL_DIR": str(model_dir),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "uvicorn", "serving.app:app", "--host", HOST, "--port", str(port), *uvicorn_args]
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(base_url + "/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {ready_timeout} s"
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"uvicorn serving.app:app {why}; log {log_path}:\n{tail}")
            time.sleep(0.2)
        log.info("serving %s at %s (log %s)", model_dir, base_url, log_path)
        yield base_url
    finally:
        _stop(proc)


@dataclass
class LaunchConfig:
    """Run the prediction server on loopback until Ctrl-C, or for the one command given after `--`."""

    model_dir: str = field(help="model artifact directory (RUN_DIR/model written by training/train_torch.py)")
    port: int = field(0, help="TCP port on 127.0.0.1 (0 = a free one)")
    log: str | None = field(None, help="server log file (default: a temp file)")
    ready_timeout: float = field(120.0, help="seconds to wait for GET /ready == 200")


def main(argv: list[str] | None = None) -> int:
    # 1. Parse args: the launcher's own before `--`, the command to run after it.
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    cfg = parse_config(LaunchConfig, argv[:argv.index("--")] if "--" in argv else argv)
    setup_logging()
    log.info("config: %s", config_dict(cfg))
    # 2. Serve; run the command against it, or wait for Ctrl-C.
    with run_server(cfg.model_dir, port=cfg.port or None, log_path=cfg.log, ready_timeout=cfg.ready_timeout) as url:
        if command:
            return subprocess.run(command, env={**os.environ, "BASE_URL": url}).returncode
        print(f"serving at {url}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
