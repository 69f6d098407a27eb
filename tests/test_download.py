"""data_preprocessing/download.py against a real ThreadingHTTPServer on 127.0.0.1 and a real
httpx client: what is cached, each failure's reason, retries, caps, and the cache on a re-run."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.config import REPO_ROOT, field, parse_config
from data_preprocessing.download import (DownloadArgs, DownloadConfig, DownloadError, cache_path, default_cache_dir,
                                         download_all, is_url)
from tests.image_server import LoopbackServer, failing, redirect, slow, static
from tests.serving_fixtures import free_port, jpeg_bytes, png_bytes

JPEG, PNG = jpeg_bytes(64, 48), png_bytes(60, 40)
HTML = b"<!doctype html><html><body>Sorry, this page isn't available.</body></html>"
MAX_BYTES = 1_000_000
HASHED = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def server():
    routes = {"/photo.jpg": static(JPEG, "image/jpeg"), "/photo.png": static(PNG, "image/png"),
              "/page.html": static(HTML, "text/html"), "/choices": static(HTML, "text/html", status=300),
              "/moved": redirect("/target.png"), "/target.png": static(PNG, "image/png"),
              "/to-ftp": redirect("ftp://127.0.0.1/photo.jpg"),
              "/busy": failing([429], static(JPEG, "image/jpeg"), headers={"Retry-After": "1"}),
              "/flaky": failing([500, 500], static(JPEG, "image/jpeg")), "/down": failing([503] * 9, static(JPEG, "")),
              "/slow": slow(2.0, static(JPEG, "image/jpeg")),
              "/declared-huge": static(b"\xff" * (MAX_BYTES + 1), "image/jpeg")}
    routes.update({f"/loop{i}": redirect(f"/loop{i + 1}") for i in range(20)})
    srv = LoopbackServer(routes)
    srv.routes["/huge"] = srv.stream(200 * 2**20)  # 200 MiB, no Content-Length
    srv.routes["/stalls"] = srv.stream(512 * 1024, declare=True, stall_after=128 * 1024)
    # 32 KiB every 50 ms for a second: each read comes in time, the whole body does not.
    srv.routes["/drip"] = srv.stream(640 * 1024, chunk=32 * 1024, declare=True, pause_s=0.05)
    yield srv
    srv.stop()


@pytest.fixture
def cfg(tmp_path) -> DownloadConfig:
    # Tiny timeout and backoff: the failing cases take a fraction of a second.
    return DownloadConfig(workers=4, timeout_s=0.3, max_bytes=MAX_BYTES, cache_dir=tmp_path / "cache", backoff_s=0.01)


def run(urls, cfg) -> dict:
    return dict(download_all(urls, cfg, progress=False))


def cache_files(cfg) -> list[Path]:
    return sorted(p for p in cfg.cache_dir.rglob("*") if p.is_file())


def test_images_and_an_html_page_are_cached_as_served_and_a_redirect_is_followed(server, cfg):
    urls = [server.url(p) for p in ("/photo.jpg", "/photo.png", "/page.html", "/moved")]
    got = run(urls, cfg)
    assert {u: p.read_bytes() for u, p in got.items()} == dict(zip(urls, (JPEG, PNG, HTML, PNG)))
    assert {u: p for u, p in got.items()} == {u: cache_path(u, cfg.cache_dir) for u in urls}  # keyed by the URL asked
    assert (server.hits["/moved"], server.hits["/target.png"]) == (1, 1)


def test_each_failure_has_its_reason_and_detail(server, cfg):
    refused = f"http://127.0.0.1:{free_port()}/photo.jpg"  # nothing listens there
    urls = {"404": server.url("/nothing-here.jpg"), "loop": server.url("/loop0"), "ftp": "ftp://127.0.0.1/photo.jpg",
            "refused": refused, "503": server.url("/down"), "300": server.url("/choices"),
            "to-ftp": server.url("/to-ftp"), "no-host": "http://"}
    got = run(urls.values(), cfg)
    errors = {k: (got[u].reason, got[u].message) for k, u in urls.items()}
    assert errors["404"] == ("download_failed", "HTTP 404 Not Found")
    assert errors["loop"] == ("download_failed", "more than 5 redirects")
    assert errors["ftp"][0] == "unsupported_url" and "ftp://" in errors["ftp"][1]
    assert errors["to-ftp"] == ("unsupported_url", "redirected to ftp://127.0.0.1/photo.jpg")
    assert errors["no-host"][0] == "download_failed" and errors["no-host"][1].startswith("invalid URL")
    assert errors["refused"][0] == "download_failed" and "ConnectError" in errors["refused"][1]
    assert errors["503"] == ("download_failed", "HTTP 503 Service Unavailable")
    assert errors["300"] == ("download_failed", "HTTP 300 Multiple Choices")  # a 3xx with no Location is no image
    assert all(isinstance(got[u], DownloadError) for u in urls.values())
    # A 404 and a redirect loop are not tried again; the loop stopped after 5 redirects (6 requests); a 503 got 3 tries.
    assert server.hits["/nothing-here.jpg"] == 1 and server.hits["/down"] == 3
    assert sum(n for p, n in server.hits.items() if p.startswith("/loop")) == 6
    assert cache_files(cfg) == []  # no failure is cached


def test_429_waits_for_its_retry_after_then_succeeds(server, cfg):
    url = server.url("/busy")
    assert run([url], cfg)[url].read_bytes() == JPEG
    first, second = server.times["/busy"]
    assert second - first >= 1.0  # Retry-After: 1, not the 0.01 s backoff


def test_5xx_twice_then_200_succeeds_on_the_third_try(server, cfg):
    url = server.url("/flaky")
    assert run([url], cfg)[url].read_bytes() == JPEG
    assert server.hits["/flaky"] == 3


def test_an_answer_slower_than_the_timeout_is_download_timeout_after_every_try(server, cfg):
    url = server.url("/slow")
    err = run([url], cfg)[url]
    assert (err.reason, server.hits["/slow"]) == ("download_timeout", cfg.tries)
    assert "ReadTimeout" in err.message


def test_a_body_that_drips_past_the_timeout_is_download_timeout(server, cfg):
    url = server.url("/drip")
    err = run([url], dataclasses.replace(cfg, tries=1, timeout_s=0.5))[url]
    assert (err.reason, err.message) == ("download_timeout", "body not complete in 0.5 s")
    assert cache_files(cfg) == []


def test_an_oversized_body_is_cut_off_while_streaming_and_leaves_no_temp_file(server, cfg):
    streamed, declared = server.url("/huge"), server.url("/declared-huge")
    got = run([streamed, declared], cfg)
    assert (got[streamed].reason, got[declared].reason) == ("too_large", "too_large")
    assert "Content-Length 1,000,001 bytes" in got[declared].message
    assert server.hits["/huge"] == 1  # too_large is final, not retried
    # The client hung up after ~1 MB: the server got nowhere near the end of its 200 MiB (socket buffers hold a few MB).
    assert server.sent["/huge"] < 50 * 2**20
    assert cache_files(cfg) == []


def test_a_second_run_reads_the_cache_with_the_server_stopped(server, cfg):
    urls = [server.url(p) for p in ("/photo.jpg", "/photo.png", "/page.html", "/moved", "/flaky")]
    first = run(urls, cfg)
    hits = sum(server.hits.values())
    server.stop()
    assert run(urls, cfg) == first
    assert sum(server.hits.values()) == hits  # not one request
    # Only final names: five bodies under their URL's hash, no .part file.
    assert [p.name for p in cache_files(cfg)] == sorted(cache_path(u, cfg.cache_dir).name for u in urls)
    assert all(HASHED.fullmatch(p.name) and p.parent.name == p.name[:2] for p in cache_files(cfg))


def test_a_run_killed_mid_download_leaves_no_file_under_the_cache_name(server, cfg):
    url = server.url("/stalls")
    code = ("import sys; from pathlib import Path; "
            "from data_preprocessing.download import DownloadConfig, download_all; "
            "list(download_all([sys.argv[1]], DownloadConfig(cache_dir=Path(sys.argv[2])), progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(cfg.cache_dir)], cwd=REPO_ROOT)
    try:  # wait until the first quarter of the body is on disk (the server then stalls), and kill the run
        deadline = time.monotonic() + 30
        while not (cfg.cache_dir.is_dir() and [p for p in cache_files(cfg) if p.stat().st_size == 128 * 1024]):
            assert proc.poll() is None and time.monotonic() < deadline, "the partial body never reached the disk"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not cache_path(url, cfg.cache_dir).exists()
    assert [p.name.endswith(".part") for p in cache_files(cfg)] == [True]  # the partial body sits under a temp name


def test_a_failed_url_is_tried_again_by_the_next_run(server, cfg):
    url = server.url("/nothing-here.jpg")
    run([url], cfg)
    assert run([url], cfg)[url].reason == "download_failed"
    assert server.hits["/nothing-here.jpg"] == 2


def test_a_repeated_url_is_fetched_once(server, cfg):
    url = server.url("/photo.jpg")
    assert list(download_all([url, url, url], cfg, progress=False)) == [(url, cache_path(url, cfg.cache_dir))]
    assert server.hits["/photo.jpg"] == 1


def test_urls_are_read_as_workers_free_up(server, cfg):
    """At most 2 x workers requests in flight: the iterator is not drained up front."""
    read, first_result_after = [], []

    def urls():
        for i in range(40):
            read.append(i)
            yield server.url(f"/photo.jpg?i={i}")

    for _ in download_all(urls(), cfg, progress=False):
        first_result_after.append(len(read))
    assert first_result_after[0] <= 2 * cfg.workers and len(first_result_after) == 40
    assert server.hits["/photo.jpg"] == 40  # a query string makes another URL


def test_summary_counts_outcomes_by_reason(server, cfg, caplog):
    run([server.url("/photo.jpg")], cfg)
    urls = [server.url(p) for p in ("/photo.jpg", "/photo.png", "/nothing-here.jpg")] + ["file:///etc/hosts"]
    with caplog.at_level(logging.INFO, logger="data_preprocessing.download"):
        run(urls, cfg)
    assert "image URLs: 1 downloaded, 1 from the cache, 2 failed (download_failed 1, unsupported_url 1); " \
           "2 fetches in" in caplog.text


def test_cached_files_get_the_users_umask(server, cfg):
    old = os.umask(0o027)
    try:
        path = run([server.url("/photo.jpg")], cfg)[server.url("/photo.jpg")]
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o640, 0o750)


@pytest.mark.parametrize("cell, expected", [
    ("https://cdn.example.com/p/0.jpg", True), ("http://127.0.0.1:8000/a.png", True), ("ftp://host/a.jpg", True),
    ("file:///tmp/a.jpg", True), ("s3://bucket/key.jpg", True), ("images/0001.jpg", False), ("/abs/a.jpg", False),
    ("C:\\Users\\me\\a.jpg", False), ("C://Users/me/a.jpg", False), ("https:/cdn.example.com/p/0.jpg", False),
    ("", False)])
def test_is_url(cell, expected):
    assert is_url(cell) is expected


def test_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "engagement" / "images"
    assert DownloadConfig().cache_dir == tmp_path / "xdg" / "engagement" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "engagement" / "images"


def test_cache_path_is_the_urls_sha256_under_a_two_letter_shard(tmp_path):
    url = "https://cdn.example.com/p/0.jpg"
    # sha256 of that URL, computed once by hand with `printf %s URL | sha256sum`.
    digest = "1c3151cbe6cfdbaba52f7f611ad54b50a076ace60435d5c4de0bf8c5ed2ec1a3"
    assert cache_path(url, tmp_path) == tmp_path / digest[:2] / digest
    assert cache_path(url + "?x", tmp_path) != cache_path(url, tmp_path)


@dataclass
class TableScript(DownloadArgs):
    """A script config with a required field, as preprocess.py's, inheriting the download flags."""

    input: str = field(help="a table")


def test_download_flags_parse_into_a_download_config():
    cfg = parse_config(TableScript, ["--input", "t.csv", "--image-cache", "/tmp/c", "--download-workers", "3",
                                     "--download-timeout", "1.5", "--max-image-bytes", "1000"])
    assert cfg.download_config() == DownloadConfig(workers=3, timeout_s=1.5, max_bytes=1000, cache_dir=Path("/tmp/c"))
    assert parse_config(TableScript, ["--input", "t.csv"]).download_config() == DownloadConfig()


def test_a_bad_download_flag_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit):
        parse_config(TableScript, ["--input", "t.csv", "--download-workers", "0"])
    assert "--download-workers" in capsys.readouterr().err
