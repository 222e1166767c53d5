"""The HTTP download machinery against a real local HTTP server (127.0.0.1, free port).

Each test scripts the server's answers (a dropped connection, 429, a corrupted body,
403/404) and checks what ends up on disk and what went over the wire. Waits are recorded
through ``RetryPolicy.sleep`` instead of spent, so the tests take no wall time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bulkfm.data.download import (
    DownloadItem,
    RetryPolicy,
    _parse_retry_after,
    download_file,
    download_many,
    md5_of,
    part_path,
    request_json,
)
from bulkfm.errors import ConfigError, DownloadError
from tests.data.local_http import Reply, Request, local_server, serve_bytes

DATA = bytes(range(256)) * 40  # 10,240 bytes
MD5 = hashlib.md5(DATA).hexdigest()


def _policy(attempts: int = 4, **kw) -> tuple[RetryPolicy, list[float]]:
    waits: list[float] = []
    return RetryPolicy(attempts=attempts, backoff_s=0.5, sleep=waits.append, **kw), waits


def _file_app(data: bytes = DATA, script: list[str] | None = None):
    """Serve ``data`` at /f; ``script`` lists what the first requests get instead."""
    script = list(script or [])

    def app(request: Request) -> Reply:
        step = script.pop(0) if script else "ok"
        if step == "drop":
            return serve_bytes(data, request, drop_after=3000)
        if step == "429":
            return Reply.json({"message": "slow down"}, 429, **{"Retry-After": "7"})
        if step == "503":
            return Reply(503, b"busy")
        if step == "no-range":
            return Reply(200, data)
        return serve_bytes(data, request)

    return app


def test_happy_path_then_skip_without_traffic(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "file.bin"
    retry, waits = _policy()
    with local_server(_file_app()) as server:
        first = download_file(f"{server.url}/f", dest, md5=MD5, size=len(DATA), retry=retry)
        assert first.status == "downloaded" and first.n_bytes == len(DATA)
        assert dest.read_bytes() == DATA
        assert not part_path(dest).exists()
        again = download_file(f"{server.url}/f", dest, md5=MD5, size=len(DATA), retry=retry)
    assert again.status == "skipped" and again.n_bytes == 0
    assert len(server.log) == 1  # the complete, md5-verified file was not fetched again
    assert waits == []
    assert md5_of(dest) == hashlib.md5(dest.read_bytes()).hexdigest()


def test_killed_download_resumes_with_range(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    retry, _ = _policy(attempts=1)
    with local_server(_file_app(script=["drop"])) as server:
        with pytest.raises(DownloadError, match="gave up after 1 attempt"):
            download_file(f"{server.url}/f", dest, md5=MD5, size=len(DATA), retry=retry)
        # the run died mid-file: no destination, a partial file with the bytes that came
        assert not dest.exists()
        assert part_path(dest).read_bytes() == DATA[:3000]
        result = download_file(f"{server.url}/f", dest, md5=MD5, size=len(DATA), retry=retry)
    assert result.status == "resumed"
    assert result.n_bytes == len(DATA) - 3000  # only the missing tail came over the wire
    assert server.log[-1].headers["range"] == "bytes=3000-"
    assert dest.read_bytes() == DATA and not part_path(dest).exists()


def test_dropped_connection_is_resumed_within_one_run(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    retry, waits = _policy()
    with local_server(_file_app(script=["drop"])) as server:
        result = download_file(f"{server.url}/f", dest, md5=MD5, retry=retry)
    assert result.status == "downloaded" and dest.read_bytes() == DATA
    assert [r.headers.get("range") for r in server.log] == [None, "bytes=3000-"]
    assert waits == [0.5]


def test_server_ignoring_range_restarts_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    part_path(dest).write_bytes(DATA[:100])
    retry, _ = _policy()
    with local_server(_file_app(script=["no-range"])) as server:
        download_file(f"{server.url}/f", dest, md5=MD5, retry=retry)
    assert server.log[0].headers["range"] == "bytes=100-"
    assert dest.read_bytes() == DATA  # not DATA[:100] + DATA


def test_corrupted_file_is_caught_by_md5_and_removed(tmp_path: Path) -> None:
    dest = tmp_path / "sample.tsv"
    bad = DATA[:-1] + b"\x00"
    retry, _ = _policy()
    with (
        local_server(_file_app(data=bad)) as server,
        pytest.raises(DownloadError, match=r"sample\.tsv is corrupted: its md5 is") as err,
    ):
        download_file(f"{server.url}/f", dest, md5=MD5, retry=retry)
    assert hashlib.md5(bad).hexdigest() in str(err.value) and MD5 in str(err.value)
    assert not dest.exists() and not part_path(dest).exists()
    assert [p for p in os.listdir(tmp_path)] == []


def test_existing_file_with_wrong_md5_is_downloaded_again(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    retry, _ = _policy()
    with local_server(_file_app()) as server:
        result = download_file(f"{server.url}/f", dest, md5=MD5, retry=retry)
    assert result.status == "downloaded" and dest.read_bytes() == DATA


def test_429_honours_retry_after_then_succeeds(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    retry, waits = _policy()
    with local_server(_file_app(script=["429", "503"])) as server:
        download_file(f"{server.url}/f", dest, md5=MD5, retry=retry)
    assert dest.read_bytes() == DATA
    # Retry-After: 7 replaces the back-off once; the 503 then waits backoff * 2**1
    assert waits == [7.0, 1.0]
    assert len(server.log) == 3


def test_retries_are_bounded(tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    retry, waits = _policy(attempts=3, max_wait_s=5.0)
    with (
        local_server(_file_app(script=["429"] * 10)) as server,
        pytest.raises(DownloadError, match=r"gave up after 3 attempt.*HTTP 429") as err,
    ):
        download_file(f"{server.url}/f", dest, retry=retry)
    assert err.value.status == 429
    assert len(server.log) == 3
    assert waits == [5.0, 5.0]  # Retry-After 7 s capped at max_wait_s
    assert not dest.exists()


@pytest.mark.parametrize(
    ("status", "words"),
    [(404, "not found \\(HTTP 404\\).*Fix: check the URL"), (403, "access denied \\(HTTP 403\\)")],
)
def test_404_and_403_fail_at_once_with_a_fix(tmp_path: Path, status: int, words: str) -> None:
    retry, waits = _policy()
    with (
        local_server(lambda r: Reply.json({"message": "nope"}, status)) as server,
        pytest.raises(DownloadError, match=words) as err,
    ):
        download_file(f"{server.url}/f", tmp_path / "x", retry=retry, auth_hint="use a token")
    assert err.value.status == status and "server: nope" in str(err.value)
    assert len(server.log) == 1 and waits == []
    assert os.listdir(tmp_path) == []


def test_download_many_in_parallel(tmp_path: Path) -> None:
    blobs = {f"/f{i}": os.urandom(5000 + i) for i in range(6)}

    def app(request: Request) -> Reply:
        return serve_bytes(blobs[request.path], request)

    retry, _ = _policy()
    with local_server(app) as server:
        items = [
            DownloadItem(
                f"{server.url}{p}",
                tmp_path / p.strip("/") / "data.bin",
                md5=hashlib.md5(b).hexdigest(),
                size=len(b),
            )
            for p, b in blobs.items()
        ]
        results = download_many(items, workers=3, retry=retry)
    assert [r.path for r in results] == [i.dest for i in items]
    for item, blob in zip(items, blobs.values(), strict=True):
        assert item.dest.read_bytes() == blob


def test_download_many_raises_the_real_failure(tmp_path: Path) -> None:
    def app(request: Request) -> Reply:
        if request.path == "/missing":
            return Reply(404, b"")
        return serve_bytes(DATA, request)

    retry, _ = _policy()
    with local_server(app) as server:
        items = [
            DownloadItem(f"{server.url}/ok", tmp_path / "ok.bin", md5=MD5),
            DownloadItem(f"{server.url}/missing", tmp_path / "missing.bin"),
        ]
        with pytest.raises(DownloadError, match=r"missing\.bin: not found"):
            download_many(items, workers=2, retry=retry)
    assert not (tmp_path / "missing.bin").exists()


def test_request_json_retries_and_checks_json(tmp_path: Path) -> None:
    script = ["503"]

    def app(request: Request) -> Reply:
        if request.path == "/text":
            return Reply(200, b"<html>")
        if script:
            script.pop()
            return Reply(503, b"")
        return Reply.json({"echo": request.json()})

    retry, waits = _policy()
    with local_server(app) as server:
        assert request_json("POST", f"{server.url}/j", json={"a": 1}, retry=retry) == {
            "echo": {"a": 1}
        }
        with pytest.raises(DownloadError, match="not with JSON"):
            request_json("GET", f"{server.url}/text", retry=retry)
    assert waits == [0.5]


def test_retry_after_forms_and_policy_checks() -> None:
    assert _parse_retry_after("12") == 12.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _parse_retry_after("soon") is None and _parse_retry_after(None) is None
    far = RetryPolicy(max_wait_s=30.0).wait_s(0, "Fri, 01 Jan 2100 00:00:00 GMT")
    assert far == 30.0
    assert RetryPolicy(backoff_s=2.0).wait_s(3) == 16.0
    with pytest.raises(ConfigError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ConfigError, match="--workers"):
        download_many([], workers=0)
