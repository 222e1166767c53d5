"""HTTP downloads that survive real networks: retries, resume, md5, bounded parallelism.

Every remote source of bulkfm (the GDC, a Gene2Vec release file, ...) downloads through
this module, so the behaviour a user can rely on is the same everywhere:

* **Resume.** Bytes arrive in ``.<name>.part`` beside the destination. A run that is
  killed leaves that file; the next run asks the server for the rest (HTTP ``Range``)
  and appends it. A server that ignores ``Range`` (answers 200) makes us start over.
* **Verify, then skip.** A destination that already exists is checked (md5 when one is
  known, else the size) and skipped when it matches, so re-running a finished download
  costs one hash per file and no traffic. One that does not match is downloaded again.
* **md5.** With ``md5=`` the finished bytes are hashed before they become the
  destination; a mismatch removes the partial file and raises
  :class:`~bulkfm.errors.DownloadError` naming the file, so no corrupted file is left
  where later stages would read it.
* **Atomic.** The verified ``.part`` file is moved into place through
  :func:`bulkfm.io.atomic_path`: the destination is either absent or complete.
* **Retries.** HTTP 429 and 5xx answers and dropped connections are retried with
  exponential back-off (:class:`RetryPolicy`); a ``Retry-After`` header (seconds or an
  HTTP date) replaces the back-off for that wait. 401/403 and 404 are not retried: they
  raise at once with a message saying what to fix.
* **Progress** is one tqdm bar in bytes (off when not a terminal, as tqdm decides).

API
---
``download_file(url, dest, *, md5=None, size=None, headers=None, retry=None,
progress=True, timeout=60.0, auth_hint=..., not_found_hint=...) -> DownloadResult``
    One URL to one file; the form a single release file (e.g. Gene2Vec) uses.
``download_many(items, *, workers=4, headers=None, retry=None, progress=True, ...)
-> list[DownloadResult]``
    Many :class:`DownloadItem` (url, dest, md5, size) on a bounded thread pool with one
    byte progress bar. Every item is attempted; failures are raised together afterwards.
``request_json(method, url, *, params=None, json=None, headers=None, retry=None,
timeout=60.0, what=...) -> Any``
    A JSON API call with the same retries and error messages (the GDC's ``/files``).
``md5_of(path) -> str``
    The hex md5 of a file, read in blocks.

Why not ``urllib3.Retry`` mounted on a ``requests`` session: it cannot resume a body
that breaks off mid-transfer (the common failure of large downloads) and its sleeps
cannot be observed or shortened in tests; the loop here is small and does both.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import requests
import urllib3
from tqdm.auto import tqdm

from bulkfm.errors import ConfigError, DownloadError
from bulkfm.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "RETRY_STATUSES",
    "DownloadItem",
    "DownloadResult",
    "RetryPolicy",
    "download_file",
    "download_many",
    "md5_of",
    "part_path",
    "request_json",
]

#: HTTP statuses worth another try: rate limiting and server-side failures.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 1 << 20
_HASH_BLOCK = 8 << 20
_USER_AGENT = "bulkfm (+https://pypi.org/project/bulkfm)"
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,  # raised by raw reads (a body cut short, a read timeout)
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a request again.

    Wait ``backoff_s * 2**k`` seconds after the k-th failure (k = 0, 1, ...), at most
    ``max_wait_s``; a ``Retry-After`` header replaces the back-off for that wait (also
    capped at ``max_wait_s``, so a server cannot stall a run for hours). ``attempts``
    counts every try, the first included. ``sleep`` is injectable so tests can record
    the waits instead of spending them.
    """

    attempts: int = 6
    backoff_s: float = 1.0
    max_wait_s: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(
                f"RetryPolicy.attempts (--retries + 1) must be >= 1, got {self.attempts}"
            )
        if not (self.backoff_s >= 0 and self.max_wait_s >= 0):
            raise ConfigError(
                f"RetryPolicy.backoff_s and max_wait_s must be >= 0, got {self.backoff_s} and "
                f"{self.max_wait_s}"
            )

    def wait_s(self, failure: int, retry_after: str | None = None) -> float:
        """Seconds to wait after the ``failure``-th failure (0-based)."""
        told = _parse_retry_after(retry_after)
        wait_s = told if told is not None else self.backoff_s * 2.0**failure
        return float(min(max(wait_s, 0.0), self.max_wait_s))


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date (RFC 9110)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch: where from, where to, and what it must be (when known)."""

    url: str
    dest: Path
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DownloadResult:
    """What happened to one file: ``downloaded`` (fresh), ``resumed`` (a partial file
    from an earlier run was completed) or ``skipped`` (already complete and verified);
    ``n_bytes`` is what came over the network this time."""

    path: Path
    status: Literal["downloaded", "resumed", "skipped"]
    n_bytes: int


def part_path(dest: str | os.PathLike) -> Path:
    """Where the bytes of ``dest`` collect until they are verified: ``.<name>.part``.

    Hidden, so folder readers (the GDC reader skips dot files) never see a half file.
    """
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.part")


def md5_of(path: str | os.PathLike) -> str:
    """Hex md5 of the file at ``path``, read in 8 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- errors


def _server_message(resp: requests.Response) -> str:
    """The server's own words about an error (JSON ``message``/``error``, else text)."""
    try:
        body = resp.json()
    except ValueError:
        text = (resp.text or "").strip()
        return text[:200]
    if isinstance(body, Mapping):
        for key in ("message", "error", "detail"):
            if body.get(key):
                return str(body[key])[:200]
    return str(body)[:200]


def _status_error(
    resp: requests.Response, url: str, *, what: str, auth_hint: str, not_found_hint: str
) -> DownloadError:
    code = resp.status_code
    said = _server_message(resp)
    said = f" (server: {said})" if said else ""
    if code in (401, 403):
        return DownloadError(
            f"{what}: access denied (HTTP {code}) at {url}{said}. Fix: {auth_hint}.", status=code
        )
    if code == 404:
        return DownloadError(
            f"{what}: not found (HTTP 404) at {url}{said}. Fix: {not_found_hint}.", status=code
        )
    return DownloadError(
        f"{what}: the server refused the request (HTTP {code}) at {url}{said}. Fix: check the "
        "request; if it looks right, the service may be changing, so try again later.",
        status=code,
    )


def _gave_up(what: str, url: str, attempts: int, last: str, status: int | None) -> DownloadError:
    return DownloadError(
        f"{what}: gave up after {attempts} attempt(s) at {url}; last failure: {last}. Fix: "
        "run the command again later (finished files are kept and partial ones resume), or "
        "allow more attempts (--retries).",
        status=status,
    )


_AUTH_HINT = "pass the credentials this server requires"
_NOT_FOUND_HINT = "check the URL"


# --------------------------------------------------------------------------- JSON calls


def request_json(
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    json: Any = None,
    headers: Mapping[str, str] | None = None,
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
    session: requests.Session | None = None,
    what: str = "request",
    auth_hint: str = _AUTH_HINT,
    not_found_hint: str = _NOT_FOUND_HINT,
) -> Any:
    """``method url`` and its decoded JSON body, with retries on 429/5xx and dropped
    connections; 401/403/404 and other 4xx raise :class:`DownloadError` at once."""
    retry = retry or RetryPolicy()
    own = session is None
    sess = session or _new_session()
    try:
        last, status = "", None
        for failure in range(retry.attempts):
            retry_after = None
            try:
                resp = sess.request(
                    method, url, params=params, json=json, headers=headers, timeout=timeout
                )
            except _NETWORK_ERRORS as exc:
                last, status = f"{type(exc).__name__}: {exc}", None
            else:
                if resp.status_code in RETRY_STATUSES:
                    last, status = f"HTTP {resp.status_code}", resp.status_code
                    retry_after = resp.headers.get("Retry-After")
                elif resp.status_code >= 400:
                    raise _status_error(
                        resp, url, what=what, auth_hint=auth_hint, not_found_hint=not_found_hint
                    )
                else:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise DownloadError(
                            f"{what}: {url} answered HTTP {resp.status_code} but not with JSON "
                            f"({(resp.text or '')[:120]!r}). Fix: check the API address "
                            "(--api-url)."
                        ) from exc
            if failure + 1 < retry.attempts:
                wait_s = retry.wait_s(failure, retry_after)
                logger.info("%s: %s; retrying in %.1f s", what, last, wait_s)
                retry.sleep(wait_s)
        raise _gave_up(what, url, retry.attempts, last, status)
    finally:
        if own:
            sess.close()


def _new_session() -> requests.Session:
    sess = requests.Session()
    sess.headers["User-Agent"] = _USER_AGENT
    return sess


# --------------------------------------------------------------------------- one file


class _Stopped(Exception):
    """Raised inside a worker when another download failed or the user interrupted."""


@dataclass
class _Ctx:
    """What one transfer needs besides its item."""

    session: requests.Session
    headers: Mapping[str, str]
    retry: RetryPolicy
    timeout: float
    on_bytes: Callable[[int], None]
    stop: threading.Event
    auth_hint: str
    not_found_hint: str
    chunk_bytes: int = _CHUNK_BYTES


def _already_complete(item: DownloadItem) -> bool:
    """Whether ``item.dest`` exists and matches what it must be (md5, else size)."""
    dest = item.dest
    if not dest.is_file():
        return False
    if item.md5 is not None:
        if md5_of(dest) == item.md5.lower():
            return True
        logger.warning("%s exists but its md5 does not match; downloading it again", dest)
        return False
    if item.size is not None and dest.stat().st_size != item.size:
        logger.warning(
            "%s exists but has %d bytes, not %d; downloading it again",
            dest,
            dest.stat().st_size,
            item.size,
        )
        return False
    return True


def _fetch_one(item: DownloadItem, ctx: _Ctx) -> DownloadResult:
    if _already_complete(item):
        logger.info("%s is complete and verified; skipped", item.dest)
        return DownloadResult(item.dest, "skipped", 0)
    what = f"download of {item.dest.name}"
    part = part_path(item.dest)
    item.dest.parent.mkdir(parents=True, exist_ok=True)
    if item.size is not None and part.is_file() and part.stat().st_size > item.size:
        part.unlink()  # longer than the file can be: not a prefix of it
    resumed = part.is_file() and part.stat().st_size > 0
    n_bytes = 0
    last, status = "", None
    for failure in range(ctx.retry.attempts):
        retry_after = None
        try:
            n_bytes += _transfer(item, part, ctx, what)
            break
        except _Retryable as exc:
            last, status, retry_after = exc.reason, exc.status, exc.retry_after
        except _NETWORK_ERRORS as exc:
            last, status = f"{type(exc).__name__}: {exc}", None
        if failure + 1 >= ctx.retry.attempts:
            raise _gave_up(what, item.url, ctx.retry.attempts, last, status)
        wait_s = ctx.retry.wait_s(failure, retry_after)
        logger.info("%s: %s; retrying in %.1f s (resuming the partial file)", what, last, wait_s)
        ctx.retry.sleep(wait_s)
    _verify(item, part)
    with atomic_path(item.dest) as tmp:
        os.replace(part, tmp)
    return DownloadResult(item.dest, "resumed" if resumed else "downloaded", n_bytes)


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None, retry_after: str | None) -> None:
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


def _transfer(item: DownloadItem, part: Path, ctx: _Ctx, what: str) -> int:
    """Append the missing bytes of ``item`` to ``part``; return how many came."""
    offset = part.stat().st_size if part.is_file() else 0
    if item.size is not None and offset == item.size:
        return 0  # the partial file is already whole; verification decides
    # identity: byte ranges and md5 refer to the file as stored, not a compressed transfer
    headers = {**ctx.headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with ctx.session.get(item.url, headers=headers, stream=True, timeout=ctx.timeout) as resp:
        code = resp.status_code
        if code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {code}", code, resp.headers.get("Retry-After"))
        if code == 416 and offset:
            # Range beyond the end: the partial file is stale or complete; start clean.
            part.unlink()
            ctx.on_bytes(-offset)
            raise _Retryable("HTTP 416 (partial file does not fit; restarting)", code, "0")
        if code >= 400:
            raise _status_error(
                resp,
                item.url,
                what=what,
                auth_hint=ctx.auth_hint,
                not_found_hint=ctx.not_found_hint,
            )
        append = code == 206 and offset > 0 and _range_start(resp) == offset
        if offset and not append:
            logger.info("%s: the server sent the whole file; starting over", what)
            ctx.on_bytes(-offset)
        n = 0
        with open(part, "ab" if append else "wb") as fh:
            # read1 hands over what has arrived (up to chunk_bytes) instead of waiting
            # for a full chunk, so a connection that breaks keeps every byte it brought.
            while chunk := resp.raw.read1(ctx.chunk_bytes):
                if ctx.stop.is_set():
                    raise _Stopped
                fh.write(chunk)
                fh.flush()
                n += len(chunk)
                ctx.on_bytes(len(chunk))
        return n


def _range_start(resp: requests.Response) -> int | None:
    """First byte of a 206 answer, from ``Content-Range: bytes START-END/TOTAL``."""
    value = resp.headers.get("Content-Range", "")
    try:
        unit, rest = value.strip().split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _verify(item: DownloadItem, part: Path) -> None:
    """Size and md5 of the finished ``part`` against the item; remove it on mismatch."""
    size = part.stat().st_size if part.is_file() else 0
    problem = None
    if item.size is not None and size != item.size:
        problem = f"it has {size} bytes, but the manifest says {item.size}"
    elif item.md5 is not None:
        got = md5_of(part)
        if got != item.md5.lower():
            problem = f"its md5 is {got}, but the manifest says {item.md5.lower()}"
    if problem is None:
        return
    with contextlib.suppress(OSError):
        part.unlink()
    raise DownloadError(
        f"downloaded file {item.dest} is corrupted: {problem}. The partial file was removed "
        "and nothing was written at that path. Fix: run the command again to download it "
        "afresh; if the mismatch repeats, the file changed at the source (check its id)."
    )


# --------------------------------------------------------------------------- public


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    size: int | None = None,
    headers: Mapping[str, str] | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    auth_hint: str = _AUTH_HINT,
    not_found_hint: str = _NOT_FOUND_HINT,
) -> DownloadResult:
    """Download ``url`` to ``dest`` (resume, verify, retry, atomic; see the module doc).

    ``md5`` (hex) and ``size`` (bytes), when known, are checked before the file is moved
    into place and decide whether an existing ``dest`` is skipped.
    """
    return download_many(
        [DownloadItem(url, Path(dest), md5=md5, size=size)],
        workers=1,
        headers=headers,
        retry=retry,
        progress=progress,
        timeout=timeout,
        auth_hint=auth_hint,
        not_found_hint=not_found_hint,
    )[0]


def download_many(
    items: Sequence[DownloadItem],
    *,
    workers: int = 4,
    headers: Mapping[str, str] | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    auth_hint: str = _AUTH_HINT,
    not_found_hint: str = _NOT_FOUND_HINT,
    desc: str = "download",
) -> list[DownloadResult]:
    """Download ``items`` with at most ``workers`` at a time; results in input order.

    The first failure stops the other transfers (their partial files stay, so a re-run
    resumes them) and is raised as :class:`DownloadError`; an access error (401/403)
    thus stops the run before hundreds of files fail the same way.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers (workers=) must be an int >= 1, got {workers!r}")
    dests = [Path(i.dest) for i in items]
    if len(set(dests)) != len(dests):
        raise ConfigError("two download items share one destination; give each its own path")
    retry = retry or RetryPolicy()
    total = (
        sum(i.size for i in items if i.size is not None)
        if all(i.size is not None for i in items)
        else None
    )
    done = sum(_present_bytes(i) for i in items)
    stop = threading.Event()
    lock = threading.Lock()
    with (
        tqdm(
            total=total,
            initial=done,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=None if progress else True,
        ) as bar,
        _session_pool() as session_for,
    ):

        def on_bytes(n: int) -> None:
            with lock:
                bar.update(n)

        def run(item: DownloadItem) -> DownloadResult:
            ctx = _Ctx(
                session=session_for(),
                headers=dict(headers or {}),
                retry=retry,
                timeout=timeout,
                on_bytes=on_bytes,
                stop=stop,
                auth_hint=auth_hint,
                not_found_hint=not_found_hint,
            )
            result = _fetch_one(item, ctx)
            if result.status == "skipped":
                on_bytes(result.path.stat().st_size)
            return result

        pool = ThreadPoolExecutor(max_workers=min(workers, max(1, len(items))))
        try:
            futures = [pool.submit(run, item) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # KeyboardInterrupt: stop the workers, keep partial files
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        if any(f.done() and not f.cancelled() and f.exception() for f in futures):
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        errors = [exc for f in futures if not f.cancelled() and (exc := f.exception()) is not None]
        real = [e for e in errors if not isinstance(e, _Stopped)]
        if errors and not real:
            raise errors[0]
        if real:
            if len(real) > 1:
                logger.warning("%d downloads failed; the first error follows", len(real))
            raise real[0]
        return [f.result() for f in futures]


def _present_bytes(item: DownloadItem) -> int:
    """Bytes already on disk for ``item`` (its partial file), for the progress bar."""
    part = part_path(item.dest)
    return part.stat().st_size if part.is_file() else 0


@contextlib.contextmanager
def _session_pool() -> Iterator[Callable[[], requests.Session]]:
    """One ``requests.Session`` per worker thread (sessions are not thread-safe); all
    are closed on exit."""
    local = threading.local()
    made: list[requests.Session] = []
    lock = threading.Lock()

    def session_for() -> requests.Session:
        sess = getattr(local, "session", None)
        if sess is None:
            sess = _new_session()
            local.session = sess
            with lock:
                made.append(sess)
        return sess

    try:
        yield session_for
    finally:
        for sess in made:
            sess.close()
