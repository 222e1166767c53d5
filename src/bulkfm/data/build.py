"""Expression files + clinical tables -> one clean, validated AnnData.

Each input goes through the same steps on its own (read, label cohort, parse sample
ids, harmonise genes, convert to TPM) because units and gene ids are properties of a
file; only then are sources concatenated, with genes a source lacks recorded in
``layers["missing"]`` rather than silently treated as measured zeros.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from bulkfm.config import ConfigMixin, check_bool, check_choice, check_number
from bulkfm.config import build as build_config
from bulkfm.data import clinical, genes, readers, units
from bulkfm.data.archs4 import Archs4Selection
from bulkfm.errors import ConfigError, DuplicateIdError, InputFileError
from bulkfm.io import plain_record
from bulkfm.schema import (
    COHORT,
    COUNTS,
    MISSING,
    SAMPLE_ID,
    SAMPLE_TYPE,
    STUDY,
    SURVIVAL_EVENT,
    SYMBOL,
    UNS,
)

logger = logging.getLogger(__name__)

DuplicateSampleRule = Literal["error", "suffix", "first"]
_DUPLICATE_SAMPLE_RULES = ("error", "suffix", "first")
_FILL_RULES = ("missing", "zero")
#: What an input holds (``auto``: detected); the units module converts each to TPM.
InputUnit = Literal["auto", "counts", "tpm", "fpkm", "log"]
_ENDPOINTS = ("OS", "DSS", "DFI", "PFI")


@dataclass
class ExpressionInput:
    """One expression source and how to read it (every field has an ``auto`` default).

    ``archs4`` selects samples and genes of an ARCHS4 ``.h5`` file (needed there: the
    file holds far more samples than memory), e.g. ``{series: [GSE...], source: liver}``.
    """

    path: Path
    format: str = "auto"
    orientation: str = "auto"
    value_column: str = "tpm_unstranded"
    sample_sheet: Path | None = None
    unit: InputUnit = "auto"
    id_type: genes.IdType | Literal["auto"] = "auto"
    cohort: str | None = None
    archs4: Archs4Selection | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.sample_sheet is not None:
            self.sample_sheet = Path(self.sample_sheet)
        if isinstance(self.archs4, dict):
            self.archs4 = build_config(Archs4Selection, self.archs4, section="archs4")
        if not self.path.exists():
            raise InputFileError(
                f"expression input {self.path} does not exist: check the path (globs are "
                "expanded by expand_inputs / the CLI)"
            )


@dataclass
class BuildConfig(ConfigMixin):
    """Everything ``bulkfm data build`` needs; validates itself on creation.

    From YAML (``bulkfm data build --config``), ``inputs`` is a list of
    :class:`ExpressionInput` mappings (``{path: x.tsv, unit: counts}``).
    """

    inputs: list[ExpressionInput]
    survival: Path | None = None
    endpoint: str = "OS"
    mutations: Path | None = None
    mutation_genes: list[str] | None = None
    gene_lengths: Path | None = None
    vocabulary: Path | None = None
    min_vocabulary_fraction: float = 0.5
    fill: genes.FillRule = "missing"
    duplicate_genes: genes.DuplicateRule = "sum"
    id_conflicts: genes.IdConflictRule = "prefer_symbol"
    duplicate_samples: DuplicateSampleRule = "error"
    sample_types: list[str] | None = None
    cohort_from_filename: str | None = None
    min_mapped_fraction: float = 0.5
    keep_counts: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no expression input given: pass at least one file or folder")
        self.inputs = [
            i if isinstance(i, ExpressionInput) else ExpressionInput(i) for i in self.inputs
        ]
        check_choice("endpoint", self.endpoint, _ENDPOINTS)
        check_choice("duplicate_samples", self.duplicate_samples, _DUPLICATE_SAMPLE_RULES)
        check_choice("fill", self.fill, _FILL_RULES, hint="missing: masked later")
        check_choice(
            "id_conflicts",
            self.id_conflicts,
            genes.ID_CONFLICT_RULES,
            hint="what to do when a row's symbol and Entrez/Ensembl id name different genes",
        )
        check_number("min_vocabulary_fraction", self.min_vocabulary_fraction, low=0.0, high=1.0)
        check_bool("keep_counts", self.keep_counts)
        for name in ("survival", "mutations", "gene_lengths", "vocabulary"):
            value = getattr(self, name)
            if value is not None:
                value = Path(value)
                setattr(self, name, value)
                if not value.exists():
                    flag = "--" + name.replace("_", "-")
                    raise InputFileError(
                        f"{flag} file {value} ({name}=) does not exist: check the path"
                    )
        if self.cohort_from_filename is not None:
            try:
                pattern = re.compile(self.cohort_from_filename)
            except re.error as exc:
                raise ConfigError(
                    f"cohort_from_filename {self.cohort_from_filename!r} is not a valid regular "
                    f"expression: {exc}"
                ) from exc
            if pattern.groups < 1:
                raise ConfigError(
                    "cohort_from_filename needs one capture group, e.g. '^([a-z]+)-' takes "
                    "'chol' from 'chol-rsem-count-tcga-t.txt.gz'"
                )


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Expand globs; keep folders (GDC downloads) as they are; fail on patterns matching nothing."""
    paths: list[Path] = []
    for pattern in patterns:
        text = str(pattern)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise InputFileError(f"{text!r} matches no file: check the pattern")
        paths.extend(Path(m) for m in matches)
    return paths


def shared_data_config(root: str | Path) -> BuildConfig:
    """The project's shared real data (``shared/data``: TCGA tumours, RNAseqDB TCGA normals
    and tumours, GTEx) as one build, with survival and driver mutations. The same aliquot
    quantified by both pipelines is kept twice (``obs["sample_id"]`` tells them apart).
    Used by the real-data tests, benchmarks and documented runs."""
    root = Path(root)
    paths = expand_inputs(
        [root / "tcga" / "tcga_tumor_counts_7cohorts.tsv.gz", str(root / "rnaseqdb" / "*.txt.gz")]
    )
    return BuildConfig(
        inputs=[ExpressionInput(path) for path in paths],
        survival=root / "clinical" / "tcga_cdr_survival.tsv.gz",
        mutations=root / "clinical" / "tcga_driver_mutations.tsv.gz",
        gene_lengths=root / "genes" / "gene_lengths.csv.gz",
        cohort_from_filename=r"^([a-z]+)-",
        duplicate_samples="suffix",
    )


def build_dataset(config: BuildConfig, *, progress: bool | None = None) -> ad.AnnData:
    """Read, harmonise and join everything named in ``config`` into one AnnData (X = TPM)."""
    lengths = units.load_gene_lengths(config.gene_lengths)
    parts: list[ad.AnnData] = []
    source_reports: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    for spec in tqdm(config.inputs, desc="reading", unit="file", disable=progress is False or None):
        part, report = _prepare_source(spec, config, lengths)
        parts.append(part)
        source_reports.append(report)

    names = [r["name"] for r in source_reports]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
        for report, name in zip(source_reports, names, strict=True):
            report["name"] = name
    adata = _concatenate(parts, names, config.duplicate_samples)
    uns: dict[str, Any] = {
        "sources": {r["name"]: r for r in source_reports},
        "build": _config_record(config),
    }

    if config.survival is not None:
        table = clinical.read_survival_table(config.survival, endpoint=config.endpoint)
        uns["survival"] = clinical.join_survival(adata, table, endpoint=config.endpoint)
    if config.mutations is not None:
        table = clinical.read_mutation_table(config.mutations, genes=config.mutation_genes)
        uns["mutations"] = clinical.join_mutations(adata, table, genes=config.mutation_genes)
    if config.sample_types:
        adata = clinical.filter_sample_type(adata, keep=tuple(config.sample_types))
    if config.vocabulary is not None:
        vocab = genes.load_vocabulary(config.vocabulary)
        adata = genes.align_to_vocabulary(
            adata, vocab, min_fraction=config.min_vocabulary_fraction, fill=config.fill
        )

    previous = dict(adata.uns.get(UNS, {}))
    previous.update(uns)
    adata.uns[UNS] = plain_record(previous)
    adata.X = np.asarray(adata.X, dtype=np.float32)
    _normalise_obs(adata)
    return adata


def _prepare_source(
    spec: ExpressionInput, config: BuildConfig, lengths: pd.Series
) -> tuple[ad.AnnData, dict[str, Any]]:
    adata = readers.read_expression(
        spec.path,
        format=spec.format,
        orientation=spec.orientation,
        value_column=spec.value_column,
        sample_sheet=spec.sample_sheet,
        archs4_select=spec.archs4,
    )
    name = _source_name(spec.path)
    if SAMPLE_ID not in adata.obs:
        # The id clinical joins use: obs_names may be suffixed later (duplicate samples).
        adata.obs[SAMPLE_ID] = adata.obs_names.to_numpy()
    clinical.annotate_samples(adata)
    _label_cohort(adata, spec, config.cohort_from_filename)
    adata = genes.harmonize_genes(
        adata,
        id_type=spec.id_type,
        duplicates=config.duplicate_genes,
        min_mapped_fraction=config.min_mapped_fraction,
        id_conflicts=config.id_conflicts,
    )
    adata = units.to_tpm(
        adata, input_unit=spec.unit, lengths=lengths, keep_counts=config.keep_counts
    )
    if config.keep_counts and COUNTS not in adata.layers:
        unit = adata.uns.get(UNS, {}).get("units", {}).get("detected", "not counts")
        raise ConfigError(
            f"keep_counts: {spec.path} holds {unit} values, not read counts, so there are no "
            "counts to keep; build without --keep-counts, or pass count files (--unit counts "
            "if detection is wrong)"
        )
    adata.obs["source"] = name
    meta = adata.uns.get(UNS, {})
    report = {
        "name": name,
        "path": str(spec.path),
        "n_samples": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        **{k: meta[k] for k in ("source", "gene_mapping", "units") if k in meta},
    }
    adata.uns = {}
    return adata, report


def _source_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zip"):
        name = name.removesuffix(suffix)
    return Path(name).stem or name


def _label_cohort(adata: ad.AnnData, spec: ExpressionInput, pattern: str | None) -> None:
    """Cohort: explicit per-input label > a column in the file > the file-name pattern."""
    if spec.cohort is not None:
        adata.obs[COHORT] = spec.cohort
        return
    if COHORT in adata.obs and adata.obs[COHORT].notna().all():
        return
    if pattern is None:
        return
    match = re.search(pattern, spec.path.name)
    if match is None:
        logger.warning(
            "cohort_from_filename %r does not match %s: its samples keep no cohort label",
            pattern,
            spec.path.name,
        )
        return
    label = match.group(1).upper()
    if COHORT in adata.obs:
        adata.obs[COHORT] = adata.obs[COHORT].astype(object).fillna(label)
    else:
        adata.obs[COHORT] = label


def _concatenate(
    parts: list[ad.AnnData], names: list[str], rule: DuplicateSampleRule
) -> ad.AnnData:
    """Stack sources on the union of their genes; record absent genes in ``layers["missing"]``."""
    parts = _resolve_duplicate_samples(parts, names, rule)
    if len(parts) == 1 and MISSING not in parts[0].layers:
        return parts[0]
    gene_index = pd.Index(pd.unique(np.concatenate([p.var_names.to_numpy() for p in parts])))
    n_obs = sum(p.n_obs for p in parts)
    X = np.zeros((n_obs, len(gene_index)), dtype=np.float32)
    # Raw counts travel along when every source kept them (BuildConfig.keep_counts).
    counts = np.zeros_like(X) if all(COUNTS in p.layers for p in parts) else None
    missing_blocks = []
    row = 0
    for part in parts:
        cols = gene_index.get_indexer(part.var_names)
        X[row : row + part.n_obs, cols] = np.asarray(part.X, dtype=np.float32)
        if counts is not None:
            layer = part.layers[COUNTS]
            dense = layer.toarray() if sp.issparse(layer) else np.asarray(layer)
            counts[row : row + part.n_obs, cols] = dense
        missing_blocks.append(_missing_block(part, cols, len(gene_index)))
        row += part.n_obs
    var = _merge_var([p.var for p in parts], gene_index)
    obs = pd.concat([p.obs for p in parts], axis=0, join="outer")
    out = ad.AnnData(X=X, obs=obs, var=var)
    if counts is not None:
        out.layers[COUNTS] = counts
    missing = sp.vstack(missing_blocks, format="csr")
    if missing.nnz:
        out.layers[MISSING] = missing.astype(bool)
    return out


def _missing_block(part: ad.AnnData, cols: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Rows of the union matrix: True for genes this source lacks (and its own missing)."""
    absent = np.setdiff1d(np.arange(n_genes), cols, assume_unique=True)
    block = sp.csr_matrix(
        (
            np.ones(part.n_obs * absent.size, dtype=bool),
            np.tile(absent, part.n_obs),
            np.arange(part.n_obs + 1) * absent.size,
        ),
        shape=(part.n_obs, n_genes),
    )
    if MISSING in part.layers:
        own = sp.csr_matrix(part.layers[MISSING]).tocoo()
        block = block + sp.csr_matrix(
            (own.data.astype(bool), (own.row, cols[own.col])), shape=(part.n_obs, n_genes)
        )
    return block.tocsr()


def _merge_var(vars_: list[pd.DataFrame], index: pd.Index) -> pd.DataFrame:
    merged = pd.concat([v for v in vars_], axis=0)
    merged = merged[~merged.index.duplicated(keep="first")].reindex(index)
    keep = [c for c in (SYMBOL, "gene_biotype") if c in merged]
    return merged[keep] if keep else pd.DataFrame(index=index)


def _resolve_duplicate_samples(
    parts: list[ad.AnnData], names: list[str], rule: DuplicateSampleRule
) -> list[ad.AnnData]:
    seen: dict[str, str] = {}
    out = []
    for part, name in zip(parts, names, strict=True):
        ids = part.obs_names.to_numpy()
        clash = np.array([i in seen for i in ids], dtype=bool)
        if clash.any():
            examples = [f"{i} ({seen[i]} and {name})" for i in ids[clash][:3]]
            if rule == "error":
                raise DuplicateIdError(
                    f"{int(clash.sum())} sample id(s) appear in more than one input, e.g. "
                    f"{'; '.join(examples)}. If they are the same aliquot quantified twice, keep "
                    "both with duplicate_samples='suffix' (--duplicate-samples suffix) or only the "
                    "first with 'first'."
                )
            if rule == "first":
                outcome = f"kept the earlier input's copies and left out these {clash.sum()}"
            else:
                outcome = (
                    f"kept both: this input's copies are named '<id>|{name}', and obs "
                    f"'{SAMPLE_ID}' keeps the original id, so survival and mutation calls join "
                    "to both copies and splits keep them with their patient"
                )
            logger.warning(
                "%d sample id(s) of %s already came from an earlier input (%s): "
                "--duplicate-samples %s %s",
                int(clash.sum()),
                name,
                "; ".join(examples),
                rule,
                outcome,
            )
            if rule == "first":
                part = part[~clash].copy()
                ids = part.obs_names.to_numpy()
            else:
                part = part.copy()
                if SAMPLE_ID not in part.obs:
                    part.obs[SAMPLE_ID] = ids
                part.obs_names = [
                    f"{i}|{name}" if c else i for i, c in zip(ids, clash, strict=True)
                ]
                ids = part.obs_names.to_numpy()
        for i in ids:
            seen[i] = name
        if part.n_obs:
            out.append(part)
    if not out:
        raise InputFileError("no samples left after removing duplicate sample ids")
    return out


def _normalise_obs(adata: ad.AnnData) -> None:
    """Categorical strings for compact, h5ad-safe obs."""
    if SAMPLE_ID not in adata.obs:
        adata.obs[SAMPLE_ID] = adata.obs_names.to_numpy()
    else:
        adata.obs[SAMPLE_ID] = (
            adata.obs[SAMPLE_ID]
            .astype(object)
            .fillna(pd.Series(adata.obs_names, index=adata.obs_names))
        )
    for col in adata.obs.columns:
        series = adata.obs[col]
        if series.dtype == object or isinstance(series.dtype, pd.StringDtype):
            adata.obs[col] = series.astype("string").astype("category")
    for col in adata.var.columns:
        if adata.var[col].dtype == object:
            adata.var[col] = adata.var[col].astype("string").astype("category")


def _config_record(config: BuildConfig) -> dict[str, Any]:
    record = dataclasses.asdict(config)

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            items = [plain(v) for v in value]
            # h5ad stores lists only of scalars: index lists of records by position
            if any(isinstance(v, dict) for v in items):
                return {str(i): v for i, v in enumerate(items)}
            return items
        return value

    return plain(record)


def _gene_row_lines(mapping: dict[str, Any]) -> list[str]:
    """How rows sharing a gene were merged, and rows whose id columns disagree."""
    lines = []
    merged = mapping.get("n_duplicates_merged", 0)
    if merged:
        lines.append(
            f"    {merged} extra rows named a gene another row names (none of their id "
            f"columns names another gene): merged by --duplicate-genes "
            f"{mapping.get('rule', '?')} into "
            f"{mapping.get('n_duplicate_genes', '?')} genes"
        )
    conflicts = mapping.get("id_conflicts") or {}
    if conflicts.get("n_rows"):
        kept = ", ".join(f"{n} by the {c}" for c, n in conflicts.get("kept_by", {}).items())
        lines.append(
            f"    {conflicts['n_rows']} rows name different genes in their id columns "
            f"({', '.join(f'{n} {p}' for p, n in conflicts.get('by_columns', {}).items())}): "
            f"--id-conflicts {conflicts.get('rule', '?')} kept {kept or 'none'}, left out "
            f"{conflicts.get('n_dropped', 0)} (never summed with another gene)"
        )
    return lines


def summarize(adata: ad.AnnData) -> pd.DataFrame:
    """Samples per study, cohort and sample type, with survival events where joined."""
    obs = adata.obs
    keys = [c for c in (STUDY, COHORT, SAMPLE_TYPE) if c in obs]
    if not keys:
        return pd.DataFrame({"samples": [adata.n_obs]})
    frame = obs[keys].astype(object).fillna("NA")
    frame = frame.assign(samples=1)
    if SURVIVAL_EVENT in obs:
        event = pd.to_numeric(obs[SURVIVAL_EVENT], errors="coerce")
        frame = frame.assign(with_survival=event.notna().astype(int), events=event.fillna(0))
    table = frame.groupby(keys, sort=True).sum(numeric_only=True)
    if "events" in table:
        table["events"] = table["events"].astype(int)
    return table


def format_summary(adata: ad.AnnData) -> str:
    """Human-readable build summary: counts table plus gene coverage lines."""
    lines = [f"{adata.n_obs} samples x {adata.n_vars} genes (X = TPM, float32)"]
    meta = adata.uns.get(UNS, {})
    for source in meta.get("sources", {}).values():
        mapping = source.get("gene_mapping", {})
        unit = source.get("units", {})
        lines.append(
            f"  {source['name']}: {source['n_samples']} samples, "
            f"{mapping.get('n_mapped', '?')}/{mapping.get('n_input', '?')} gene rows mapped "
            f"({mapping.get('n_unmapped', 0)} unmapped, "
            f"{mapping.get('n_ambiguous', 0)} ambiguous, "
            f"{mapping.get('n_id_conflict', 0)} left out for conflicting id columns), "
            f"unit {unit.get('detected', unit.get('input_unit', '?'))}"
        )
        lines.extend(_gene_row_lines(mapping))
    align = meta.get("vocabulary_alignment")
    if align:
        lines.append(
            f"vocabulary: {align['n_found']}/{align['n_vocabulary']} genes found "
            f"({100 * align['fraction_found']:.1f}%), missing genes {align['fill']}"
        )
    if MISSING in adata.layers:
        frac = adata.layers[MISSING].nnz / max(adata.n_obs * adata.n_vars, 1)
        lines.append(f"missing entries (gene absent from a sample's source): {100 * frac:.1f}%")
    surv = meta.get("survival")
    if surv:
        lines.append(
            f"survival ({surv.get('endpoint', '?')}): "
            f"{surv.get('n_matched', '?')} samples matched, "
            f"{surv.get('n_unmatched', '?')} unmatched"
        )
    mut = meta.get("mutations")
    if mut:
        lines.append(f"mutations: {mut.get('n_matched', '?')} samples matched")
    lines.append("")
    lines.append(summarize(adata).to_string())
    return "\n".join(lines)
