"""Starting values for the gene embedding (the model's only notion of gene identity).

The paper initialises it from Gene2Vec (200-d, symbol keyed). Gene2Vec vectors are
not shipped with the data: :func:`init_gene_embeddings` takes the published release file
by path or URL (:data:`GENE2VEC_URL`; downloaded once into the bulkfm cache). Two
fallbacks exist: a co-expression embedding computed on the training matrix (genes that
move together start close together), and random.
Every method returns a JSON-able report (coverage, what was filled randomly) for
``uns``/checkpoint provenance.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import numpy as np
import scipy.sparse as sp

from bulkfm.config import check_int, check_number
from bulkfm.errors import ConfigError, ExpressionValueError, GeneMappingError, InputFileError

if TYPE_CHECKING:
    from bulkfm.data.genes import GeneTable
    from bulkfm.models.bulkrnabert import BulkRNABert

logger = logging.getLogger(__name__)

InitMethod = Literal["gene2vec", "coexpression", "random"]
_N_EXAMPLES = 10
# Above this many samples or genes the exact SVD gets slow; use a randomized one.
_EXACT_SVD_LIMIT = 3000
#: The published 200-d Gene2Vec release (Du et al. 2019, BMC Genomics), the file the
#: BulkRNABert paper initialises from: ``SYMBOL<tab>v1 ... v200`` per line, no header.
#: Its word2vec-format twin is ``gene2vec_dim_200_iter_9_w2v.txt`` (``N D`` header).
GENE2VEC_URL = (
    "https://github.com/jingcheng-du/Gene2vec/raw/master/pre_trained_emb/"
    "gene2vec_dim_200_iter_9.txt"
)
_URL_SCHEMES = ("http", "https")
#: Co-expression for pre-training reads at most this many training samples (a seeded
#: sample when there are more, :func:`coexpression_rows`): the correlation of 4,096
#: samples is known to about +-0.016, and the matrix stays ~300 MB at 19,062 genes.
COEXPRESSION_MAX_ROWS = 4096


# --------------------------------------------------------------------------- Gene2Vec files
def read_gene2vec(
    path: str | os.PathLike, *, binary: bool | None = None
) -> tuple[list[str], np.ndarray]:
    """Keys and vectors of a Gene2Vec / word2vec file (text or binary, header optional).

    Text: ``symbol v1 ... vD`` per line, optionally after a word2vec ``N D`` header.
    Binary (word2vec C format): ``N D`` header, then per key ``key<space>`` + D float32.
    ``binary=None`` detects the format from the bytes after the header.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Gene2Vec file {path} does not exist: check the path")
    data = path.read_bytes()
    if not data.strip():
        raise InputFileError(f"Gene2Vec file {path} is empty")
    header, body_start = _parse_header(data)
    if binary is None:
        binary = header is not None and _looks_binary(data[body_start : body_start + 4096])
    if binary:
        if header is None:
            raise InputFileError(
                f"{path}: a binary word2vec file starts with an 'N D' header line, this one "
                "does not; pass binary=False if it is a text file"
            )
        keys, vectors = _read_binary(data, body_start, *header, source=str(path))
    else:
        keys, vectors = _read_text(data[body_start:], header, source=str(path))
    if header is not None and header[0] != len(keys):
        logger.warning("%s: header says %d vectors, file has %d", path, header[0], len(keys))
    return keys, vectors


def _parse_header(data: bytes) -> tuple[tuple[int, int] | None, int]:
    end = data.find(b"\n")
    first = data[: end if end >= 0 else len(data)]
    parts = first.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return (int(parts[0]), int(parts[1])), (end + 1 if end >= 0 else len(data))
    return None, 0


def _looks_binary(sample: bytes) -> bool:
    if b"\x00" in sample:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _read_binary(
    data: bytes, pos: int, n: int, dim: int, *, source: str
) -> tuple[list[str], np.ndarray]:
    keys: list[str] = []
    vectors = np.empty((n, dim), dtype=np.float32)
    width = 4 * dim
    for i in range(n):
        while pos < len(data) and data[pos : pos + 1] in (b"\n", b" "):
            pos += 1
        space = data.find(b" ", pos)
        if space < 0 or space + 1 + width > len(data):
            raise InputFileError(
                f"{source}: binary word2vec file ends after {i} of {n} vectors; the file is "
                "truncated or the header is wrong"
            )
        keys.append(data[pos:space].decode("utf-8", errors="replace"))
        vectors[i] = np.frombuffer(data, dtype="<f4", count=dim, offset=space + 1)
        pos = space + 1 + width
    return keys, vectors


def _read_text(
    body: bytes, header: tuple[int, int] | None, *, source: str
) -> tuple[list[str], np.ndarray]:
    keys: list[str] = []
    rows: list[np.ndarray] = []
    dim = header[1] if header else None
    line_offset = 2 if header else 1
    for number, line in enumerate(body.decode("utf-8").splitlines(), start=line_offset):
        parts = line.split()
        if not parts:
            continue
        if dim is None:
            dim = len(parts) - 1
        if len(parts) - 1 != dim or dim < 1:
            raise InputFileError(
                f"{source} line {number}: {len(parts) - 1} values after the key, expected "
                f"{dim}; each line must be 'symbol v1 ... v{dim}'"
            )
        try:
            rows.append(np.asarray(parts[1:], dtype=np.float32))
        except ValueError:
            raise InputFileError(
                f"{source} line {number}: non-numeric vector values for {parts[0]!r}"
            ) from None
        keys.append(parts[0])
    if not keys:
        raise InputFileError(f"{source} holds no vectors")
    return keys, np.stack(rows)


def cache_dir() -> Path:
    """bulkfm's download cache: ``$BULKFM_CACHE``, else ``~/.cache/bulkfm``."""
    root = os.environ.get("BULKFM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bulkfm"


def is_url(source: str | os.PathLike) -> bool:
    """True for an http(s) URL (a ``str``; paths are never URLs)."""
    return isinstance(source, str) and urlsplit(source).scheme.lower() in _URL_SCHEMES


def resolve_gene2vec(
    source: str | os.PathLike,
    *,
    md5: str | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """A local Gene2Vec file for ``source``: a path as it is, a URL downloaded once.

    URLs go through :func:`bulkfm.data.download.download_file` (resume, retries, md5
    when given) into ``<cache>/gene2vec/<url hash>/<file name>`` (``cache`` defaults to
    :func:`cache_dir`), so a second call finds the file without network; the hash keeps
    two URLs with one file name apart.
    """
    if not is_url(source):
        return Path(source)
    url = str(source)
    name = Path(urlsplit(url).path).name or "gene2vec.txt"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = Path(cache) if cache is not None else cache_dir()
    dest = dest / "gene2vec" / key / name
    from bulkfm.data.download import download_file

    result = download_file(
        url,
        dest,
        md5=md5,
        progress=progress,
        not_found_hint=(
            f"check the URL; the published release is {GENE2VEC_URL}, or pass a local path"
        ),
    )
    logger.info("Gene2Vec %s: %s (%s)", url, result.path, result.status)
    return result.path


# --------------------------------------------------------------------------- Gene2Vec -> vocab
def _keys_to_ensembl(
    keys: Sequence[str],
    symbol_to_ensembl: Mapping[str, str] | None,
    table: GeneTable | None,
) -> tuple[list[str | None], list[int]]:
    """Ensembl id per key (None when unmapped) and a priority (lower wins collisions)."""
    if _mostly_ensembl(keys):
        return [k.split(".", 1)[0] if k.startswith("ENS") else None for k in keys], [0] * len(keys)
    if symbol_to_ensembl is not None:
        return [symbol_to_ensembl.get(k) for k in keys], [0] * len(keys)
    from bulkfm.data.genes import map_to_ensembl

    ensembl, methods, _ = map_to_ensembl(list(keys), id_type="symbol", table=table)
    exact = {"ensembl", "approved_symbol", "gene_name"}
    priority = [0 if m in exact else 1 for m in methods]
    return [None if e is None else str(e) for e in ensembl], priority


def _mostly_ensembl(keys: Sequence[str]) -> bool:
    return sum(k.startswith("ENS") for k in keys) > len(keys) / 2


def gene2vec_matrix(
    genes: Sequence[str],
    keys: Sequence[str],
    vectors: np.ndarray,
    *,
    symbol_to_ensembl: Mapping[str, str] | None = None,
    table: GeneTable | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Vocabulary-ordered matrix from symbol-keyed vectors, with a coverage report.

    Keys map to Ensembl ids through ``symbol_to_ensembl`` when given, else through
    :func:`bulkfm.data.genes.map_to_ensembl` (approved symbols win over aliases when two
    keys land on one gene). Genes without a vector get random rows with the spread of
    the found ones, so they neither stand out nor coincide.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(keys):
        raise ConfigError(
            f"vectors must be [n_keys, dim] with one row per key, got {vectors.shape} for "
            f"{len(keys)} keys"
        )
    ensembl, priority = _keys_to_ensembl(keys, symbol_to_ensembl, table)
    best: dict[str, tuple[int, int]] = {}
    collisions = 0
    for row, (gene, rank) in enumerate(zip(ensembl, priority, strict=True)):
        if gene is None:
            continue
        if gene in best:
            collisions += 1
            if rank >= best[gene][0]:
                continue
        best[gene] = (rank, row)
    found = np.array([g in best for g in genes], dtype=bool)
    if not found.any():
        raise GeneMappingError(
            f"no vocabulary gene has a Gene2Vec vector (0 of {len(genes)}; vocabulary e.g. "
            f"{list(genes[:3])}, file keys e.g. {list(keys[:3])}); the vocabulary must be "
            "Ensembl ids and the file keyed by gene symbols (or Ensembl ids)"
        )
    rows = np.array([best[g][1] for g, f in zip(genes, found, strict=True) if f])
    matrix = np.empty((len(genes), vectors.shape[1]), dtype=np.float32)
    matrix[found] = vectors[rows]
    spread = float(vectors[rows].std()) or 1.0
    rng = np.random.default_rng(seed)
    matrix[~found] = rng.normal(0.0, spread, size=(int((~found).sum()), vectors.shape[1]))
    missing = [g for g, f in zip(genes, found, strict=True) if not f]
    report = {
        "method": "gene2vec",
        "n_vectors": len(keys),
        "dim": int(vectors.shape[1]),
        "n_genes": len(genes),
        "n_found": int(found.sum()),
        "n_missing": len(missing),
        "fraction_found": float(found.mean()),
        "missing_examples": missing[:_N_EXAMPLES],
        "n_keys_unmapped": sum(e is None for e in ensembl),
        "n_key_collisions": collisions,
        "missing_filled_with": f"normal(0, {spread:.4g})",
    }
    if found.mean() < 0.5:
        logger.warning(
            "Gene2Vec covers only %d of %d genes (%.0f%%): the rest start random",
            report["n_found"],
            len(genes),
            100 * found.mean(),
        )
    return matrix, report


# --------------------------------------------------------------------------- co-expression
def coexpression_matrix(
    X_tpm: Any,
    dim: int,
    *,
    missing: Any = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Gene vectors E [genes, dim] with E @ E.T the best rank-dim approximation of the
    gene-gene correlation of log10(1 + TPM).

    Computed as the SVD of the standardised samples x genes matrix (same eigenvectors
    as the correlation matrix, without building the genes x genes matrix). Missing
    entries count as the gene's mean; zero-variance genes (no correlation defined) get
    random rows of the typical spread so they stay distinct.
    """
    check_int("dim", dim, 1)
    X = X_tpm.toarray() if sp.issparse(X_tpm) else np.asarray(X_tpm)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ConfigError(
            f"co-expression needs a samples x genes matrix with >= 2 samples, got shape {X.shape}"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = np.log10(1.0 + X.astype(np.float32))
    bad = ~np.isfinite(Z) | (X < 0)
    if missing is not None:
        mask = missing.toarray() if sp.issparse(missing) else np.asarray(missing)
        if mask.shape != X.shape:
            raise ConfigError(f"missing mask shape {mask.shape} does not match X {X.shape}")
        mask = mask.astype(bool)
        bad &= ~mask
        Z[mask] = np.nan
    if bad.any():
        raise ExpressionValueError(
            f"{int(bad.sum())} expression values are NaN, inf or negative; co-expression needs "
            "TPM >= 0 (mark unmeasured entries in the missing mask instead)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing genes: handled below
        mean = np.nanmean(Z, axis=0, dtype=np.float64)
        std = np.nanstd(Z, axis=0, dtype=np.float64)
    # log10 units: real genes vary by far more than 1e-6; below it is float round-off.
    constant = ~(std > 1e-6)
    Z -= mean.astype(np.float32)
    Z /= np.where(constant, 1.0, std).astype(np.float32)
    Z[np.isnan(Z)] = 0.0
    Z[:, constant] = 0.0
    s, vt = _top_svd(Z, dim, seed)
    k = s.shape[0]
    matrix = np.zeros((X.shape[1], dim), dtype=np.float32)
    matrix[:, :k] = (vt.T * (s / np.sqrt(X.shape[0]))).astype(np.float32)
    spread = float(matrix[~constant, :k].std()) if (~constant).any() else 1.0
    rng = np.random.default_rng(seed)
    matrix[constant] = rng.normal(0.0, spread or 1.0, size=(int(constant.sum()), dim))
    report = {
        "method": "coexpression",
        "n_samples": int(X.shape[0]),
        "n_genes": int(X.shape[1]),
        "dim": dim,
        "rank_used": int(k),
        "n_zero_variance": int(constant.sum()),
        "zero_variance_examples_index": np.flatnonzero(constant)[:_N_EXAMPLES].tolist(),
        "explained_fraction": float((s**2).sum() / max((Z**2).sum(), 1e-30)),
    }
    return matrix, report


def _top_svd(Z: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top singular values and right vectors; exact when small, randomized when large."""
    k = min(dim, *Z.shape)
    if max(Z.shape) <= _EXACT_SVD_LIMIT or k >= min(Z.shape) - 1:
        _, s, vt = np.linalg.svd(Z, full_matrices=False)
        return s[:k], vt[:k]
    from sklearn.utils.extmath import randomized_svd

    _, s, vt = randomized_svd(Z, n_components=k, n_iter=7, random_state=seed)
    return s, vt


def coexpression_rows(
    rows: Sequence[int] | np.ndarray, *, seed: int = 0, max_rows: int | None = None
) -> np.ndarray:
    """The sample rows co-expression is computed on: all of ``rows`` when there are at most
    ``max_rows`` (default :data:`COEXPRESSION_MAX_ROWS`), else ``max_rows`` of them drawn
    without replacement from ``seed``; sorted either way (the result does not depend on
    the order ``rows`` came in, and a file is read front to back)."""
    max_rows = check_int("max_rows", COEXPRESSION_MAX_ROWS if max_rows is None else max_rows, 2)
    rows = np.sort(np.asarray(rows, dtype=np.int64))  # the draw must not see the order
    if len(rows) > max_rows:
        rows = np.random.default_rng(seed).choice(rows, size=max_rows, replace=False)
    return np.sort(rows)


def rescale_matrix(matrix: np.ndarray, std: float) -> tuple[np.ndarray, dict[str, Any]]:
    """``matrix`` times one factor so the standard deviation of all its entries is ``std``
    (directions and relative norms kept), with a report of the factor."""
    check_number("rescale_std", std, low=0.0, low_open=True)
    before = float(np.asarray(matrix, dtype=np.float64).std())
    if not before > 0:
        raise ConfigError(
            "the gene embedding matrix is constant (std 0): it cannot be rescaled to a std; "
            "set rescale_std=null"
        )
    factor = std / before
    out = (np.asarray(matrix, dtype=np.float64) * factor).astype(np.float32)
    return out, {"rescaled_to_std": float(std), "std_before": before, "rescale_factor": factor}


# --------------------------------------------------------------------------- model entry point
def random_matrix(n_genes: int, dim: int, *, std: float = 0.02, seed: int = 0) -> np.ndarray:
    """The model's default N(0, 0.02) initialisation, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, std, size=(n_genes, dim)).astype(np.float32)


def init_gene_embeddings(
    model: BulkRNABert,
    method: InitMethod,
    *,
    genes: Sequence[str] | None = None,
    gene2vec_path: str | os.PathLike | None = None,
    symbol_to_ensembl: Mapping[str, str] | None = None,
    table: GeneTable | None = None,
    X_tpm: Any = None,
    missing: Any = None,
    seed: int = 0,
    gene2vec_md5: str | None = None,
    rescale_std: float | None = None,
) -> dict[str, Any]:
    """Overwrite ``model.gene_embedding_layer`` and return the report of what was done.

    - ``gene2vec``: needs ``genes`` (model order) and ``gene2vec_path``: the published
      Gene2Vec release file as distributed, either ``gene2vec_dim_200_iter_9.txt``
      (``SYMBOL<tab>v1 ... v200`` per line, no header) or
      ``gene2vec_dim_200_iter_9_w2v.txt`` (word2vec text: an ``N D`` header line), or any
      word2vec binary file; a local path, or an http(s) URL such as
      :data:`GENE2VEC_URL`, downloaded once into ``$BULKFM_CACHE`` (default
      ``~/.cache/bulkfm``) and checked against ``gene2vec_md5`` when given. Symbols map
      to the vocabulary's Ensembl ids through ``symbol_to_ensembl`` or the gene table;
      the report says how many genes got a vector (``n_found``, ``fraction_found``) and
      gives examples of those that start random.
    - ``coexpression``: needs ``X_tpm`` (training samples x model genes, TPM).
    - ``random``: N(0, 0.02).

    ``rescale_std`` (optional) multiplies the finished matrix by one factor so that its
    entries' standard deviation is that number (:func:`rescale_matrix`; 0.02 = the
    random init's); the report gives the factor.
    """
    n_genes = model.config.n_genes
    dim = model.config.init_gene_embed_dim
    if method == "gene2vec":
        if genes is None or gene2vec_path is None:
            raise ConfigError(
                "method='gene2vec' needs genes= (the tokenizer's gene list) and gene2vec_path="
            )
        _check_gene_count(genes, n_genes)
        local = resolve_gene2vec(gene2vec_path, md5=gene2vec_md5)
        digest = _check_md5(local, gene2vec_md5)
        keys, vectors = read_gene2vec(local)
        if vectors.shape[1] != dim:
            raise ConfigError(
                f"Gene2Vec vectors are {vectors.shape[1]}-d but the model has "
                f"init_gene_embed_dim={dim}; set init_gene_embed_dim={vectors.shape[1]}"
            )
        matrix, report = gene2vec_matrix(
            genes, keys, vectors, symbol_to_ensembl=symbol_to_ensembl, table=table, seed=seed
        )
        report["source"] = str(gene2vec_path)
        report["file"] = str(local)
        report["md5"] = digest
    elif method == "coexpression":
        if X_tpm is None:
            raise ConfigError("method='coexpression' needs X_tpm= (training TPM, model genes)")
        if np.shape(X_tpm)[1] != n_genes:
            raise GeneMappingError(
                f"X_tpm has {np.shape(X_tpm)[1]} gene columns but the model has {n_genes}; "
                "align the columns to the tokenizer genes (BinTokenizer.align_columns)"
            )
        matrix, report = coexpression_matrix(X_tpm, dim, missing=missing, seed=seed)
    elif method == "random":
        matrix = random_matrix(n_genes, dim, seed=seed)
        report = {"method": "random", "n_genes": n_genes, "dim": dim, "std": 0.02}
    else:
        raise ConfigError(
            f"unknown gene embedding init {method!r}: use 'gene2vec', 'coexpression' or 'random'"
        )
    if rescale_std is not None:
        matrix, scaled = rescale_matrix(matrix, rescale_std)
        report.update(scaled)
    _write_weights(model, matrix)
    report["seed"] = seed
    logger.info("gene embedding initialised: %s", {k: report[k] for k in list(report)[:6]})
    return report


def rescale_gene_embeddings(model: BulkRNABert, std: float) -> dict[str, Any]:
    """Rescale the model's current gene embedding in place (:func:`rescale_matrix`) and
    return the report: how a run keeps the model's own random draw at another scale."""
    weight = model.gene_embedding_layer.weight
    matrix, report = rescale_matrix(weight.detach().cpu().float().numpy(), std)
    _write_weights(model, matrix)
    return report


def _write_weights(model: BulkRNABert, matrix: np.ndarray) -> None:
    import torch

    weight = model.gene_embedding_layer.weight
    with torch.no_grad():
        weight.copy_(torch.from_numpy(matrix).to(dtype=weight.dtype, device=weight.device))


def _check_md5(path: Path, expected: str | None) -> str:
    """The file's md5; a mismatch with ``expected`` (a local file: a URL download was
    already checked) is an error naming both."""
    from bulkfm.data.download import md5_of

    digest = md5_of(path)
    if expected is not None and digest != expected.lower():
        raise InputFileError(
            f"Gene2Vec file {path} has md5 {digest}, expected {expected.lower()} "
            "(gene_init.gene2vec_md5 / gene2vec_md5=): the file is not the one named; "
            "fetch it again or correct the md5"
        )
    return digest


def _check_gene_count(genes: Sequence[str], n_genes: int) -> None:
    if len(genes) != n_genes:
        raise GeneMappingError(
            f"{len(genes)} genes given but the model has n_genes={n_genes}; pass the "
            "tokenizer's gene list (model order)"
        )
