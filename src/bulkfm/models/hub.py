"""Checkpoints on the Hugging Face Hub: a repo id resolved to a cached snapshot, ours published.

Users keep published weights on the Hub, so ``load_pretrained("InstaDeepAI/BulkRNABert")``,
``bulkfm embed --model InstaDeepAI/BulkRNABert`` and ``--model-dir
geneformer=ctheodoris/Geneformer:Geneformer-V1-10M`` fetch them the way ``from_pretrained``
does elsewhere: through ``huggingface_hub``'s ``snapshot_download``, into the standard
cache (``HF_HUB_CACHE`` / ``HF_HOME``), pinned to a revision when one is given, and from
the cache alone when ``HF_HUB_OFFLINE=1``. Only the files a model needs are fetched
(``allow_patterns``): never the official repo's JAX pickle or its remote code.

A spec reads ``owner/name[@revision][:subfolder]``. A local path that exists always wins
over a repo id of the same spelling. ``huggingface_hub`` is an optional dependency
(``pip install 'bulkfm[hub]'``) imported only when a repo id is resolved, and this module
imports neither it nor torch at module level, so ``bulkfm.models`` stays light.

For the official BulkRNABert repos the gene order and normalisation factor are known
(:data:`OFFICIAL_BULKRNABERT`), so a user passes neither. Our own checkpoints carry
tokenizer.json and genes.txt; :func:`write_model_card` and :func:`push_to_hub` publish
them with a model card that records data, genes, recipe and benchmark scores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bulkfm.errors import CheckpointError, ConfigError, DownloadError
from bulkfm.io import write_text

if TYPE_CHECKING:
    from bulkfm.tokenize import BinTokenizer


class _Savable(Protocol):
    """A model that writes config.json + model.safetensors (+ tokenizer): BulkRNABert."""

    def save_pretrained(
        self, directory: str | os.PathLike, tokenizer: BinTokenizer | None = None
    ) -> Path: ...


logger = logging.getLogger(__name__)

__all__ = [
    "BULKRNABERT_FILES",
    "OFFICIAL_BULKRNABERT",
    "PUSH_FILES",
    "BulkRNABertSource",
    "HubSnapshot",
    "HubSpec",
    "OfficialBulkRNABert",
    "push_to_hub",
    "resolve_bulkrnabert",
    "resolve_snapshot",
    "save_pretrained",
    "write_model_card",
]

HUB_EXTRA = "hub"
CARD_FILE = "README.md"
#: What a bulkfm checkpoint holds; an official-format one has the first two only.
BULKRNABERT_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json")
GENES_FILE = "genes.txt"
#: What :func:`push_to_hub` uploads, and nothing else from the folder.
PUSH_FILES: tuple[str, ...] = (*BULKRNABERT_FILES, GENES_FILE, CARD_FILE)

# owner/name: the Hub's rules (letters, digits, "-", "_", "."; no leading punctuation);
# then an optional @revision (branch, tag or commit) and :subfolder.
_SPEC = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:@(?P<revision>[\w.\-/]+?))?"
    r"(?::(?P<subfolder>[\w.\-]+(?:/[\w.\-]+)*))?$"
)


@dataclass(frozen=True)
class HubSpec:
    """A Hub model: repo id, optional revision (branch, tag or commit) and subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    @classmethod
    def parse(cls, value: str | os.PathLike) -> HubSpec | None:
        """The spec ``owner/name[@revision][:subfolder]``, or None when ``value`` is not one."""
        match = _SPEC.match(str(value).strip())
        if match is None or ".." in match["repo"]:
            return None
        return cls(match["repo"], match["revision"], match["subfolder"])

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f":{self.subfolder}" if self.subfolder else ""
        return f"{self.repo_id}{rev}{sub}"


@dataclass(frozen=True)
class HubSnapshot:
    """A resolved spec: the cached snapshot folder and the commit it is."""

    spec: HubSpec
    root: Path
    commit: str

    @property
    def path(self) -> Path:
        """The model's folder: the snapshot, or its subfolder."""
        return self.root / self.spec.subfolder if self.spec.subfolder else self.root

    def describe(self) -> dict[str, Any]:
        """Provenance for run records: which repo, which revision asked, which commit got."""
        return {
            "repo_id": self.spec.repo_id,
            "revision": self.spec.revision,
            "commit": self.commit,
            "subfolder": self.spec.subfolder,
        }


def local_or_spec(value: str | os.PathLike, *, revision: str | None = None) -> Path | HubSpec:
    """An existing local path as is; else the Hub spec ``value`` spells; else the path.

    A path that does not exist and is no repo id comes back as a path, so the caller's
    own "not found" error names it.
    """
    path = Path(value).expanduser()
    if path.exists():
        if revision is not None:
            raise ConfigError(
                f"revision={revision!r} applies to a Hugging Face repo id, but {str(value)!r} "
                "is a local folder; leave out the revision (--revision) or pass the repo id"
            )
        return path
    spec = HubSpec.parse(value)
    if spec is None:
        return path
    if revision is not None:
        if spec.revision is not None and spec.revision != revision:
            raise ConfigError(
                f"two revisions for {spec.repo_id}: {spec.revision!r} in the spec and "
                f"{revision!r} given; pass one"
            )
        spec = HubSpec(spec.repo_id, revision, spec.subfolder)
    return spec


# --------------------------------------------------------------------------- huggingface_hub


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ConfigError(
            "loading a model from the Hugging Face Hub needs the package 'huggingface_hub' "
            f"({exc}); install it with: pip install 'bulkfm[{HUB_EXTRA}]', or pass a local "
            "folder holding the files"
        ) from exc
    return huggingface_hub


def offline() -> bool:
    """``HF_HUB_OFFLINE`` read now, or as huggingface_hub read it when it was imported."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    hf = sys.modules.get("huggingface_hub")  # not imported just to ask
    return bool(hf is not None and getattr(hf.constants, "HF_HUB_OFFLINE", False))


def _cache_dir() -> str | None:
    """The standard cache, read from the environment now (None: the library's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    return endpoint.rstrip("/") or None


def _error_class(hf: Any, name: str) -> type[BaseException]:
    errors = getattr(hf, "errors", None)
    found = getattr(errors, name, None) or getattr(hf.utils, name, None)
    return found if isinstance(found, type) else _Never


class _Never(Exception):
    """Stands in for an error class an older huggingface_hub does not have."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _explain(exc: BaseException, spec: HubSpec, hf: Any) -> DownloadError:
    """The library's error as one that says what is wrong and what to do."""
    where = f"{spec.repo_id}" + (f" (revision {spec.revision})" if spec.revision else "")
    local = f"or pass a local folder holding the files (a path {spec.repo_id!r} does not exist)"
    if isinstance(exc, _error_class(hf, "GatedRepoError")):
        return DownloadError(
            f"Hugging Face repo {where} is gated: accept its terms on huggingface.co and log "
            f"in (hf auth login, or HF_TOKEN), {local}",
            status=_status(exc) or 403,
        )
    if isinstance(exc, _error_class(hf, "RepositoryNotFoundError")):
        return DownloadError(
            f"Hugging Face repo {spec.repo_id} not found (or private: log in with hf auth login "
            f"or HF_TOKEN); check the repo id, {local}",
            status=_status(exc) or 404,
        )
    if isinstance(exc, _error_class(hf, "RevisionNotFoundError")):
        return DownloadError(
            f"revision {spec.revision!r} not found in Hugging Face repo {spec.repo_id}; give a "
            "branch, tag or commit hash the repo has (--revision)",
            status=_status(exc) or 404,
        )
    cache_errors = (
        _error_class(hf, "IncompleteSnapshotError"),
        _error_class(hf, "LocalEntryNotFoundError"),
    )
    if isinstance(exc, cache_errors):
        cache = _cache_dir() or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        if offline():
            return DownloadError(
                f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it: go online once (unset HF_HUB_OFFLINE) to fetch it "
                f"into the cache, {local}"
            )
        return DownloadError(
            f"could not reach the Hugging Face Hub for {where} and it is not in the cache "
            f"({cache}): check the network (HF_ENDPOINT), {local} ({exc})"
        )
    return DownloadError(
        f"Hugging Face Hub request for {where} failed: {exc}; retry later, {local}",
        status=_status(exc),
    )


def _folder_files(hf: Any, spec: HubSpec) -> list[str]:
    """Repo paths of the files directly in the spec's folder (one listing call)."""
    api = hf.HfApi(endpoint=_endpoint())
    try:
        entries = list(
            api.list_repo_tree(
                spec.repo_id, path_in_repo=spec.subfolder, revision=spec.revision, recursive=False
            )
        )
    except _error_class(hf, "EntryNotFoundError"):  # no such folder
        if not spec.subfolder:
            raise
        entries = []
    files = [e.path for e in entries if type(e).__name__ == "RepoFile"]
    if not files:
        top = api.list_repo_tree(spec.repo_id, revision=spec.revision, recursive=False)
        folders = sorted(e.path for e in top if type(e).__name__ == "RepoFolder")
        raise DownloadError(
            f"Hugging Face repo {spec} has no files in {spec.subfolder or 'its top folder'}; "
            f"name the subfolder of a variant (owner/name:SUBFOLDER), one of {folders}",
            status=404,
        )
    return files


def resolve_snapshot(
    spec: HubSpec,
    *,
    patterns: Sequence[str] | None = None,
    select: Callable[[str], bool] | None = None,
    extra: Sequence[str] = (),
) -> HubSnapshot:
    """Download (or find in the cache) the files a model needs; the snapshot folder.

    ``patterns`` are repo paths (or globs) to fetch. With ``select`` instead, the spec's
    folder is listed and its files (not sub-folders) that ``select(name)`` accepts are
    fetched; ``extra`` adds repo paths (an adapter's companion files). Offline, nothing is
    listed: the cached snapshot of the revision is used as it is.
    """
    hf = _hub()
    is_offline = offline()
    allow: list[str] | None = list(patterns) if patterns is not None else None
    try:
        if select is not None and not is_offline:
            allow = [p for p in _folder_files(hf, spec) if select(p.rsplit("/", 1)[-1])]
            allow += list(extra)
        folder = hf.snapshot_download(
            spec.repo_id,
            revision=spec.revision,
            allow_patterns=allow,
            cache_dir=_cache_dir(),
            endpoint=_endpoint(),
            local_files_only=is_offline,
        )
    except DownloadError:
        raise
    except (ImportError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the library's HTTP, cache and offline errors
        raise _explain(exc, spec, hf) from exc
    snapshot = HubSnapshot(spec=spec, root=Path(folder), commit=Path(folder).name)
    if spec.subfolder and not snapshot.path.is_dir():
        present = sorted(p.name for p in snapshot.root.iterdir() if p.is_dir())
        raise CheckpointError(
            f"Hugging Face repo {spec.repo_id} (commit {snapshot.commit}) has no folder "
            f"{spec.subfolder!r}; its folders here: {present}. Name one as "
            f"{spec.repo_id}:SUBFOLDER"
        )
    logger.info("%s -> %s (commit %s)", spec, snapshot.path, snapshot.commit)
    return snapshot


# --------------------------------------------------------------------------- BulkRNABert


@dataclass(frozen=True)
class OfficialBulkRNABert:
    """What an official repo does not say in machine-readable form, written down once.

    ``gene_files``: repo paths that carry the model's gene order, tried in turn (a list
    file, one id a line; or a CSV whose header after ``identifier`` is the genes, as the
    release's ``data/tcga_sample.csv``, whose columns feed the model as they stand).
    """

    repo_id: str
    normalization_factor: float
    gene_files: tuple[str, ...]
    pretraining: str


#: The official repos, by lower-cased id (the Hub matches ids case-insensitively).
OFFICIAL_BULKRNABERT: dict[str, OfficialBulkRNABert] = {
    "instadeepai/bulkrnabert": OfficialBulkRNABert(
        repo_id="InstaDeepAI/BulkRNABert",
        # max log10(1 + TPM) over the TCGA pre-training data (the release's tokenizer)
        normalization_factor=5.547176906585117,
        gene_files=("common_gene_id.txt", "bulkrnabert_gene_ids.txt", "data/tcga_sample.csv"),
        pretraining="TCGA",
    ),
}


@dataclass(frozen=True)
class BulkRNABertSource:
    """A BulkRNABert checkpoint folder, with the tokenizer facts its repo implies."""

    path: Path
    snapshot: HubSnapshot | None = None
    genes: list[str] | None = None
    normalization_factor: float | None = None


def read_gene_file(path: Path) -> list[str]:
    """Genes in model order: a list file, or the header of a samples x genes CSV."""
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig") as fh:
            header = fh.readline().rstrip("\r\n").split(",")
        genes = [g.strip().strip('"') for g in header]
        return [g for g in genes if g and g != "identifier"]
    return [g.strip() for g in path.read_text(encoding="utf-8-sig").splitlines() if g.strip()]


def resolve_bulkrnabert(
    directory: str | os.PathLike, *, revision: str | None = None
) -> BulkRNABertSource:
    """A local folder as is, or a Hub repo's snapshot with what its tokenizer needs.

    From an official repo without tokenizer.json the gene order is read from the
    snapshot and the normalisation factor comes from :data:`OFFICIAL_BULKRNABERT`.
    """
    target = local_or_spec(directory, revision=revision)
    if isinstance(target, Path):
        return BulkRNABertSource(path=target)
    official = OFFICIAL_BULKRNABERT.get(target.repo_id.lower())
    sub = f"{target.subfolder}/" if target.subfolder else ""
    patterns = [sub + name for name in (*BULKRNABERT_FILES, GENES_FILE)]
    if official is not None:
        patterns += list(official.gene_files)
    snapshot = resolve_snapshot(target, patterns=patterns)
    if official is None or (snapshot.path / "tokenizer.json").exists():
        return BulkRNABertSource(path=snapshot.path, snapshot=snapshot)
    for name in official.gene_files:
        if (snapshot.root / name).is_file():
            genes = read_gene_file(snapshot.root / name)
            break
    else:
        raise CheckpointError(
            f"{official.repo_id} (commit {snapshot.commit}) has none of the files that carry "
            f"its gene order ({', '.join(official.gene_files)}); pass genes=<gene list file> "
            "(--genes)"
        )
    return BulkRNABertSource(
        path=snapshot.path,
        snapshot=snapshot,
        genes=genes,
        normalization_factor=official.normalization_factor,
    )


# --------------------------------------------------------------------------- publishing


def _parameter_count(weights: Path) -> int | None:
    """Number of parameters from a safetensors header (8-byte length, then JSON)."""
    try:
        with weights.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError):
        return None
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in info.get("shape", []):
            n *= int(dim)
        total += n
    return total


def _as_mapping(value: Mapping[str, Any] | str | os.PathLike, what: str) -> dict[str, Any]:
    """A mapping as is, or read from a JSON / YAML file."""
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is not a file; pass a mapping or a JSON/YAML file")
    import yaml

    data = yaml.safe_load(path.read_text())  # YAML reads JSON too
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping of names to values")
    return data


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, name + " / ")
        else:
            rows.append((name, value))
    return rows


def write_model_card(
    directory: str | os.PathLike,
    *,
    data: str | Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | str | os.PathLike | None = None,
    scores: Mapping[str, Any] | str | os.PathLike | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """README.md for a checkpoint folder: what it was trained on, with which genes, how,
    and how it scored, so the Hub page answers what a reviewer asks first.

    ``data``: a sentence or a mapping (source, samples, ...); ``recipe``: the training
    config (a mapping or its YAML/JSON file); ``scores``: benchmark results (a mapping,
    nested by task, or a JSON/YAML file). Architecture and genes are read from the folder.
    """
    import yaml

    directory = Path(directory)
    config_path = directory / "config.json"
    genes_path = directory / GENES_FILE
    if not config_path.is_file() or not genes_path.is_file():
        raise CheckpointError(
            f"{directory} needs config.json and {GENES_FILE} for a model card: save the model "
            "with its tokenizer first (model.save_pretrained(directory, tokenizer))"
        )
    config = json.loads(config_path.read_text())
    genes = read_gene_file(genes_path)
    front: dict[str, Any] = {
        "library_name": "bulkfm",
        "pipeline_tag": "feature-extraction",
        "tags": ["bulk RNA-seq", "transcriptomics", "biology", "bulkfm", "BulkRNABert"],
    }
    if license:
        front["license"] = license
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {repo_id.split('/')[-1] if repo_id else 'BulkRNABert checkpoint'}", ""]
    lines += [
        "A BulkRNABert encoder trained with bulkfm. Load it with:",
        "",
        "```python",
        "from bulkfm.models import load_pretrained",
        f'model, tokenizer = load_pretrained("{repo_id or directory.name}")',
        "```",
        "",
        "## Data",
        "",
    ]
    if data is None:
        lines.append("Not recorded.")
    elif isinstance(data, Mapping):
        lines += [f"- {k}: {v}" for k, v in data.items()]
    else:
        lines.append(str(data))
    n_params = _parameter_count(directory / "model.safetensors")
    lines += [
        "",
        "## Genes",
        "",
        f"{len(genes)} genes in model order, one a line in `{GENES_FILE}` "
        f"(first: {', '.join(genes[:3])}). Input: TPM, log10(1 + TPM) divided by the "
        "normalisation factor in `tokenizer.json`, binned.",
        "",
        "## Architecture",
        "",
        *(f"- {k}: {v}" for k, v in config.items() if k != "format"),
        *([f"- parameters: {n_params}"] if n_params is not None else []),
        "",
        "## Recipe",
        "",
    ]
    if recipe is None:
        lines.append("Not recorded.")
    else:
        dumped = yaml.safe_dump(_as_mapping(recipe, "recipe"), sort_keys=False).rstrip()
        lines += ["```yaml", dumped, "```"]
    lines += ["", "## Benchmark scores", ""]
    if scores is None:
        lines.append("Not recorded.")
    else:
        lines += ["| score | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(_as_mapping(scores, "scores"))]
    return write_text("\n".join(lines) + "\n", directory / CARD_FILE)


def save_pretrained(
    model: _Savable,
    directory: str | os.PathLike,
    tokenizer: BinTokenizer,
    *,
    data: str | Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | str | os.PathLike | None = None,
    scores: Mapping[str, Any] | str | os.PathLike | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """``model.save_pretrained(directory, tokenizer)`` plus the model card."""
    path = model.save_pretrained(directory, tokenizer)
    write_model_card(
        path, data=data, recipe=recipe, scores=scores, repo_id=repo_id, license=license
    )
    return path


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a saved checkpoint folder (config, weights, tokenizer, genes, card) to the Hub.

    Only :data:`PUSH_FILES` go up, whatever else the folder holds (optimizer state,
    logs). Creates the repo when it does not exist. Returns the commit's URL.
    """
    directory = Path(directory)
    missing = [name for name in PUSH_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} lacks {missing} for a Hub upload: save with "
            "bulkfm.models.hub.save_pretrained(model, directory, tokenizer, data=..., "
            "recipe=..., scores=...) (the card is README.md)"
        )
    if HubSpec.parse(repo_id) is None or "@" in repo_id or ":" in repo_id:
        raise ConfigError(f"repo_id={repo_id!r}: give the Hub repo as owner/name")
    if offline():
        raise DownloadError(
            "HF_HUB_OFFLINE=1 is set, and pushing to the Hub needs the network: unset it"
        )
    hf = _hub()
    spec = HubSpec(repo_id, revision)
    try:
        api = hf.HfApi(endpoint=_endpoint(), token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            allow_patterns=list(PUSH_FILES),
            commit_message=commit_message or "Upload BulkRNABert checkpoint (bulkfm)",
            revision=revision,
            repo_type="model",
        )
    except Exception as exc:  # the library's HTTP errors, with what to do
        if _status(exc) in (401, 403):
            raise DownloadError(
                f"the Hub refused the upload to {repo_id} ({_status(exc)}): log in with a "
                "write token (hf auth login, or HF_TOKEN / token=)",
                status=_status(exc),
            ) from exc
        raise _explain(exc, spec, hf) from exc
    return str(getattr(info, "commit_url", info))
