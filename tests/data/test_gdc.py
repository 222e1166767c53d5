"""``bulkfm data download`` against a local server that answers like the GDC API.

The fake GDC (127.0.0.1, a free port) serves ``/projects/{id}``, ``/files`` and
``/cases`` (POST, filters, ``from``/``size`` paging, ``data.hits`` +
``data.pagination``) and ``/data/{file_id}`` (byte ranges), in the shapes of the GDC
API's documentation; each test scripts its faults. Expected values are written down
from the files the test made, not computed by the code under test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from bulkfm.cli import main
from bulkfm.data.clinical import read_survival_table
from bulkfm.data.download import RetryPolicy, part_path
from bulkfm.data.gdc import (
    SAMPLE_SHEET_COLUMNS,
    GDCClient,
    GDCQuery,
    api_url,
    clinical_table,
    download_gdc,
    format_plan,
    plan_download,
    read_token,
)
from bulkfm.errors import ConfigError, DownloadError, InputFileError
from tests.data.local_http import Reply, Request, local_server, serve_bytes

GENES = ["ENSG00000000003.15", "ENSG00000000005.6", "ENSG00000000419.13", "ENSG00000000457.14"]
SYMBOLS = ["TSPAN6", "TNMD", "DPM1", "SCYL3"]
HEADER = (
    "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\t"
    "tpm_unstranded\tfpkm_unstranded\tfpkm_uq_unstranded"
)


def star_counts(tpm: list[float]) -> bytes:
    """A GDC STAR - Counts file: comment line, header, four N_ rows, then genes."""
    lines = ["# gene-model: GENCODE v36", HEADER]
    lines += [f"{n}\t\t\t{k}\t{k}\t{k}\t\t\t" for n, k in (("N_unmapped", 9), ("N_ambiguous", 3))]
    lines += [f"{n}\t\t\t1\t1\t1\t\t\t" for n in ("N_multimapping", "N_noFeature")]
    for g, s, t in zip(GENES, SYMBOLS, tpm, strict=True):
        lines.append(f"{g}\t{s}\tprotein_coding\t{int(t * 10)}\t0\t{int(t * 10)}\t{t}\t1.0\t1.0")
    return ("\n".join(lines) + "\n").encode()


@dataclass
class FakeFile:
    file_id: str
    project: str
    case: str
    sample: str
    sample_type: str
    tpm: list[float]
    access: str = "open"
    md5: str | None = None  # what the index claims; None: the true md5

    @property
    def name(self) -> str:
        return f"{self.file_id}.rna_seq.augmented_star_gene_counts.tsv"

    @property
    def content(self) -> bytes:
        return star_counts(self.tpm)

    def hit(self) -> dict[str, Any]:
        return {
            "id": self.file_id,
            "file_id": self.file_id,
            "file_name": self.name,
            "md5sum": self.md5 or hashlib.md5(self.content).hexdigest(),
            "file_size": len(self.content),
            "access": self.access,
            "state": "released",
            "data_category": "Transcriptome Profiling",
            "data_type": "Gene Expression Quantification",
            "analysis": {"workflow_type": "STAR - Counts"},
            "cases": [
                {
                    "case_id": f"uuid-{self.case}",
                    "submitter_id": self.case,
                    "project": {"project_id": self.project},
                    "samples": [{"submitter_id": self.sample, "sample_type": self.sample_type}],
                }
            ],
        }


CASES = [
    {
        "submitter_id": "TCGA-A1-0001",
        "project": {"project_id": "TCGA-BRCA"},
        "demographic": {"vital_status": "Dead", "days_to_death": 400},
        "diagnoses": [{"days_to_last_follow_up": 120}],
    },
    {
        "submitter_id": "TCGA-A1-0002",
        "project": {"project_id": "TCGA-BRCA"},
        "demographic": {"vital_status": "Alive", "days_to_death": None},
        "diagnoses": [{"days_to_last_follow_up": 100}, {"days_to_last_follow_up": 250}],
        "follow_ups": [{"days_to_follow_up": 300}, {"days_to_follow_up": None}],
    },
    {
        "submitter_id": "TCGA-B2-0003",
        "project": {"project_id": "TCGA-LUAD"},
        "demographic": {"vital_status": "Alive"},
        "diagnoses": [{"days_to_last_follow_up": 812}],
    },
    {
        "submitter_id": "TCGA-B2-0004",
        "project": {"project_id": "TCGA-LUAD"},
        "demographic": {"vital_status": "Not Reported"},
        "diagnoses": [{"days_to_last_follow_up": 50}],
    },
    {
        "submitter_id": "TCGA-B2-0005",
        "project": {"project_id": "TCGA-LUAD"},
        "demographic": {"vital_status": "Dead", "days_to_death": None},
    },
]


def _tpm(*weights: float) -> list[float]:
    """TPM values summing to a million, with fractions (so they cannot pass as counts)."""
    w = np.asarray(weights, dtype=float) + 0.37
    return [round(float(v), 3) for v in w / w.sum() * 1e6]


def _file(fid: str, project: str, sample: str, kind: str, *weights: float) -> FakeFile:
    return FakeFile(fid, project, sample[:12], sample, kind, _tpm(*weights))


TUMOUR, NORMAL = "Primary Tumor", "Solid Tissue Normal"


def _files() -> list[FakeFile]:
    return [
        _file("f01", "TCGA-BRCA", "TCGA-A1-0001-01A", TUMOUR, 1, 2, 3, 4),
        _file("f02", "TCGA-BRCA", "TCGA-A1-0002-01A", TUMOUR, 5, 6, 7, 8),
        _file("f03", "TCGA-BRCA", "TCGA-A1-0001-11A", NORMAL, 9, 1, 1, 1),
        # a second aliquot of TCGA-A1-0002-01A: left out, f02 (smaller id) is kept
        _file("f04", "TCGA-BRCA", "TCGA-A1-0002-01A", TUMOUR, 0, 0, 1, 1),
        _file("f05", "TCGA-LUAD", "TCGA-B2-0003-01A", TUMOUR, 2, 2, 2, 2),
        _file("f06", "TCGA-LUAD", "TCGA-B2-0004-01A", TUMOUR, 3, 1, 4, 1),
    ]


def _values(record: Any, path: list[str]) -> list[Any]:
    """Leaf values at a dotted path through nested dicts and lists (GDC field semantics)."""
    if isinstance(record, list):
        return [v for item in record for v in _values(item, path)]
    if not path:
        return [record]
    if not isinstance(record, dict) or path[0] not in record:
        return []
    return _values(record[path[0]], path[1:])


def _matches(record: dict[str, Any], flt: dict[str, Any], prefix: str) -> bool:
    if flt["op"] == "and":
        return all(_matches(record, c, prefix) for c in flt["content"])
    name = flt["content"]["field"].removeprefix(prefix)
    found = _values(record, name.split("."))
    wanted = flt["content"]["value"]
    wanted = wanted if isinstance(wanted, list) else [wanted]
    return any(v in wanted for v in found)


@dataclass
class FakeGDC:
    """The GDC API, in miniature. ``faults[path]`` scripts the first answers to a path."""

    files: list[FakeFile] = field(default_factory=_files)
    cases: list[dict[str, Any]] = field(default_factory=lambda: list(CASES))
    token: str = "secret-token"
    faults: dict[str, list[str]] = field(default_factory=dict)
    serve: dict[str, bytes] = field(default_factory=dict)  # content overrides per file id

    def app(self, request: Request) -> Reply:
        script = self.faults.get(request.path)
        fault = script.pop(0) if script else None
        if fault == "429":
            return Reply.json({"message": "Too many requests"}, 429, **{"Retry-After": "3"})
        if fault == "500":
            return Reply.json({"message": "internal error"}, 500)
        parts = request.path.strip("/").split("/")
        if parts[0] == "projects":
            known = {f.project for f in self.files}
            if parts[1] not in known:
                return Reply.json({"message": f"No project found with id {parts[1]}"}, 404)
            return Reply.json({"data": {"project_id": parts[1]}, "warnings": {}})
        if parts[0] in ("files", "cases") and request.method == "POST":
            payload = request.json()
            if parts[0] == "files":
                records = [f.hit() for f in sorted(self.files, key=lambda f: f.file_id)]
                prefix = "files."
            else:
                records = sorted(self.cases, key=lambda c: c["submitter_id"])
                prefix = "cases."
            hits = [r for r in records if _matches(r, payload["filters"], prefix)]
            start, size = int(payload["from"]), int(payload["size"])
            page = hits[start : start + size]
            pages = -(-len(hits) // size) if hits else 0
            pagination = {
                "count": len(page),
                "total": len(hits),
                "size": size,
                "from": start,
                "sort": payload.get("sort", ""),
                "page": start // size + 1,
                "pages": pages,
            }
            return Reply.json({"data": {"hits": page, "pagination": pagination}, "warnings": {}})
        if parts[0] == "data":
            file = next((f for f in self.files if f.file_id == parts[1]), None)
            if file is None:
                return Reply.json({"message": "not found"}, 404)
            if file.access != "open" and request.headers.get("x-auth-token") != self.token:
                return Reply.json({"message": "You do not have access to this file"}, 403)
            data = self.serve.get(file.file_id, file.content)
            return serve_bytes(data, request, drop_after=40 if fault == "drop" else None)
        return Reply.json({"message": "unknown endpoint"}, 404)


def _client(server, waits: list[float] | None = None, **kw: Any) -> GDCClient:
    sleep = waits.append if waits is not None else (lambda s: None)
    retry = RetryPolicy(attempts=3, backoff_s=0.25, sleep=sleep)
    return GDCClient(server.url, retry=retry, **kw)


QUERY = GDCQuery(projects=("TCGA-BRCA", "TCGA-LUAD"))


def test_happy_path_two_projects_paging_and_build(tmp_path: Path) -> None:
    gdc = FakeGDC()
    out = tmp_path / "gdc"
    with local_server(gdc.app) as server:
        client = _client(server, page_size=2)
        plan = plan_download(QUERY, client)
        done = download_gdc(plan, out, client, workers=2, progress=False)
    file_searches = [r.json() for r in server.log if r.path == "/files"]
    assert [p["from"] for p in file_searches] == [0, 2, 4]  # 6 hits, 2 per page
    assert file_searches[0]["filters"]["content"][0]["content"]["value"] == list(QUERY.projects)
    assert [f.file_id for f in plan.files] == ["f01", "f02", "f03", "f05", "f06"]
    assert [f.file_id for f in plan.duplicates] == ["f04"]
    assert done.counts() == {"downloaded": 5}
    for f in _files():
        path = out / f.file_id / f.name
        assert path.exists() == (f.file_id != "f04")
        if path.exists():
            assert path.read_bytes() == f.content
    sheet = pd.read_csv(done.sample_sheet, sep="\t", dtype=str)
    assert list(sheet.columns) == list(SAMPLE_SHEET_COLUMNS)
    assert sheet.loc[0].to_dict() == {
        "File ID": "f01",
        "File Name": "f01.rna_seq.augmented_star_gene_counts.tsv",
        "Data Category": "Transcriptome Profiling",
        "Data Type": "Gene Expression Quantification",
        "Project ID": "TCGA-BRCA",
        "Case ID": "TCGA-A1-0001",
        "Sample ID": "TCGA-A1-0001-01A",
        "Sample Type": "Primary Tumor",
    }
    manifest = pd.read_csv(done.manifest, sep="\t", dtype=str)
    assert list(manifest.columns) == ["id", "filename", "md5", "size", "state"]

    # what `bulkfm data build` makes of it, exactly as the CLI prints the next step
    h5ad = tmp_path / "tcga.h5ad"
    argv = ["data", "build", str(out), "--sample-sheet", str(done.sample_sheet)]
    argv += ["--survival", str(done.clinical), "-o", str(h5ad)]
    assert main(argv) == 0
    adata = ad.read_h5ad(h5ad)
    by_sample = {f.sample: f for f in _files() if f.file_id != "f04"}
    assert sorted(adata.obs_names) == sorted(by_sample)
    assert (
        dict(zip(adata.obs_names, adata.obs["cohort"], strict=True))["TCGA-B2-0003-01A"] == "LUAD"
    )
    genes = [g.split(".")[0] for g in GENES]
    for sample, f in by_sample.items():
        row = adata[sample, genes].X
        row = row.toarray() if hasattr(row, "toarray") else np.asarray(row)
        np.testing.assert_allclose(row.ravel(), f.tpm, rtol=1e-6)
    obs = adata.obs
    assert obs.loc["TCGA-A1-0001-01A", "survival_time"] == 400.0
    assert obs.loc["TCGA-A1-0001-01A", "survival_event"] == 1.0
    assert obs.loc["TCGA-A1-0001-11A", "survival_time"] == 400.0  # survival is the patient's
    assert obs.loc["TCGA-A1-0002-01A", "survival_time"] == 300.0
    assert obs.loc["TCGA-A1-0002-01A", "survival_event"] == 0.0
    assert np.isnan(obs.loc["TCGA-B2-0004-01A", "survival_time"])  # vital status unknown


def test_cli_dry_run_prints_counts_and_size_and_writes_nothing(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    gdc = FakeGDC()
    out = tmp_path / "never"
    with local_server(gdc.app) as server:
        monkeypatch.setenv("BULKFM_GDC_URL", server.url)
        argv = ["data", "download", "-o", str(out), "--project", "TCGA-BRCA,TCGA-LUAD"]
        assert main([*argv, "--sample-types", "Primary Tumor", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    sizes = {f.file_id: len(f.content) for f in _files()}
    brca = sizes["f01"] + sizes["f02"]  # f04 is a second file of f02's sample; f03 a normal
    luad = sizes["f05"] + sizes["f06"]
    assert "TCGA-BRCA: 2 files" in printed and "TCGA-LUAD: 2 files" in printed
    assert f"({brca + luad} bytes)" in printed
    assert "left out: 1 extra file" in printed
    assert "dry run: nothing downloaded or written" in printed
    assert not out.exists()
    assert not [r for r in server.log if r.path.startswith("/data") or r.path == "/cases"]


def test_resume_after_a_killed_download_and_skip_complete_files(tmp_path: Path, capsys) -> None:
    gdc = FakeGDC(faults={"/data/f03": ["drop"]})
    out = tmp_path / "gdc"
    with local_server(gdc.app) as server:
        argv = ["data", "download", "-o", str(out), "--project", "TCGA-BRCA"]
        argv += ["--api-url", server.url, "--workers", "1", "--no-clinical"]
        assert main([*argv, "--retries", "0"]) == 1  # the connection broke mid-file
        assert "gave up after 1 attempt" in capsys.readouterr().err
        f03 = out / "f03" / "f03.rna_seq.augmented_star_gene_counts.tsv"
        assert not f03.exists() and part_path(f03).stat().st_size == 40
        first_run = len(server.log)
        assert main(argv) == 0
    second = [r for r in server.log[first_run:] if r.path.startswith("/data")]
    # f01 and f02 were complete: verified by md5 and not fetched; f03 resumed at byte 40
    assert [(r.path, r.headers.get("range")) for r in second] == [("/data/f03", "bytes=40-")]
    assert f03.read_bytes() == _files()[2].content and not part_path(f03).exists()
    printed = capsys.readouterr().out
    assert "1 resumed, 2 skipped" in printed


def test_corrupted_file_is_caught_by_md5(tmp_path: Path, capsys) -> None:
    good = _files()[1].content
    assert good.endswith(b"\t1.0\n")
    # same size, one value changed in transit: only the md5 can tell
    gdc = FakeGDC(serve={"f02": good[:-4] + b"1.9\n"})
    out = tmp_path / "gdc"
    with local_server(gdc.app) as server:
        argv = ["data", "download", "-o", str(out), "--project", "TCGA-BRCA"]
        assert main([*argv, "--api-url", server.url, "--no-clinical"]) == 1
    err = capsys.readouterr().err
    assert "DownloadError" in err and "f02.rna_seq.augmented_star_gene_counts.tsv" in err
    assert "its md5 is" in err and hashlib.md5(good).hexdigest() in err
    bad = out / "f02" / "f02.rna_seq.augmented_star_gene_counts.tsv"
    assert not bad.exists() and not part_path(bad).exists()


def test_429_then_success_honours_retry_after(tmp_path: Path) -> None:
    gdc = FakeGDC(faults={"/files": ["429"], "/data/f05": ["429", "500"]})
    waits: list[float] = []
    with local_server(gdc.app) as server:
        client = _client(server, waits)
        plan = plan_download(GDCQuery(projects=("TCGA-LUAD",)), client)
        done = download_gdc(plan, tmp_path / "o", client, workers=1, clinical=False)
    assert waits == [3.0, 3.0, 0.5]  # Retry-After: 3 twice, then back-off 0.25 * 2**1
    assert done.counts() == {"downloaded": 2}
    assert [r.path for r in server.log].count("/data/f05") == 3


def test_retries_are_bounded(tmp_path: Path) -> None:
    gdc = FakeGDC(faults={"/files": ["500"] * 5})
    with (
        local_server(gdc.app) as server,
        pytest.raises(DownloadError, match=r"gave up after 3 attempt.*HTTP 500"),
    ):
        plan_download(QUERY, _client(server))
    assert [r.path for r in server.log].count("/files") == 3


def test_unknown_project_names_it_and_the_projects_query(tmp_path: Path) -> None:
    with local_server(FakeGDC().app) as server:
        query = GDCQuery(projects=("TCGA-BRCA", "TCGA-NOPE"))
        with pytest.raises(ConfigError, match=r"unknown GDC project\(s\) \['TCGA-NOPE'\]") as err:
            plan_download(query, _client(server))
    assert f"{server.url}/projects" in str(err.value) and "TCGA-BRCA" in str(err.value)
    assert "/files" not in server.paths()


def test_controlled_access_needs_a_token(tmp_path: Path, capsys) -> None:
    files = _files()
    files[4].access = "controlled"
    gdc = FakeGDC(files=files)
    out = tmp_path / "gdc"
    with local_server(gdc.app) as server:
        argv = ["data", "download", "-o", str(out), "--project", "TCGA-LUAD"]
        argv += ["--api-url", server.url, "--no-clinical"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "1 of 2 files are controlled-access" in err and "--token-file" in err
        assert not server.paths("/data")  # refused before any transfer

        wrong = tmp_path / "wrong.txt"
        wrong.write_text("expired\n")
        assert main([*argv, "--token-file", str(wrong)]) == 1
        err = capsys.readouterr().err
        assert "access denied (HTTP 403)" in err and "--token-file" in err

        token = tmp_path / "token.txt"
        token.write_text(gdc.token + "\n")
        assert main([*argv, "--token-file", str(token)]) == 0
    sent = [r.headers.get("x-auth-token") for r in server.log if r.path == "/data/f05"]
    assert sent[-1] == gdc.token
    assert (out / "f05" / files[4].name).read_bytes() == files[4].content


def test_empty_result_set_says_which_query(tmp_path: Path) -> None:
    with local_server(FakeGDC().app) as server:
        query = GDCQuery(projects=("TCGA-LUAD",), sample_types=("Metastatic",))
        with pytest.raises(InputFileError, match="the GDC has no file for") as err:
            plan_download(query, _client(server))
    assert "--sample-types 'Metastatic'" in str(err.value) and "--project TCGA-LUAD" in str(
        err.value
    )


def test_clinical_table_follows_the_documented_rule() -> None:
    table = clinical_table(CASES).set_index("bcr_patient_barcode")
    expected = {  # (OS, OS.time) worked out by hand from CASES
        "TCGA-A1-0001": (1.0, 400.0),  # dead: days to death, not the follow-up
        "TCGA-A1-0002": (0.0, 300.0),  # alive: latest of all follow-ups
        "TCGA-B2-0003": (0.0, 812.0),
        "TCGA-B2-0004": (np.nan, np.nan),  # vital status not reported
        "TCGA-B2-0005": (1.0, np.nan),  # dead without a date
    }
    for patient, (event, time) in expected.items():
        np.testing.assert_equal(
            table.loc[patient, ["OS", "OS.time"]].to_numpy(float), [event, time]
        )
    assert table.loc["TCGA-B2-0003", "type"] == "LUAD"
    negative = [{**CASES[2], "diagnoses": [{"days_to_last_follow_up": -5}]}]
    assert np.isnan(clinical_table(negative)["OS.time"].iloc[0])


def test_given_cdr_table_is_subset_to_the_downloaded_patients(tmp_path: Path) -> None:
    cdr = tmp_path / "cdr.tsv"
    pd.DataFrame(
        {
            "bcr_patient_barcode": ["TCGA-B2-0003", "TCGA-B2-0004", "TCGA-ZZ-9999"],
            "type": ["LUAD", "LUAD", "ACC"],
            "OS": ["0", "1", "1"],
            "OS.time": ["900", "30", "10"],
            "PFI": ["1", "1", "0"],
            "PFI.time": ["200", "30", "10"],
        }
    ).to_csv(cdr, sep="\t", index=False)
    with local_server(FakeGDC().app) as server:
        client = _client(server)
        plan = plan_download(GDCQuery(projects=("TCGA-LUAD",)), client)
        done = download_gdc(plan, tmp_path / "o", client, clinical_table_path=cdr, progress=False)
    assert "/cases" not in server.paths()
    assert done.clinical is not None
    written = pd.read_csv(done.clinical, sep="\t", dtype=str)
    assert list(written["bcr_patient_barcode"]) == ["TCGA-B2-0003", "TCGA-B2-0004"]
    assert read_survival_table(done.clinical, endpoint="PFI")["time"].tolist() == [200.0, 30.0]


def test_api_url_and_token_checks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("BULKFM_GDC_URL", raising=False)
    assert api_url() == "https://api.gdc.cancer.gov"
    monkeypatch.setenv("BULKFM_GDC_URL", "http://127.0.0.1:9/")
    assert api_url() == "http://127.0.0.1:9"
    assert api_url("http://x") == "http://x"
    with pytest.raises(ConfigError, match="BULKFM_GDC_URL"):
        monkeypatch.setenv("BULKFM_GDC_URL", "ftp://x")
        api_url()
    with pytest.raises(InputFileError, match="--token-file"):
        read_token(tmp_path / "none")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InputFileError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--project"):
        GDCQuery(projects=())
    assert "TCGA-BRCA: 2 files" in format_plan(
        _offline_plan([f for f in _files() if f.project == "TCGA-BRCA"][:2])
    )


def _offline_plan(files: list[FakeFile]):
    from bulkfm.data.gdc import GDCFile, GDCPlan

    flat = tuple(GDCFile.from_hit(f.hit()) for f in files)
    return GDCPlan(GDCQuery(projects=("TCGA-BRCA",)), flat, n_found=len(flat))
