"""The NCI Genomic Data Commons (GDC) as a data source: find, download, describe.

``bulkfm data download`` turns "the STAR counts of TCGA-BRCA" into a folder that
``bulkfm data build`` reads as it is::

    OUT/<file_id>/<file_name>      one file per sample, as gdc-client lays them out
    OUT/gdc_sample_sheet.tsv       the GDC portal's sample-sheet columns (File ID,
                                   File Name, ..., Case ID, Sample ID, Sample Type)
    OUT/gdc_manifest.txt           a gdc-client manifest (id, filename, md5, size, state)
    OUT/clinical.tsv               survival per patient in TCGA-CDR columns
                                   (bcr_patient_barcode, type, OS, OS.time, ...)

The client talks to the GDC REST API (``/projects/{id}``, ``/files``, ``/cases``,
``/data/{file_id}``) through :mod:`bulkfm.data.download`, so every call has the same
retries, resume and md5 checks. The API address is ``--api-url``, else the environment
variable ``BULKFM_GDC_URL``, else the public GDC.

Why not a GDC client library: the maintained options on PyPI are few. ``gdc-client``
(NCI's own) is a binary outside PyPI; ``gdctools`` (2018) and ``gdc-api-wrapper`` (2020)
are unmaintained; ``gdcfetch`` (0.3, one author) hard-codes the API address (so it
cannot be pointed at a test server), has no Retry-After handling, no byte progress and no
clinical tables. A small client on ``requests`` does what bulkfm needs and is tested
against a local server serving the API's response shapes.

Survival from the GDC (``clinical.tsv`` without ``--clinical-table``): OS = 1 for
``demographic.vital_status`` "Dead", 0 for "Alive", unknown otherwise; OS.time =
``demographic.days_to_death`` for the dead and, for the living (censored), the latest of
``diagnoses.days_to_last_follow_up`` and ``follow_ups.days_to_follow_up``. Negative or
missing times are left unknown (NA), so such patients are dropped by the survival join
rather than entered with a made-up time. The curated TCGA-CDR (Liu et al., Cell 2018) is
better where it exists: pass it with ``--clinical-table`` and its rows for the downloaded
patients are written instead (all endpoints kept).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bulkfm.data.clinical import read_survival_table
from bulkfm.data.download import (
    DownloadItem,
    DownloadResult,
    RetryPolicy,
    download_many,
    request_json,
)
from bulkfm.errors import ConfigError, DownloadError, InputFileError
from bulkfm.io import output_dir, write_text

logger = logging.getLogger(__name__)

__all__ = [
    "API_URL_ENV",
    "CLINICAL_FILE",
    "DEFAULT_API_URL",
    "MANIFEST_FILE",
    "SAMPLE_SHEET_COLUMNS",
    "SAMPLE_SHEET_FILE",
    "GDCClient",
    "GDCDownload",
    "GDCFile",
    "GDCPlan",
    "GDCQuery",
    "api_url",
    "clinical_table",
    "download_gdc",
    "format_plan",
    "plan_download",
    "read_token",
]

DEFAULT_API_URL = "https://api.gdc.cancer.gov"
API_URL_ENV = "BULKFM_GDC_URL"
SAMPLE_SHEET_FILE = "gdc_sample_sheet.tsv"
MANIFEST_FILE = "gdc_manifest.txt"
CLINICAL_FILE = "clinical.tsv"
#: Columns of the sample sheet the GDC portal's cart gives (and the GDC reader reads).
SAMPLE_SHEET_COLUMNS = (
    "File ID",
    "File Name",
    "Data Category",
    "Data Type",
    "Project ID",
    "Case ID",
    "Sample ID",
    "Sample Type",
)
#: What ``data download`` fetches unless told otherwise: STAR gene counts (with TPM).
STAR_DATA_TYPE = "Gene Expression Quantification"
STAR_WORKFLOW = "STAR - Counts"

_FILE_FIELDS = (
    "file_id",
    "file_name",
    "md5sum",
    "file_size",
    "access",
    "state",
    "data_category",
    "data_type",
    "analysis.workflow_type",
    "cases.case_id",
    "cases.submitter_id",
    "cases.project.project_id",
    "cases.samples.submitter_id",
    "cases.samples.sample_type",
)
_CASE_FIELDS = (
    "case_id",
    "submitter_id",
    "project.project_id",
    "demographic.vital_status",
    "demographic.days_to_death",
    "diagnoses.days_to_last_follow_up",
    "follow_ups.days_to_follow_up",
)
_TOKEN_HINT = (
    "controlled-access files need a GDC token: download one from the GDC portal (your "
    "name > Download Token, with dbGaP authorisation for the project) and pass it with "
    "--token-file (token= in Python); a token lasts 30 days"
)


def api_url(url: str | None = None) -> str:
    """The GDC API address: ``url``, else ``$BULKFM_GDC_URL``, else the public GDC."""
    chosen = url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL
    if not chosen.startswith(("http://", "https://")):
        source = "--api-url" if url else API_URL_ENV
        raise ConfigError(
            f"the GDC API address {chosen!r} (set by {source}) is not an http(s) URL. Fix: "
            f"give e.g. {DEFAULT_API_URL}"
        )
    return chosen.rstrip("/")


def read_token(path: str | os.PathLike) -> str:
    """The GDC authentication token stored in the file at ``path`` (--token-file)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"--token-file {path} does not exist. Fix: download a token from the GDC portal "
            "and give its path."
        )
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if not token:
        raise InputFileError(f"--token-file {path} is empty. Fix: download a new GDC token.")
    return token


# --------------------------------------------------------------------------- query


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ConfigError(f"{what} must be a list of names, got the string {values!r}")
    return tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))


@dataclass(frozen=True)
class GDCQuery:
    """Which files to fetch: projects, data type, workflow and (optionally) sample types.

    Sample types use the GDC's names (``Primary Tumor``, ``Solid Tissue Normal``,
    ``Metastatic``, ...); an empty tuple keeps every type.
    """

    projects: tuple[str, ...]
    data_type: str = STAR_DATA_TYPE
    workflow_type: str | None = STAR_WORKFLOW
    sample_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "projects", _names(self.projects, "projects"))
        object.__setattr__(self, "sample_types", _names(self.sample_types, "sample_types"))
        if not self.projects:
            raise ConfigError(
                "no GDC project given. Fix: pass --project, e.g. --project TCGA-BRCA "
                "(comma-separated or repeated for several)"
            )
        if not str(self.data_type).strip():
            raise ConfigError("--data-type is empty. Fix: e.g. 'Gene Expression Quantification'")

    def filters(self) -> dict[str, Any]:
        """The GDC filter of this query (an ``and`` of ``in``/``=`` clauses)."""
        clauses: list[dict[str, Any]] = [
            _in("cases.project.project_id", self.projects),
            {"op": "=", "content": {"field": "files.data_type", "value": self.data_type}},
        ]
        if self.workflow_type:
            clauses.append(
                {
                    "op": "=",
                    "content": {
                        "field": "files.analysis.workflow_type",
                        "value": self.workflow_type,
                    },
                }
            )
        if self.sample_types:
            clauses.append(_in("cases.samples.sample_type", self.sample_types))
        return {"op": "and", "content": clauses}

    def describe(self) -> str:
        """The query in the words of the flags that set it, for messages."""
        parts = [
            f"--project {','.join(self.projects)}",
            f"--data-type '{self.data_type}'",
            f"--workflow-type '{self.workflow_type or ''}'",
        ]
        if self.sample_types:
            parts.append(f"--sample-types '{','.join(self.sample_types)}'")
        return " ".join(parts)


def _in(field_name: str, values: Sequence[str]) -> dict[str, Any]:
    return {"op": "in", "content": {"field": field_name, "value": list(values)}}


@dataclass(frozen=True)
class GDCFile:
    """One file of a ``/files`` answer, flattened to what the sample sheet needs."""

    file_id: str
    file_name: str
    md5sum: str | None
    file_size: int | None
    access: str
    data_category: str
    data_type: str
    project_id: str
    case_id: str
    sample_id: str
    sample_type: str

    @classmethod
    def from_hit(cls, hit: Mapping[str, Any]) -> GDCFile:
        """Flatten one hit; several cases or samples are joined with ', ' as the portal does."""
        cases = hit.get("cases") or []
        samples = [s for c in cases for s in (c.get("samples") or [])]
        size = hit.get("file_size")
        return cls(
            file_id=str(hit.get("file_id") or hit.get("id") or ""),
            file_name=str(hit.get("file_name") or ""),
            md5sum=(str(hit["md5sum"]).lower() if hit.get("md5sum") else None),
            file_size=int(size) if size is not None else None,
            access=str(hit.get("access") or "open"),
            data_category=str(hit.get("data_category") or ""),
            data_type=str(hit.get("data_type") or ""),
            project_id=_join((c.get("project") or {}).get("project_id") for c in cases),
            case_id=_join(c.get("submitter_id") for c in cases),
            sample_id=_join(s.get("submitter_id") for s in samples),
            sample_type=_join(s.get("sample_type") for s in samples),
        )

    def row(self) -> dict[str, str]:
        """This file as a sample-sheet row."""
        values = (
            self.file_id,
            self.file_name,
            self.data_category,
            self.data_type,
            self.project_id,
            self.case_id,
            self.sample_id,
            self.sample_type,
        )
        return dict(zip(SAMPLE_SHEET_COLUMNS, values, strict=True))


def _join(values: Iterable[Any]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v))


# --------------------------------------------------------------------------- client


class GDCClient:
    """A small client of the GDC REST API (search with paging, project check, data URLs).

    ``token`` is sent as ``X-Auth-Token`` (needed for controlled-access files only);
    ``retry`` and ``page_size`` are there for tests and slow links.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        retry: RetryPolicy | None = None,
        page_size: int = 500,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be an int >= 1, got {page_size!r}")
        self.url = api_url(url)
        self.token = token
        self.retry = retry or RetryPolicy()
        self.page_size = page_size
        self.timeout = timeout

    @property
    def headers(self) -> dict[str, str]:
        """Headers of every request: the token when there is one."""
        return {"X-Auth-Token": self.token} if self.token else {}

    def _call(self, method: str, endpoint: str, what: str, **kwargs: Any) -> Any:
        return request_json(
            method,
            f"{self.url}/{endpoint}",
            headers=self.headers,
            retry=self.retry,
            timeout=self.timeout,
            what=what,
            auth_hint=_TOKEN_HINT,
            not_found_hint=f"check the GDC API address ({self.url}; --api-url or {API_URL_ENV})",
            **kwargs,
        )

    def check_projects(self, projects: Sequence[str]) -> None:
        """Raise :class:`ConfigError` naming every project id the GDC does not know."""
        unknown = []
        for project in projects:
            try:
                body = self._call(
                    "GET",
                    f"projects/{project}",
                    f"GDC project {project}",
                    params={"fields": "project_id"},
                )
            except DownloadError as exc:
                if exc.status != 404:
                    raise
                unknown.append(project)
                continue
            found = (body or {}).get("data") or {}
            if found.get("project_id") not in (None, project) or not found:
                unknown.append(project)
        if unknown:
            raise ConfigError(
                f"unknown GDC project(s) {unknown} (asked {self.url}/projects/<id> for "
                f"{list(projects)}). Fix: use GDC project ids such as TCGA-BRCA, TCGA-LUAD "
                f"(program-CODE, upper case); the list is at {self.url}/projects?size=100&"
                "fields=project_id,name"
            )

    def hits(
        self, endpoint: str, filters: Mapping[str, Any], fields: Sequence[str], sort: str
    ) -> list[dict[str, Any]]:
        """Every hit of a search, page by page (``from``/``size``, ``pagination.total``)."""
        out: list[dict[str, Any]] = []
        offset, total = 0, None
        while total is None or offset < total:
            payload = {
                "filters": filters,
                "fields": ",".join(fields),
                "format": "JSON",
                "size": self.page_size,
                "from": offset,
                "sort": sort,
            }
            body = self._call("POST", endpoint, f"GDC /{endpoint} search", json=payload)
            try:
                data = body["data"]
                page = list(data["hits"])
                total = int(data["pagination"]["total"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DownloadError(
                    f"GDC /{endpoint} answered without data.hits and data.pagination.total "
                    f"({str(body)[:160]}). Fix: check the API address (--api-url or "
                    f"{API_URL_ENV})."
                ) from exc
            out.extend(page)
            offset += len(page)
            if not page:
                break
        if total is not None and len(out) < total:
            raise DownloadError(
                f"GDC /{endpoint} promised {total} hits but paging stopped after {len(out)}. "
                "Fix: run the command again (the index may have been updating)."
            )
        return out

    def search_files(self, query: GDCQuery) -> list[GDCFile]:
        """The files of ``query`` (all pages), sorted by file id for stable output."""
        hits = self.hits("files", query.filters(), _FILE_FIELDS, sort="file_id:asc")
        return sorted((GDCFile.from_hit(h) for h in hits), key=lambda f: f.file_id)

    def cases(self, projects: Sequence[str]) -> list[dict[str, Any]]:
        """The clinical records (survival fields) of every case of ``projects``."""
        filters = {"op": "and", "content": [_in("project.project_id", projects)]}
        return self.hits("cases", filters, _CASE_FIELDS, sort="submitter_id:asc")

    def data_url(self, file_id: str) -> str:
        """Where the bytes of ``file_id`` are served."""
        return f"{self.url}/data/{file_id}"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class GDCPlan:
    """What a download would fetch: the files (one per sample) and what was left out."""

    query: GDCQuery
    files: tuple[GDCFile, ...]
    n_found: int
    duplicates: tuple[GDCFile, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.file_size or 0 for f in self.files)

    @property
    def controlled(self) -> tuple[GDCFile, ...]:
        return tuple(f for f in self.files if f.access != "open")

    @property
    def per_project(self) -> dict[str, int]:
        return dict(sorted(Counter(f.project_id for f in self.files).items()))

    @property
    def case_ids(self) -> list[str]:
        return sorted({c.strip() for f in self.files for c in f.case_id.split(",") if c.strip()})


def plan_download(query: GDCQuery, client: GDCClient) -> GDCPlan:
    """Check the projects, list the files, keep one file per sample.

    A sample sequenced more than once has several files; the GDC reader needs one row
    per sample, so the file with the smallest file id is kept (a fixed, documented rule)
    and the others are listed in :attr:`GDCPlan.duplicates`.
    """
    client.check_projects(query.projects)
    files = client.search_files(query)
    if not files:
        raise InputFileError(
            f"the GDC has no file for {query.describe()} (at {client.url}/files). Fix: check "
            "the spelling of --data-type and --workflow-type (e.g. 'Gene Expression "
            "Quantification' and 'STAR - Counts') and of --sample-types (GDC names such as "
            "'Primary Tumor', 'Solid Tissue Normal'), or drop --sample-types."
        )
    kept: dict[str, GDCFile] = {}
    duplicates: list[GDCFile] = []
    for f in files:  # sorted by file id: the first one seen is kept
        key = f.sample_id or f.file_id
        if key in kept:
            duplicates.append(f)
        else:
            kept[key] = f
    if duplicates:
        logger.warning(
            "%d sample(s) have more than one file; kept the one with the smallest file id "
            "and left out %d file(s) (e.g. %s)",
            len({d.sample_id for d in duplicates}),
            len(duplicates),
            [d.file_name for d in duplicates[:3]],
        )
    return GDCPlan(query, tuple(kept.values()), n_found=len(files), duplicates=tuple(duplicates))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_plan(plan: GDCPlan) -> str:
    """The plan as text: files and samples per project, total size, access."""
    lines = [f"GDC query: {plan.query.describe()}"]
    for project, n in plan.per_project.items():
        size = sum(f.file_size or 0 for f in plan.files if f.project_id == project)
        lines.append(f"  {project}: {n} files, {_size(size)}")
    lines.append(
        f"total: {len(plan.files)} files ({len(plan.case_ids)} cases), "
        f"{_size(plan.total_bytes)} ({plan.total_bytes} bytes)"
    )
    if plan.duplicates:
        lines.append(
            f"left out: {len(plan.duplicates)} extra file(s) of samples that have several "
            "(kept the smallest file id per sample)"
        )
    if plan.controlled:
        lines.append(f"controlled access: {len(plan.controlled)} file(s) need --token-file")
    return "\n".join(lines)


# --------------------------------------------------------------------------- clinical


def _numbers(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(x):
            out.append(x)
    return out


def clinical_table(cases: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Survival per patient from GDC ``/cases`` records, in TCGA-CDR columns.

    Columns: ``bcr_patient_barcode``, ``type`` (project id without ``TCGA-``, matching
    the cohort the GDC reader gives), ``vital_status``, ``days_to_death``,
    ``days_to_last_follow_up``, ``OS`` (1 dead, 0 alive) and ``OS.time`` (days; see the
    module doc for the rule). Unknown values are NaN.
    """
    rows = []
    n_negative = 0
    for case in cases:
        demo = case.get("demographic") or {}
        diagnoses = case.get("diagnoses") or []
        follow_ups = case.get("follow_ups") or []
        status = str(demo.get("vital_status") or "").strip()
        death = _numbers([demo.get("days_to_death")])
        follow = _numbers(d.get("days_to_last_follow_up") for d in diagnoses) + _numbers(
            f.get("days_to_follow_up") for f in follow_ups
        )
        event = {"dead": 1.0, "alive": 0.0}.get(status.lower(), np.nan)
        if event == 1.0:
            time = death[0] if death else np.nan
        elif event == 0.0:
            time = max(follow) if follow else np.nan
        else:
            time = np.nan
        if np.isfinite(time) and time < 0:
            n_negative += 1
            time = np.nan
        project = str((case.get("project") or {}).get("project_id") or "")
        rows.append(
            {
                "bcr_patient_barcode": str(case.get("submitter_id") or ""),
                "type": project.removeprefix("TCGA-"),
                "vital_status": status or np.nan,
                "days_to_death": death[0] if death else np.nan,
                "days_to_last_follow_up": max(follow) if follow else np.nan,
                "OS": event,
                "OS.time": time,
            }
        )
    if n_negative:
        logger.warning(
            "%d GDC case(s) have a negative survival time; left unknown (NA)", n_negative
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "bcr_patient_barcode",
            "type",
            "vital_status",
            "days_to_death",
            "days_to_last_follow_up",
            "OS",
            "OS.time",
        ],
    )
    return table.drop_duplicates("bcr_patient_barcode").reset_index(drop=True)


def _cdr_rows(path: str | os.PathLike, case_ids: Sequence[str]) -> pd.DataFrame:
    """The rows of a TCGA-CDR (or any survival) table for ``case_ids``, all columns."""
    survival = read_survival_table(path)  # validates the table (ids, OS, OS.time)
    id_column = survival.attrs["bulkfm_survival"]["id_column"]
    first = _first_line(Path(path))
    sep = "\t" if first.count("\t") >= first.count(",") else ","
    raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    wanted = {c.upper() for c in case_ids}
    keep = raw[id_column].astype(str).str.strip().str.upper().isin(wanted)
    if not keep.any():
        raise InputFileError(
            f"--clinical-table {path} has no row for the {len(case_ids)} downloaded cases "
            f"(ids like {list(case_ids[:3])}; its {id_column!r} values look like "
            f"{raw[id_column].head(3).tolist()}). Fix: pass the TCGA-CDR table, or leave "
            "--clinical-table out to take survival from the GDC."
        )
    return raw[keep].reset_index(drop=True)


def _first_line(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return str(fh.readline())


# --------------------------------------------------------------------------- download


@dataclass(frozen=True)
class GDCDownload:
    """Where a finished download put things, and what each file's transfer did."""

    out_dir: Path
    sample_sheet: Path
    manifest: Path
    clinical: Path | None
    results: tuple[DownloadResult, ...] = field(default=())

    def counts(self) -> dict[str, int]:
        """Files per status (downloaded, resumed, skipped)."""
        return dict(Counter(r.status for r in self.results))

    @property
    def n_bytes(self) -> int:
        return sum(r.n_bytes for r in self.results)


def _sample_sheet_text(files: Sequence[GDCFile]) -> str:
    table = pd.DataFrame([f.row() for f in files], columns=list(SAMPLE_SHEET_COLUMNS))
    return str(table.to_csv(sep="\t", index=False))


def _manifest_text(files: Sequence[GDCFile]) -> str:
    lines = ["id\tfilename\tmd5\tsize\tstate"]
    for f in files:
        size = "" if f.file_size is None else str(f.file_size)
        lines.append(f"{f.file_id}\t{f.file_name}\t{f.md5sum or ''}\t{size}\treleased")
    return "\n".join(lines) + "\n"


def check_access(plan: GDCPlan, token: str | None) -> None:
    """Refuse controlled-access files without a token, before anything is fetched."""
    if plan.controlled and not token:
        examples = [f.file_name for f in plan.controlled[:3]]
        raise DownloadError(
            f"{len(plan.controlled)} of {len(plan.files)} files are controlled-access "
            f"(e.g. {examples}), and no token was given. Fix: {_TOKEN_HINT}; or narrow the "
            "query to open-access data (STAR - Counts is open).",
            status=403,
        )


def download_gdc(
    plan: GDCPlan,
    out_dir: str | os.PathLike,
    client: GDCClient,
    *,
    workers: int = 4,
    clinical: bool = True,
    clinical_table_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> GDCDownload:
    """Fetch the files of ``plan`` into ``out_dir`` and write the sample sheet, the
    manifest and (with ``clinical``) the survival table. Re-running resumes: complete
    files are verified by md5 and skipped, partial ones continue where they stopped."""
    check_access(plan, client.token)
    with output_dir(out_dir, flag="--output") as out:
        sheet = write_text(_sample_sheet_text(plan.files), out / SAMPLE_SHEET_FILE)
        manifest = write_text(_manifest_text(plan.files), out / MANIFEST_FILE)
        clinical_path = None
        if clinical_table_path is not None:
            rows = _cdr_rows(clinical_table_path, plan.case_ids)
            clinical_path = write_text(str(rows.to_csv(sep="\t", index=False)), out / CLINICAL_FILE)
            logger.info("clinical: %d rows of %s", len(rows), clinical_table_path)
        elif clinical:
            table = clinical_table(client.cases(plan.query.projects))
            clinical_path = write_text(
                str(table.to_csv(sep="\t", index=False, na_rep="NA")), out / CLINICAL_FILE
            )
        items = [
            DownloadItem(
                client.data_url(f.file_id),
                out / f.file_id / f.file_name,
                md5=f.md5sum,
                size=f.file_size,
            )
            for f in plan.files
        ]
        results = download_many(
            items,
            workers=workers,
            headers=client.headers,
            retry=client.retry,
            progress=progress,
            timeout=client.timeout,
            auth_hint=_TOKEN_HINT,
            not_found_hint="the file may have been withdrawn from the GDC; run --dry-run to "
            "list the current files",
            desc="GDC",
        )
    return GDCDownload(out, sheet, manifest, clinical_path, tuple(results))
