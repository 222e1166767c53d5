"""BulkRNABert sample embeddings: mean over genes of one layer's output.

Why the mean skips missing genes: genes the data layer recorded absent
(``layers["missing"]``) are fed as [MASK]; they carry no measurement of the sample, and
averaging them in would pull samples from gene-poor sources towards one another. There
is no padding either (every sample has the full gene vocabulary), so a sample's
embedding never depends on which other samples share its batch.

Memory stays bounded: samples are tokenised one batch at a time and only the [batch,
embed_dim] result is kept; a backed AnnData (``backed="r"``, what ``bulkfm embed`` reads)
is read from disk one batch of rows at a time. Under ``torchrun``/``accelerate launch``
:func:`embed_sharded` gives each process a contiguous block of samples and gathers the
blocks, in order, on process 0.

CLI (:mod:`bulkfm.cli.embed`): ``bulkfm embed --model DIR --input X.h5ad --output
OUT.(h5ad|parquet|npy)``, or ``torchrun --nproc_per_node N -m bulkfm.cli embed ...``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bulkfm import schema as keys
from bulkfm.config import check_bool, check_choice, check_int
from bulkfm.errors import ConfigError, DuplicateIdError, ExpressionValueError, InputFileError
from bulkfm.io import atomic_path, write_h5ad
from bulkfm.tokenize import DEFAULT_MIN_GENE_COVERAGE, GeneCoverage, gene_coverage

if TYPE_CHECKING:
    import anndata as ad
    import torch

    from bulkfm.models.bulkrnabert import BulkRNABert
    from bulkfm.tokenize import BinTokenizer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_KEY", "embed_adata", "embed_sharded", "read_embeddings", "write_embeddings"]

DEFAULT_KEY = "X_bulkrnabert"
OUTPUT_SUFFIXES = (".h5ad", ".parquet", ".npy")
IDS_SUFFIX = ".ids.txt"
PARQUET_INDEX = "sample_id"
_PARQUET_META_KEY = b"bulkfm"


def embed_adata(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    *,
    layer: int = -1,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    exclude_missing: bool = True,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    min_gene_coverage: float = DEFAULT_MIN_GENE_COVERAGE,
    coverage: GeneCoverage | None = None,
    rows: tuple[int, int] | None = None,
    pooling: str = "mean",
) -> np.ndarray:
    """float32 [n_obs, embed_dim] embeddings in ``adata.obs_names`` order.

    ``layer`` indexes [input embeddings, block 1, ..., block L] (-1 = last block, as in
    the paper). ``layers`` (overrides ``layer``) concatenates several layers' means,
    computed in one forward pass ([n_obs, embed_dim x len(layers)]).
    ``pooling`` over genes: "mean" (the paper) or "max" (per dimension).
    ``exclude_missing=False`` averages over the [MASK] positions too.
    ``device=None`` runs where the model is; a device given moves the model there.
    ``progress=None`` shows a bar only on a terminal.

    The data need not hold every model gene: absent genes are fed as [MASK] like those
    flagged in ``layers["missing"]``. Coverage is measured and logged first
    (:func:`bulkfm.tokenize.gene_coverage`); below ``min_gene_coverage`` it is an error.
    A caller that already measured it (to record it) passes ``coverage``.

    ``adata`` may be backed (``anndata.read_h5ad(path, backed="r")``): X is then read
    from disk one batch of rows at a time and never whole. ``rows=(start, stop)`` embeds
    only those rows (the result has ``stop - start`` rows); it is how a process of a
    sharded run (:func:`embed_sharded`) takes its block, since a backed AnnData cannot be
    sliced twice. The input checks still cover every row, so all processes of a launch
    agree on whether the data is usable.
    """
    import torch
    from tqdm.auto import tqdm

    from bulkfm.models.bulkrnabert import POOLINGS, check_tokenizer_matches

    check_int("batch_size", batch_size, 1, hint="pass --batch-size N (batch_size= in Python)")
    check_choice(
        "pooling", pooling, POOLINGS, hint="--pooling (bulkfm embed), --model-arg NAME:pooling="
    )
    check_bool("exclude_missing", exclude_missing)
    check_tokenizer_matches(model.config, tokenizer)
    depths = list(layers) if layers is not None else [layer]
    for depth in depths:  # fail before any work on a layer that does not exist
        model._normalise_layer(depth)
    if adata.n_obs == 0:
        raise ExpressionValueError("the AnnData has no samples; nothing to embed")
    if coverage is None:
        gene_coverage(tokenizer, adata, min_coverage=min_gene_coverage)
    # The whole input is checked before the first batch, so an error counts every bad
    # sample (not those of one batch) and names samples and genes.
    tokenizer.check_adata(adata, allow_all_missing=not exclude_missing)
    first, last = _check_rows(rows, adata.n_obs)
    if device is not None:
        model.to(device)
    out = np.empty((last - first, model.config.embed_dim * len(depths)), dtype=np.float32)
    starts = range(first, last, batch_size)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(starts, desc="embedding", unit="batch", disable=_disable(progress)):
            stop = min(start + batch_size, last)
            tokens = tokenizer.encode_adata(adata[start:stop])
            with torch.inference_mode():
                emb = model.embed(
                    torch.from_numpy(tokens).to(model.device),
                    layers=depths,
                    exclude_mask=exclude_missing,
                    pooling=pooling,
                )
            out[start - first : stop - first] = emb.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _check_rows(rows: tuple[int, int] | None, n_obs: int) -> tuple[int, int]:
    """``rows`` as a checked (start, stop) range of ``n_obs`` rows (None: all of them)."""
    if rows is None:
        return 0, n_obs
    start, stop = (int(r) for r in rows)
    if not 0 <= start <= stop <= n_obs:
        raise ConfigError(
            f"rows={rows} is not a range of the {n_obs} samples; pass (start, stop) with "
            f"0 <= start <= stop <= {n_obs}"
        )
    return start, stop


def embed_sharded(
    model: BulkRNABert,
    tokenizer: BinTokenizer,
    adata: ad.AnnData,
    **kwargs: Any,
) -> np.ndarray | None:
    """:func:`embed_adata` split over the processes of a ``torchrun`` / ``accelerate
    launch``: every process embeds its contiguous block of rows, and process 0 receives
    all of them in ``adata.obs_names`` order (the others get None).

    Call it on every process with the same arguments. Each sample's embedding depends
    on that sample alone (no padding, no batch statistics), so the result equals the
    one-process one; it is bit-identical when the processes run the same kernels (same
    device type, threads and batch size). Without a launcher this is
    :func:`embed_adata`. A process that fails makes every process raise (no hang).
    """
    from bulkfm.distributed import gather_rows, process_group, row_block, share_error

    rank, world = process_group()
    if world == 1:
        return embed_adata(model, tokenizer, adata, **kwargs)
    try:
        block = embed_adata(
            model, tokenizer, adata, rows=row_block(adata.n_obs, rank, world), **kwargs
        )
    except Exception as exc:  # every process must hear of it, whatever it is
        share_error(f"{type(exc).__name__}: {exc}", rank, world)
        raise
    share_error(None, rank, world)
    return gather_rows(block, rank, world)


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None = only on a TTY."""
    return None if progress is None else not progress


# --------------------------------------------------------------------------- writing
def _ids_of(adata_or_ids: Any) -> list[str]:
    if hasattr(adata_or_ids, "obs_names"):
        ids = list(map(str, adata_or_ids.obs_names))
    elif isinstance(adata_or_ids, str):
        raise ConfigError("sample ids must be a sequence of ids or an AnnData, not one string")
    else:
        ids = [str(i) for i in adata_or_ids]
    dups = [i for i, c in Counter(ids).items() if c > 1]
    if dups:
        raise DuplicateIdError(
            f"{len(dups)} duplicate sample id(s) (e.g. {dups[:5]}); each embedding row needs "
            "a unique id, de-duplicate obs_names (adata.obs_names_make_unique())"
        )
    return ids


def _check_embeddings(emb: Any, n_ids: int) -> np.ndarray:
    arr = np.asarray(emb)
    if arr.ndim != 2:
        raise ConfigError(f"embeddings must be a 2-D [samples, dims] array, got shape {arr.shape}")
    if arr.shape[0] != n_ids:
        raise ConfigError(
            f"embeddings have {arr.shape[0]} rows but {n_ids} sample ids were given; pass the "
            "ids of the embedded samples in the same order"
        )
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise ExpressionValueError(
            "embeddings must be finite floats (got NaN/inf or a non-float dtype); "
            "recompute them with embed_adata"
        )
    return arr


def write_embeddings(
    emb: Any,
    adata_or_ids: Any,
    path_or_adata: Any,
    *,
    key: str = DEFAULT_KEY,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Store embeddings in an AnnData's ``obsm[key]`` or a file, atomically.

    Targets: an AnnData (``obsm[key]`` set in place, its obs_names must equal the ids);
    ``.h5ad`` (``adata_or_ids`` must be the AnnData: ``obsm[key]`` is set on it and it is
    written); ``.parquet`` (index ``sample_id``, columns ``emb_0``...); ``.npy`` (the
    matrix, plus ``<stem>.ids.txt`` with one sample id a line). ``metadata`` (JSON-able,
    e.g. model and layer) goes to ``uns["bulkfm"]["embeddings"][key]`` or the parquet
    schema. Returns the AnnData or the path written.
    """
    ids = _ids_of(adata_or_ids)
    arr = _check_embeddings(emb, len(ids))
    info = {"key": key, "n_samples": arr.shape[0], "dim": arr.shape[1], **(metadata or {})}
    if hasattr(path_or_adata, "obsm"):
        return _into_adata(arr, ids, path_or_adata, key, info)
    path = Path(path_or_adata)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        if not hasattr(adata_or_ids, "obsm"):
            raise ConfigError(
                f"writing {path} (.h5ad) needs the AnnData itself as adata_or_ids, not ids; or "
                "write .parquet / .npy"
            )
        write_h5ad(_into_adata(arr, ids, adata_or_ids, key, info), path)
    elif suffix == ".parquet":
        _write_parquet(arr, ids, path, info)
    elif suffix == ".npy":
        _write_npy(arr, ids, path)
    else:
        raise ConfigError(
            f"unknown embedding output {path.name!r}: the file name must end with one of "
            f"{OUTPUT_SUFFIXES}"
        )
    logger.info("wrote %d x %d embeddings to %s", arr.shape[0], arr.shape[1], path)
    return path


def _into_adata(
    arr: np.ndarray, ids: list[str], adata: ad.AnnData, key: str, info: dict[str, Any]
) -> ad.AnnData:
    if list(map(str, adata.obs_names)) != ids:
        raise ConfigError(
            "the AnnData's obs_names differ from the embedded sample ids (or their order); "
            "store embeddings into the AnnData they were computed from"
        )
    adata.obsm[key] = arr.astype(np.float32, copy=False)
    adata.uns.setdefault(keys.UNS, {}).setdefault("embeddings", {})[key] = json.loads(
        json.dumps(info)
    )
    return adata


def _write_parquet(arr: np.ndarray, ids: list[str], path: Path, info: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.DataFrame(
        arr.astype(np.float32, copy=False),
        index=pd.Index(ids, name=PARQUET_INDEX),
        columns=[f"emb_{i}" for i in range(arr.shape[1])],
    )
    table = pa.Table.from_pandas(frame, preserve_index=True)
    meta = {**(table.schema.metadata or {}), _PARQUET_META_KEY: json.dumps(info).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def _ids_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(path.suffix)] + IDS_SUFFIX)


def _write_npy(arr: np.ndarray, ids: list[str], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, arr.astype(np.float32, copy=False), allow_pickle=False)
    with atomic_path(_ids_path(path)) as tmp:
        tmp.write_text("".join(f"{i}\n" for i in ids))


def read_embeddings(path: str | Path, *, key: str = DEFAULT_KEY) -> pd.DataFrame:
    """Embeddings written by :func:`write_embeddings` as a DataFrame indexed by sample id."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"embedding file {path} does not exist; create it with bulkfm embed")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        frame.index = frame.index.astype(str)
        return frame
    if suffix == ".npy":
        ids_path = _ids_path(path)
        if not ids_path.exists():
            raise InputFileError(f"{path} has no sample id file {ids_path.name} beside it")
        arr = np.load(path, allow_pickle=False)
        ids = ids_path.read_text().splitlines()
        _check_embeddings(arr, len(ids))
    elif suffix == ".h5ad":
        from bulkfm.data.readers import read_h5ad

        adata = read_h5ad(path, flag="embeddings file", expression=False)
        if key not in adata.obsm:
            raise InputFileError(
                f"{path} has no obsm[{key!r}] (has {list(adata.obsm)}); pass key= the embedding key"
            )
        arr, ids = np.asarray(adata.obsm[key]), list(map(str, adata.obs_names))
    else:
        raise InputFileError(f"cannot read embeddings from {path.name}: use {OUTPUT_SUFFIXES}")
    columns = [f"emb_{i}" for i in range(arr.shape[1])]
    return pd.DataFrame(arr, index=pd.Index(ids, name=PARQUET_INDEX), columns=columns)
