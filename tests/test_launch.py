"""serving/launch.py: the one uvicorn launcher (benchmarks, tests, demo) on loopback."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import pytest

from serving.launch import free_port, main, run_server

# Run by main() while the server is up: prints /metadata's max_batch_size, exits 7 if /ready said 200.
PROBE = """
import json, os, urllib.request
base = os.environ["BASE_URL"]
print(json.load(urllib.request.urlopen(base + "/metadata"))["settings"]["max_batch_size"])
raise SystemExit(7 if urllib.request.urlopen(base + "/ready").status == 200 else 1)
"""


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.URLError as e:
        return isinstance(e.reason, ConnectionRefusedError)
    return False


def test_run_server_serves_with_env_then_stops(model_dir, tmp_path):
    port = free_port()
    with run_server(model_dir, port=port, env={"MAX_BATCH_SIZE": 3}, log_path=tmp_path / "s.log") as base:
        assert base == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/metadata") as r:
            settings = json.load(r)["settings"]
        assert settings["max_batch_size"] == 3  # env reached the server
        assert settings["model_dir"] == "run/model"  # its names: /metadata shows no absolute path
    assert refused(base + "/ready")  # SIGTERM on exit: nothing listens on the port any more


def test_run_server_reports_the_log_of_a_server_that_exits(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(RuntimeError, match="exited with") as e:
        with run_server(missing, log_path=tmp_path / "s.log", ready_timeout=60):
            pass
    assert f"MODEL_DIR={missing} is not a directory" in str(e.value)  # the server's own message


def test_main_runs_the_command_against_the_server_and_returns_its_status(model_dir, capfd):
    code = main(["--model-dir", str(model_dir), "--", sys.executable, "-c", PROBE])
    assert code == 7
    assert capfd.readouterr().out.strip().splitlines()[-1] == "16"  # MAX_BATCH_SIZE's default
