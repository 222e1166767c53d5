"""Hub loading and publishing, with no network: a cache laid out as huggingface_hub lays it
out, and a local HTTP server on 127.0.0.1 that answers the Hub endpoints snapshot_download
calls (``/api/models/{repo}/revision/{rev}``, ``/api/models/{repo}/tree/{rev}[/{path}]``,
``HEAD``/``GET /{repo}/resolve/{rev}/{file}``) with the Hub's headers and error codes.

The reference for every embedding is the same tiny checkpoint loaded from a plain local
folder with its genes and factor passed by hand, the path that existed before the Hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from bulkfm.errors import CheckpointError, ConfigError, DownloadError
from bulkfm.models.config import OFFICIAL_CONFIG_FIELDS
from bulkfm.models.hub import (
    PUSH_FILES,
    HubSpec,
    local_or_spec,
    push_to_hub,
    save_pretrained,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "InstaDeepAI/BulkRNABert"
FACTOR = 5.547176906585117
COMMIT_OLD, COMMIT_MAIN = "a" * 40, "b" * 40
N_GENES = 32


# --------------------------------------------------------------------------- repo contents


def _genes(adata: Any) -> list[str]:
    return list(map(str, adata.var_names[:N_GENES]))


def official_files(genes: list[str], seed: int) -> dict[str, bytes]:
    """A tiny checkpoint in the official repo's layout (no tokenizer.json; genes as the
    header of data/tcga_sample.csv), plus the files a loader must never fetch."""
    import torch
    from safetensors.torch import save

    from bulkfm.models.bulkrnabert import BulkRNABert

    torch.manual_seed(seed)
    model = BulkRNABert(tiny_config(n_genes=N_GENES))
    config = {k: v for k, v in model.config.to_dict().items() if k in OFFICIAL_CONFIG_FIELDS} | {
        "architectures": ["BulkRNABert"],
        "model_type": "BulkRNABert",
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    row = ",".join(["TCGA-00-0000-01A", *("1.5" for _ in genes)])
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(state),
        "data/tcga_sample.csv": (",".join(["identifier", *genes]) + "\n" + row + "\n").encode(),
        "jax_params/params.joblib": b"not to be fetched",
        "bulkrnabert.py": b"raise SystemExit('remote code must not be fetched')",
        "README.md": b"---\nlibrary_name: transformers\n---\n# BulkRNABert\n",
    }


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_hf_cache(cache: Path, repo_id: str, commits: dict[str, dict[str, bytes]]) -> None:
    """models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main},
    as huggingface_hub writes it; refs/main points at the last commit given."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in commits.items():
        for rel, data in files.items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(list(commits)[-1])


def reference(files: dict[str, bytes], tmp: Path, genes: list[str]) -> tuple[Any, Any]:
    """The checkpoint loaded from a local folder with genes and factor given by hand."""
    from bulkfm.models.bulkrnabert import load_pretrained

    folder = write_folder(tmp, {k: files[k] for k in ("config.json", "model.safetensors")})
    return load_pretrained(folder, genes=genes, normalization_factor=FACTOR)


def same_weights(a: Any, b: Any) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- a local Hub


class FakeHub:
    """The Hub's model endpoints over repos held in memory, on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

            def do_GET(self) -> None:
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo_id: str, files: dict[str, bytes], commit: str = COMMIT_MAIN, **kw: Any):
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "error": None})
        repo["commits"][commit] = files
        repo["refs"]["main"] = commit
        repo.update(kw)

    def fetched(self) -> set[str]:
        return {
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p in self.requests
            if m == "GET" and "/resolve/" in p
        }

    # -- responses
    def send(self, h: BaseHTTPRequestHandler, code: int, body: bytes, head: bool, **hdr: str):
        h.send_response(code)
        for k, v in hdr.items():
            h.send_header(k.replace("_", "-"), v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def error(self, h: BaseHTTPRequestHandler, code: int, error_code: str, msg: str, head: bool):
        body = json.dumps({"error": msg}).encode()
        self.send(
            h,
            code,
            body,
            head,
            Content_Type="application/json",
            X_Error_Code=error_code,
            X_Error_Message=msg,
        )

    def answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append(("HEAD" if head else "GET", path))
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo_id, kind, rest = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", parts[3:]
        repo = self.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 so as not to reveal private repos
            return self.error(h, 401, "RepoNotFound", "Repository not found", head)
        if repo["error"] is not None:
            return self.error(h, *repo["error"], head)
        if not rest:
            return self.error(h, 404, "EntryNotFound", "no such endpoint", head)
        rev = rest[0]
        commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self.error(h, 404, "RevisionNotFound", "Invalid rev id: " + rev, head)
        files: dict[str, bytes] = repo["commits"][commit]
        sub = "/".join(rest[1:])
        if api and kind == "revision":
            info = {
                "_id": "0" * 24,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2025-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
            return self.send(
                h, 200, json.dumps(info).encode(), head, Content_Type="application/json"
            )
        if api and kind == "tree":
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{sub}/" if sub else ""
            entries: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for p in sorted(files):
                if not p.startswith(prefix):
                    continue
                tail = p[len(prefix) :]
                if "/" in tail and not recursive:
                    dirs.add(prefix + tail.split("/")[0])
                    continue
                entries.append(
                    {"type": "file", "oid": _git_sha(files[p]), "size": len(files[p]), "path": p}
                )
            entries += [
                {"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)
            ]
            if sub and not entries and not dirs:
                return self.error(h, 404, "EntryNotFound", f"{sub} does not exist", head)
            return self.send(
                h, 200, json.dumps(entries).encode(), head, Content_Type="application/json"
            )
        if not api and kind == "resolve":
            if sub not in files:
                return self.error(h, 404, "EntryNotFound", f"{sub} does not exist", head)
            data = files[sub]
            return self.send(
                h,
                200,
                data,
                head,
                Content_Type="application/octet-stream",
                X_Repo_Commit=commit,
                ETag=f'"{_git_sha(data)}"',
            )
        return self.error(h, 404, "EntryNotFound", "no such endpoint", head)


def _git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Hugging Face cache; offline and endpoint left to each test."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; bulkfm reads it at each call
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def hub(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = FakeHub()
    server.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


# --------------------------------------------------------------------------- specs


def test_spec_parsing_and_local_path_wins(tmp_path: Path, monkeypatch) -> None:
    assert HubSpec.parse("InstaDeepAI/BulkRNABert") == HubSpec(REPO)
    assert HubSpec.parse("ctheodoris/Geneformer@v1.0:Geneformer-V1-10M") == HubSpec(
        "ctheodoris/Geneformer", "v1.0", "Geneformer-V1-10M"
    )
    assert str(HubSpec("a/b", "main", "x/y")) == "a/b@main:x/y"
    for not_a_repo in ("ckpt", "a/b/c", "/abs/path", "../up/x", "a b/c"):
        assert HubSpec.parse(not_a_repo) is None, not_a_repo
    monkeypatch.chdir(tmp_path)
    (tmp_path / "InstaDeepAI" / "BulkRNABert").mkdir(parents=True)
    assert local_or_spec(REPO) == Path(REPO)
    with pytest.raises(ConfigError, match="local folder"):
        local_or_spec(REPO, revision="main")
    with pytest.raises(ConfigError, match="two revisions"):
        local_or_spec("x/y@v1", revision="v2")


def test_importing_models_does_not_import_huggingface_hub() -> None:
    import subprocess
    import sys

    code = (
        "import bulkfm.models, bulkfm.models.hub, sys; assert 'huggingface_hub' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- (a) the cache


def test_offline_cache_loads_official_repo_and_pins_revisions(
    sim, hf_env: Path, tmp_path: Path, monkeypatch
) -> None:
    from bulkfm.models.bulkrnabert import load_pretrained

    genes = _genes(sim)
    old, new = official_files(genes, seed=1), official_files(genes, seed=2)
    write_hf_cache(hf_env, REPO, {COMMIT_OLD: old, COMMIT_MAIN: new})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model, tok = load_pretrained(REPO)  # neither genes nor factor given
    ref_new, ref_tok = reference(new, tmp_path / "new", genes)
    assert same_weights(model, ref_new)
    assert tok.genes == genes and tok.normalization_factor == FACTOR
    assert tok.config == ref_tok.config

    ref_old, _ = reference(old, tmp_path / "old", genes)
    pinned, _ = load_pretrained(REPO, revision=COMMIT_OLD)
    assert same_weights(pinned, ref_old) and not same_weights(pinned, ref_new)
    spelled, _ = load_pretrained(f"{REPO}@{COMMIT_OLD}")
    assert same_weights(spelled, ref_old)


def test_offline_without_snapshot_says_go_online_or_pass_a_folder(hf_env, monkeypatch) -> None:
    from bulkfm.models.bulkrnabert import load_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        DownloadError, match=r"HF_HUB_OFFLINE=1.*unset HF_HUB_OFFLINE.*local folder"
    ):
        load_pretrained(REPO)


def test_a_local_folder_wins_over_the_repo_id(sim, hf_env, tmp_path, monkeypatch) -> None:
    from bulkfm.models.bulkrnabert import BulkRNABert, load_pretrained
    from bulkfm.tokenize import BinTokenizer, TokenizerConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and the cache is empty
    tok = BinTokenizer(TokenizerConfig(genes=_genes(sim), normalization_factor=3.0))
    BulkRNABert(tiny_config(n_genes=N_GENES)).save_pretrained(Path(REPO), tok)
    _, loaded = load_pretrained(REPO)
    assert loaded.normalization_factor == 3.0


# --------------------------------------------------------------------------- (b) a local Hub


def test_download_from_the_hub_then_embed_online_and_offline(sim, hub, hf_env, tmp_path) -> None:
    from bulkfm.cli import main as cli_main
    from bulkfm.embed import embed_adata
    from bulkfm.embedders import get_embedder
    from bulkfm.io import write_h5ad

    genes = _genes(sim)
    files = official_files(genes, seed=3)
    hub.add(REPO, files)
    small = sim[:6].copy()
    ref_model, ref_tok = reference(files, tmp_path / "ref", genes)
    expected = embed_adata(ref_model, ref_tok, small, batch_size=4)

    embedder = get_embedder("bulkrnabert", model_dir=REPO, batch_size=4)
    np.testing.assert_allclose(embedder.transform(small), expected, rtol=1e-6)
    assert embedder.describe()["hub"] == {
        "repo_id": REPO,
        "revision": None,
        "commit": COMMIT_MAIN,
        "subfolder": None,
    }
    # only what a model needs: no JAX pickle, no remote code, no card
    assert hub.fetched() == {"config.json", "model.safetensors", "data/tcga_sample.csv"}
    repo_cache = hf_env / "models--InstaDeepAI--BulkRNABert"
    assert (repo_cache / "refs" / "main").read_text() == COMMIT_MAIN
    assert (repo_cache / "snapshots" / COMMIT_MAIN / "model.safetensors").is_symlink()

    # the command line, online, then offline from the cache with the server gone
    write_h5ad(small, tmp_path / "in.h5ad")
    argv = ["embed", "--model", REPO, "--input", str(tmp_path / "in.h5ad")]
    assert cli_main([*argv, "--output", str(tmp_path / "a.npy"), "--batch-size", "4"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, rtol=1e-5)
    hub.server.shutdown()
    os.environ["HF_HUB_OFFLINE"] = "1"  # monkeypatch restores the environment
    n_requests = len(hub.requests)
    assert cli_main([*argv, "--output", str(tmp_path / "b.npy"), "--revision", "main"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected, rtol=1e-5)
    assert len(hub.requests) == n_requests


# --------------------------------------------------------------------------- (d) errors


def test_missing_gated_and_bad_revision_are_clear(sim, hub) -> None:
    from bulkfm.models.bulkrnabert import load_pretrained

    with pytest.raises(DownloadError, match=r"nobody/nothing not found.*local folder"):
        load_pretrained("nobody/nothing")
    hub.add(
        "gated/model", {}, error=(403, "GatedRepo", "Access to model gated/model is restricted")
    )
    with pytest.raises(DownloadError, match=r"gated.*log in") as info:
        load_pretrained("gated/model")
    assert info.value.status == 403
    hub.add(REPO, official_files(_genes(sim), seed=0))
    with pytest.raises(DownloadError, match=r"revision 'v9' not found.*--revision"):
        load_pretrained(REPO, revision="v9")


# --------------------------------------------------------------------------- adapters


def test_geneformer_subfolder_fetches_its_dictionaries_and_no_pickled_weights(hub) -> None:
    from bulkfm.adapters.geneformer import GeneformerEmbedder

    bert = {
        "model_type": "bert",
        "vocab_size": 8,
        "max_position_embeddings": 16,
        "num_hidden_layers": 1,
    }
    v1 = "geneformer/gene_dictionaries_30m"
    tokens = {"<pad>": 0, "<mask>": 1, "ENSG01": 2, "ENSG02": 3}
    medians = {"ENSG01": 1.0, "ENSG02": 2.0}
    files = {
        "Geneformer-V1-10M/config.json": json.dumps(bert).encode(),
        "Geneformer-V1-10M/model.safetensors": b"weights",
        "Geneformer-V1-10M/pytorch_model.bin": b"pickled weights",
        "Geneformer-V1-10M/training_args.bin": b"pickle",
        f"{v1}/token_dictionary_gc30M.pkl": pickle.dumps(tokens),
        f"{v1}/gene_median_dictionary_gc30M.pkl": pickle.dumps(medians),
        "geneformer/token_dictionary_gc104M.pkl": pickle.dumps(tokens),
        "geneformer/gene_median_dictionary_gc104M.pkl": pickle.dumps(medians),
        "Geneformer-V2-104M/model.safetensors": b"another model",
    }
    hub.add("ctheodoris/Geneformer", files)
    model = GeneformerEmbedder("ctheodoris/Geneformer:Geneformer-V1-10M")
    assert model.token_dictionary_path.name == "token_dictionary_gc30M.pkl"
    assert model.gene_median_dictionary_path.parent.name == "gene_dictionaries_30m"
    assert hub.fetched() == {
        "Geneformer-V1-10M/config.json",
        "Geneformer-V1-10M/model.safetensors",
        f"{v1}/token_dictionary_gc30M.pkl",
        f"{v1}/gene_median_dictionary_gc30M.pkl",
    }
    assert model.describe()["hub"]["subfolder"] == "Geneformer-V1-10M"
    with pytest.raises(CheckpointError, match="trust_pickle"):
        _ = model.vocabulary  # the dictionaries are pickles: still behind the opt-in
    with pytest.raises(DownloadError, match=r"no files in Geneformer-V9.*'Geneformer-V1-10M'"):
        GeneformerEmbedder("ctheodoris/Geneformer:Geneformer-V9")


# --------------------------------------------------------------------------- (c) publishing


def test_save_and_push_upload_checkpoint_and_card(sim, hf_env, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from bulkfm.models.bulkrnabert import BulkRNABert, load_pretrained
    from bulkfm.tokenize import BinTokenizer, TokenizerConfig

    calls: dict[str, Any] = {}

    class FakeApi:  # the boundary: what would go over the wire
        def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            calls["create"] = (repo_id, kw)

        def upload_folder(self, *, repo_id: str, folder_path: str, allow_patterns, **kw):
            folder = Path(folder_path)
            calls["uploaded"] = {
                p.name: p.read_bytes()
                for p in folder.iterdir()
                if any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns)
            }
            return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    genes = _genes(sim)
    tok = BinTokenizer(TokenizerConfig(genes=genes, normalization_factor=4.25))
    model = BulkRNABert(tiny_config(n_genes=N_GENES))
    folder = save_pretrained(
        model,
        tmp_path / "ckpt",
        tok,
        data={"source": "TCGA (GDC STAR counts)", "samples": 220},
        recipe={"train": {"lr": 0.0001, "steps": 50}},
        scores={"pan-cancer classification": {"macro_f1": 0.812}},
        repo_id="me/bulkrnabert-tcga",
    )
    (folder / "optimizer.pt").write_bytes(b"not for upload")
    url = push_to_hub(folder, "me/bulkrnabert-tcga", private=True, token="hf_x")
    assert url == "https://hub/me/bulkrnabert-tcga/commit/1"
    assert calls["create"] == (
        "me/bulkrnabert-tcga",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert set(calls["uploaded"]) == set(PUSH_FILES)  # optimizer.pt stays behind
    card = calls["uploaded"]["README.md"].decode()
    assert "library_name: bulkfm" in card
    assert f"{N_GENES} genes in model order" in card and "genes.txt" in card and genes[0] in card
    assert "source: TCGA (GDC STAR counts)" in card and "samples: 220" in card
    assert "lr: 0.0001" in card and "steps: 50" in card
    assert "| pan-cancer classification / macro_f1 | 0.812 |" in card
    n_params = sum(p.numel() for p in model.state_dict().values())
    assert f"parameters: {n_params}" in card
    assert calls["uploaded"]["genes.txt"].decode().split() == genes
    # what went up loads back as it was saved
    _, back = load_pretrained(folder)
    assert back.normalization_factor == 4.25


def test_push_needs_a_complete_folder_and_the_network(tmp_path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lacks .*model.safetensors.*save_pretrained"):
        push_to_hub(tmp_path, "me/x")
    for name in PUSH_FILES:
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "me/x")
    with pytest.raises(ConfigError, match="owner/name"):
        push_to_hub(tmp_path, "not a repo")
