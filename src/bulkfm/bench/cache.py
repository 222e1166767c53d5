"""On-disk cache of frozen-model embeddings: ``<label>-<key>.npy`` + ``.json``.

The key combines the model fingerprint (class, version, settings, checkpoint
hash) and the data fingerprint (sample ids, gene ids, values), so any change to
either misses the cache instead of returning stale vectors. Both files are
written atomically, the JSON last: a crash leaves no entry that looks complete.
Arrays are read with ``allow_pickle=False``.

Safe under concurrency (two benchmark runs, or a run's worker processes, sharing one
folder): each file is written under a unique temporary name and renamed into place
(:func:`bulkfm.io.atomic_path`), so a reader never sees a half-written file, and the
JSON records the array's checksum, which :meth:`EmbeddingCache.load` verifies. A reader
that meets the JSON of one writer beside the array of another (their arrays differ) gets
``None``, a miss, never a mixed entry.

:meth:`EmbeddingCache.load_or_compute` computes a missing entry under a per-entry
inter-process lock (``<label>-<key>.lock``, a :mod:`filelock` OS lock): of two processes
that miss the same entry at once, one computes it while the other waits, then reads it
back instead of computing it again. The operating system releases the lock when its
holder dies, so a killed run leaves no lock that blocks the next one; a wait longer than
``lock_timeout`` seconds (a live holder that is stuck) raises
:class:`~bulkfm.errors.LockTimeoutError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from bulkfm.embedders.base import Embedder
from bulkfm.errors import LockTimeoutError, OutputPathError
from bulkfm.fingerprint import array_checksum, stable_hash
from bulkfm.io import atomic_path, write_text

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

#: 2: the JSON records the array's checksum, verified on every read.
_FORMAT = "bulkfm.embedding_cache/2"
#: How long a process waits for another that computes the same entry (12 hours: long
#: enough for a large model on a whole compendium on CPUs).
DEFAULT_LOCK_TIMEOUT_S = 12 * 3600.0


class EmbeddingCache:
    """Embeddings of models that do not learn, keyed by model and data fingerprints.

    ``lock_timeout``: seconds :meth:`load_or_compute` waits for another process that
    computes the same entry (``None``: without limit).
    """

    def __init__(
        self, directory: str | os.PathLike, *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_S
    ) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout

    def key(self, model: Embedder, data_fingerprint: str) -> str:
        return stable_hash({"model": model.fingerprint(), "data": data_fingerprint})[:20]

    def _paths(self, model: Embedder, data_fingerprint: str) -> tuple[Path, Path]:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.label)
        stem = f"{safe}-{self.key(model, data_fingerprint)}"
        return self.directory / f"{stem}.npy", self.directory / f"{stem}.json"

    @contextlib.contextmanager
    def lock(
        self, model: Embedder, data_fingerprint: str, *, timeout: float | None = None
    ) -> Iterator[Path]:
        """Hold the entry's inter-process lock (yields the lock file's path).

        ``timeout`` (default: the cache's ``lock_timeout``) bounds the wait; past it,
        :class:`~bulkfm.errors.LockTimeoutError`. Not re-entrant across processes by
        design; the lock is released on exit, or by the OS if this process dies.
        """
        npy, _ = self._paths(model, data_fingerprint)
        path = npy.with_suffix(".lock")
        wait = self.lock_timeout if timeout is None else timeout
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(
                f"embedding cache folder {self.directory} (set by --cache-dir / cache_dir=) "
                f"cannot be created ({exc.strerror or exc}); give --cache-dir a folder "
                "you can write to"
            ) from exc
        lock = FileLock(path, timeout=-1 if wait is None else wait)
        try:
            lock.acquire()
        except Timeout:
            raise LockTimeoutError(
                f"waited {wait:g} s for the embedding cache entry of {model.label!r} in "
                f"{self.directory}: another live process holds its lock ({path}) and is "
                "presumably computing it. Wait for that run to finish, or give this run "
                "another --cache-dir (or none). A killed run holds no lock: the operating "
                "system releases it"
            ) from None
        try:
            yield path
        finally:
            lock.release()

    def load_or_compute(
        self,
        model: Embedder,
        data_fingerprint: str,
        n_obs: int,
        compute: Callable[[], np.ndarray],
        *,
        dtype: Any = None,
    ) -> np.ndarray:
        """The cached entry, or ``compute()`` stored (as ``dtype`` if given) and returned
        as stored, so the process that computed an entry gets the same array as those
        that read it.

        A miss takes the entry's lock and looks again before computing, so of several
        processes that miss at once only one computes; the others wait and read its entry.
        """
        hit = self.load(model, data_fingerprint, n_obs)
        if hit is not None:
            return hit
        with self.lock(model, data_fingerprint):
            hit = self.load(model, data_fingerprint, n_obs)  # written while we waited?
            if hit is not None:
                return hit
            emb = np.asarray(compute())
            if dtype is not None:
                emb = emb.astype(dtype)
            self.save(model, data_fingerprint, emb)
        return emb

    def load(self, model: Embedder, data_fingerprint: str, n_obs: int) -> np.ndarray | None:
        """The cached embedding, or None when absent or not matching."""
        npy, meta_path = self._paths(model, data_fingerprint)
        if not (npy.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            emb = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache entry %s: %s", npy, exc)
            return None
        expected = {
            "format": _FORMAT,
            "model_fingerprint": model.fingerprint(),
            "data_fingerprint": data_fingerprint,
        }
        if any(meta.get(k) != v for k, v in expected.items()) or emb.shape[0] != n_obs:
            logger.warning("cache entry %s does not match this model/data; recomputing", npy)
            return None
        if meta.get("checksum") != array_checksum(emb):
            # Another process is rewriting the entry (its array beside the other's JSON),
            # or the array was damaged: a miss, never a mixed entry.
            logger.info("cache entry %s does not match its checksum; recomputing", npy)
            return None
        logger.info("%s: embeddings loaded from cache %s", model.label, npy)
        described = meta.get("model")
        if isinstance(described, dict):
            model.restore(described)  # e.g. the gene coverage the embedding was made with
        return emb

    def save(self, model: Embedder, data_fingerprint: str, emb: np.ndarray) -> Path:
        """Write the entry: the array, then the JSON that records its checksum (each under a
        unique temporary name, renamed into place), so concurrent writers cannot mix it."""
        npy, meta_path = self._paths(model, data_fingerprint)
        emb = np.asarray(emb)
        with atomic_path(npy) as tmp, tmp.open("wb") as fh:
            np.save(fh, emb, allow_pickle=False)
        meta: dict[str, Any] = {
            "format": _FORMAT,
            "model": model.describe(),
            "model_fingerprint": model.fingerprint(),
            "data_fingerprint": data_fingerprint,
            "shape": list(emb.shape),
            "dtype": str(emb.dtype),
            "checksum": array_checksum(emb),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n", meta_path)
        return npy
