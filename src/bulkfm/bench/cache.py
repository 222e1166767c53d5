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
``None``, a miss, never a mixed entry. No lock: two processes that miss at once both
compute the entry, and the last rename wins, which is only repeated work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from bulkfm.embedders.base import Embedder
from bulkfm.fingerprint import array_checksum, stable_hash
from bulkfm.io import atomic_path, write_text

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingCache"]

#: 2: the JSON records the array's checksum, verified on every read.
_FORMAT = "bulkfm.embedding_cache/2"


class EmbeddingCache:
    """Embeddings of models that do not learn, keyed by model and data fingerprints."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def key(self, model: Embedder, data_fingerprint: str) -> str:
        return stable_hash({"model": model.fingerprint(), "data": data_fingerprint})[:20]

    def _paths(self, model: Embedder, data_fingerprint: str) -> tuple[Path, Path]:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.label)
        stem = f"{safe}-{self.key(model, data_fingerprint)}"
        return self.directory / f"{stem}.npy", self.directory / f"{stem}.json"

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
