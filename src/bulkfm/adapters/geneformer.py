"""Geneformer (V1 and V2) as a frozen benchmark embedder, from its released HF folder.

Geneformer (Theodoris et al. 2023; weights at https://huggingface.co/ctheodoris/Geneformer)
is a BERT masked-language model over *rank value encodings*: each cell becomes the list
of its expressed genes, ordered by how far each gene's normalised expression lies
above that gene's typical (non-zero median) level across the pre-training corpus.

Published preprocessing, as in ``geneformer/tokenizer.py`` (``TranscriptomeTokenizer``):

1. counts / total counts of the sample x 10,000 (``target_sum``), then divided by the
   gene's non-zero corpus median (``gene_median_dictionary*.pkl``);
2. only genes present in both the median and the token dictionary are used; genes
   with zero expression are dropped;
3. genes are sorted by that value, descending, and mapped to their token
   (``token_dictionary*.pkl``, Ensembl id -> token; ``<pad>`` = 0, ``<mask>`` = 1);
4. the list is truncated to the model input size (V1: 2,048). V2 dictionaries also
   hold ``<cls>`` and ``<eos>``: V2 truncates to input size - 2 and puts ``<cls>``
   first and ``<eos>`` last (4,096 tokens in all).

Published embedding, as in ``geneformer/emb_extractor.py`` (``EmbExtractor``):
``emb_layer=-1`` (default) is ``hidden_states[n_layers - 1]``, the output of the
second-to-last encoder layer (``hidden_states[0]`` is the embedding layer);
``emb_layer=0`` is the last layer. ``emb_mode="cls"`` is the ``<cls>`` token's output
and has been the extractor's default since the V2 models (October 2024);
``emb_mode="cell"`` is the mean over the sample's non-pad tokens (V2: ``<cls>`` and
``<eos>`` are excluded from that mean). V1 has no ``<cls>`` token, so its users pass
``cell``. Here ``emb_mode="auto"`` (the default) does what the authors do: ``cls``
for V2, ``cell`` for V1; ``cell`` keeps the mean for V2.

Gene-id collapsing, as in ``TranscriptomeTokenizer(collapse_gene_ids=True)`` (the
default): every data gene id (upper-cased, version stripped) is looked up in the
release's Ensembl mapping dictionary (``ensembl_mapping_dict*.pkl``, old id -> id in
the token dictionary); genes the dictionary does not map are dropped, and genes
mapped to one id are summed before normalisation. The sample total used for the
scaling is still the total over all of the sample's genes (the tokenizer's
``n_counts``). It is applied whenever the mapping dictionary sits in the model folder
(or is passed as ``gene_mapping_dictionary=``); ``collapse_gene_ids=False`` turns it
off. Without the file each vocabulary gene takes the one data column with its
unversioned Ensembl id, which is the collapsed result whenever the data has no
retired or duplicate ids.

Bulk-specific choices (the published recipe is kept where it is right for bulk):

- Input values: ``adata.layers["counts"]`` when the build kept raw counts (the
  published input), otherwise ``X`` (TPM). The per-sample scaling to 10,000 does not
  change a rank, but TPM's gene-length normalisation does, so TPM input gives
  somewhat different ranks from counts; ``coverage_["source"]`` says which was used.
- Ties (equal normalised values, common for low integer counts) are broken by
  ascending token id with a stable sort, so a sample's tokens never depend on the
  column order of the data. The published ``np.argsort`` breaks ties arbitrarily.
- Padding never enters the mean (as published), so an embedding does not depend on
  its batch.
- Version: V2 when the token dictionary holds ``<cls>`` and ``<eos>`` (the published
  test), else V1; ``version="V1"|"V2"`` overrides it.

Files: the released model folder (``config.json`` and ``model.safetensors``, or the
pickle ``pytorch_model.bin`` with ``trust_pickle=True``), loaded into a
``transformers`` ``BertModel`` under the released ``bert.`` key names with a strict
key check. The masked-LM head (``cls.predictions.*``), an unused pooler and the
``position_ids`` buffer older transformers versions saved are ignored. The
dictionaries are looked up in the model folder (``token_dictionary*``,
``gene_median_dictionary*`` and, optionally, ``ensembl_mapping_dict*``, each
``.json``, ``.pkl`` or ``.pickle``) or passed as ``token_dictionary=`` /
``gene_median_dictionary=`` / ``gene_mapping_dictionary=``. JSON needs no opt-in; the
released pickles need ``trust_pickle=True`` and even then are read by an
unpickler that admits only plain containers, strings, numbers and numpy scalars,
so a tampered dictionary cannot run code.

Not verified here (no released weights offline): the exact released state-dict key
set (the HF ``BertForMaskedLM`` names are assumed, as the released config.json
declares that architecture). The tokenisation and pooling are checked against the
published rules on hand-made dictionaries in the released format.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp

from bulkfm import schema as keys
from bulkfm.adapters.base import (
    FoundationEmbedder,
    GeneInput,
    batch_slices,
    file_digest,
    find_file,
    gene_input,
    load_state_dict_strict,
    masked_mean,
    read_state_dict,
    require,
)
from bulkfm.config import check_int
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError, GeneMappingError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "GeneformerEmbedder",
    "GeneformerVocabulary",
    "gene_mapping_matrix",
    "rank_value_encoding",
    "read_dictionary",
    "read_gene_mapping",
]

MODEL = "Geneformer"
TARGET_SUM = 10_000.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DICTIONARY_SUFFIXES = (".json", ".pkl", ".pickle")
# Parts of a released BertForMaskedLM an embedding never uses.
IGNORED_KEYS = ("cls.", "bert.pooler.", "bert.embeddings.position_ids")
# Rows tokenised at once (the vocabulary-wide float matrix is the memory cost).
TOKENIZE_CHUNK = 256
N_EXAMPLES = 10

# The only globals a Geneformer dictionary pickle may name: numpy scalars (and the
# dtype they carry) and an ordered dict. Nothing here can run code of the file's choosing.
_SAFE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }
)


# --------------------------------------------------------------------------- dictionaries


class _DictionaryUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy scalar reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (pickled dictionaries often hold np.float64)."""
    return value.item() if isinstance(value, np.generic) else value


def read_dictionary(
    path: str | os.PathLike, *, trust_pickle: bool = False, what: str = "dictionary"
) -> dict[str, Any]:
    """A Geneformer dictionary file (JSON, or pickle on opt-in) as a plain ``dict``.

    Pickles are read with an unpickler that admits only containers, strings, numbers
    and numpy scalars, so even an opted-in file cannot run code; the opt-in remains
    because the project never unpickles a file the user has not vouched for.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{MODEL}: the {what} {path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{MODEL}: {path} is not a readable JSON {what}: {exc}") from exc
    else:
        if not trust_pickle:
            raise CheckpointError(
                f"{MODEL}: the {what} {path.name} is a pickle, and the project never unpickles "
                "a file without an explicit opt-in. If it comes from the Geneformer release, "
                "pass trust_pickle=True (CLI: --model-arg geneformer:trust_pickle=true; it is "
                "then read by a restricted unpickler that admits only plain data), or convert "
                "it once to a .json file with the same name"
            )
        try:
            data = _DictionaryUnpickler(io.BytesIO(path.read_bytes())).load()
        except Exception as exc:  # any refusal or parse failure means a bad file
            raise CheckpointError(
                f"{MODEL}: could not read the {what} {path} as plain data ({exc}); a Geneformer "
                "dictionary holds only gene ids and numbers. Use the file from the release"
            ) from exc
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{MODEL}: the {what} {path} holds a {type(data).__name__}, not a mapping of gene "
            "ids; use the file from the release"
        )
    return {str(_plain(k)): _plain(v) for k, v in data.items()}


def _find_dictionary(
    folder: Path, stem: str, explicit: str | os.PathLike | None, option: str
) -> Path:
    """The explicit file, or the one ``<stem>*.json|pkl|pickle`` file in the model folder."""
    found = _find_optional_dictionary(folder, stem, explicit, option)
    if found is None:
        patterns = ", ".join(f"{stem}*{s}" for s in DICTIONARY_SUFFIXES)
        raise CheckpointError(
            f"{MODEL}: no {stem.replace('_', ' ')} in {folder} (looked for {patterns}). Copy "
            f"the release's file next to the weights (V1: {stem}.pkl or {stem}_gc30M.pkl; V2: "
            f"{stem}_gc104M.pkl) or pass {option}=PATH"
        )
    return found


def _find_optional_dictionary(
    folder: Path, stem: str, explicit: str | os.PathLike | None, option: str
) -> Path | None:
    """Like :func:`_find_dictionary`, but ``None`` when the folder has no such file."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{MODEL}: {option}={str(path)!r} is not a file")
        return path
    hits = sorted(
        p
        for p in folder.glob(f"{stem}*")
        if p.is_file() and p.suffix.lower() in DICTIONARY_SUFFIXES
    )
    # One dictionary may sit there as JSON and as pickle: JSON wins (no unpickling).
    by_stem: dict[str, Path] = {}
    for p in sorted(hits, key=lambda p: DICTIONARY_SUFFIXES.index(p.suffix.lower())):
        by_stem.setdefault(p.stem, p)
    if len(by_stem) == 1:
        return next(iter(by_stem.values()))
    if not by_stem:
        return None
    raise CheckpointError(
        f"{MODEL}: several {stem.replace('_', ' ')} files in {folder}: "
        f"{sorted(p.name for p in by_stem.values())}; pass the one that belongs to these "
        f"weights as {option}=PATH"
    )


@dataclass(frozen=True)
class GeneformerVocabulary:
    """The genes Geneformer can see, in ascending token order, with their medians.

    Only genes in both dictionaries are usable (the published tokenizer's rule).
    """

    genes: np.ndarray  # Ensembl ids (object)
    tokens: np.ndarray  # int64 token ids, ascending
    medians: np.ndarray  # float64 non-zero corpus medians
    pad_id: int
    cls_id: int | None
    eos_id: int | None
    n_tokens: int  # entries of the token dictionary (special tokens included)
    max_token: int

    @property
    def has_special(self) -> bool:
        return self.cls_id is not None and self.eos_id is not None

    @classmethod
    def from_dicts(
        cls, token_dictionary: Mapping[str, Any], gene_median_dictionary: Mapping[str, Any]
    ) -> GeneformerVocabulary:
        tokens = _check_tokens(token_dictionary)
        medians = _check_medians(gene_median_dictionary)
        genes = sorted(
            (g for g in tokens if not g.startswith("<") and g in medians), key=tokens.__getitem__
        )
        if not genes:
            raise CheckpointError(
                f"{MODEL}: the token and median dictionaries share no gene; they must come from "
                "the same Geneformer release (both V1, or both gc104M)"
            )
        return cls(
            genes=np.asarray(genes, dtype=object),
            tokens=np.asarray([tokens[g] for g in genes], dtype=np.int64),
            medians=np.asarray([medians[g] for g in genes], dtype=np.float64),
            pad_id=tokens["<pad>"],
            cls_id=tokens.get("<cls>"),
            eos_id=tokens.get("<eos>"),
            n_tokens=len(tokens),
            max_token=max(tokens.values()),
        )


def _check_tokens(raw: Mapping[str, Any]) -> dict[str, int]:
    bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise CheckpointError(
            f"{MODEL}: the token dictionary must map gene ids to token numbers >= 0; "
            f"{len(bad)} entries do not (e.g. {bad[:3]}). Is it the median dictionary?"
        )
    if len(set(raw.values())) != len(raw):
        raise CheckpointError(f"{MODEL}: the token dictionary gives one token to several genes")
    if "<pad>" not in raw:
        raise CheckpointError(
            f"{MODEL}: the token dictionary has no '<pad>' entry; use the release's token "
            "dictionary (token_dictionary*.pkl)"
        )
    return {str(k): int(v) for k, v in raw.items()}


def _check_medians(raw: Mapping[str, Any]) -> dict[str, float]:
    def ok(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v > 0

    bad = [k for k, v in raw.items() if not ok(v)]
    if bad:
        raise CheckpointError(
            f"{MODEL}: the gene median dictionary must map gene ids to positive finite medians; "
            f"{len(bad)} entries do not (e.g. {bad[:3]}). Use the release's "
            "gene_median_dictionary*.pkl"
        )
    return {str(k): float(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- tokenisation


def rank_value_encoding(
    values: np.ndarray,
    medians: np.ndarray,
    tokens: np.ndarray,
    *,
    input_size: int,
    totals: np.ndarray | None = None,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = TARGET_SUM,
) -> list[np.ndarray]:
    """Geneformer's rank value encoding of each row of ``values`` (samples x genes).

    Columns are the vocabulary genes (``medians``/``tokens`` aligned). Each row is
    scaled to ``target_sum`` by ``totals`` (the sample's total over all its genes;
    default: the row sum), divided by the gene medians; zeros are dropped and the rest
    sorted descending, ties by column order (stable). With ``cls_id``/``eos_id`` (V2)
    the list is cut to ``input_size - 2`` and framed by them, else cut to ``input_size``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(medians) or len(tokens) != len(medians):
        raise ConfigError(
            f"values must be samples x {len(medians)} vocabulary genes, got {values.shape}"
        )
    special = cls_id is not None and eos_id is not None
    keep = input_size - 2 if special else input_size
    if keep < 1:
        raise ConfigError(f"input_size={input_size} leaves no room for genes")
    totals = values.sum(axis=1) if totals is None else np.asarray(totals, dtype=np.float64)
    if totals.shape != (values.shape[0],):
        raise ConfigError(f"totals must hold one value per sample, got shape {totals.shape}")
    if not np.isfinite(totals).all():
        raise ExpressionValueError(
            "NaN or inf in the sample totals (the values, outside the model's genes too); "
            "fix or drop them"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = values / totals[:, None] * target_sum / np.asarray(medians)[None, :]
    expressed = values > 0
    key = np.where(expressed, -scaled, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    n_expressed = expressed.sum(axis=1)
    out = []
    for i in range(values.shape[0]):
        ids = np.asarray(tokens, dtype=np.int64)[order[i, : min(int(n_expressed[i]), keep)]]
        if special:
            ids = np.concatenate([[cls_id], ids, [eos_id]]).astype(np.int64)
        out.append(ids)
    return out


def read_gene_mapping(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, str]:
    """The release's Ensembl mapping dictionary (``ensembl_mapping_dict*.pkl``) as str -> str."""
    raw = read_dictionary(path, trust_pickle=trust_pickle, what="gene mapping dictionary")
    bad = [k for k, v in raw.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(
            f"{MODEL}: the gene mapping dictionary {Path(path).name} must map Ensembl ids to "
            f"Ensembl ids; {len(bad)} entries do not (e.g. {bad[:3]}). Use the release's "
            "ensembl_mapping_dict*.pkl, or pass collapse_gene_ids=False"
        )
    return {k: str(v) for k, v in raw.items()}


def gene_mapping_matrix(
    data_genes: Sequence[str], mapping: Mapping[str, str], vocabulary: Sequence[str]
) -> sp.csr_matrix:
    """Data columns -> vocabulary genes, collapsed as the published tokenizer does.

    Entry (j, k) is 1 when data gene j (version stripped, upper-cased, as the tokenizer
    upper-cases it) maps to vocabulary gene k. A gene the dictionary does not map, or
    maps outside the vocabulary, has an empty row: the tokenizer drops it. ``data @ M``
    therefore sums the genes that share a target id, which is what the tokenizer's
    ``sum_ensembl_ids`` does before normalising.
    """
    from bulkfm.data.genes import strip_version

    column = {g: k for k, g in enumerate(vocabulary)}
    targets = [
        column.get(mapping.get(str(g).upper(), ""), -1) for g in strip_version(list(data_genes))
    ]
    rows = np.flatnonzero(np.asarray(targets) >= 0)
    cols = np.asarray(targets, dtype=np.int64)[rows]
    return sp.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(len(data_genes), len(vocabulary))
    )


def _row_sums(M: Any) -> np.ndarray:
    return np.asarray(M.sum(axis=1), dtype=np.float64).ravel()


# --------------------------------------------------------------------------- the embedder


@register_embedder("geneformer")
class GeneformerEmbedder(FoundationEmbedder):
    """Frozen Geneformer: rank value encoding of counts (or TPM), pooled as the authors do.

    Options: ``version`` ("auto", "V1", "V2"), ``emb_mode`` ("auto": the official
    extractor's choice, ``cls`` for V2 and ``cell`` for V1; "cls": the <cls> output, V2
    only; "cell": mean over gene tokens), ``emb_layer`` (-1: second-to-last layer, as
    published; 0: last), ``layer`` (data source: "auto" = counts layer when present else
    X; "X"; or a layer name), ``model_input_size`` (default the config's
    max_position_embeddings), ``token_dictionary`` / ``gene_median_dictionary`` /
    ``gene_mapping_dictionary`` (files; default: found in the model folder),
    ``collapse_gene_ids`` (merge ids through the mapping dictionary when there is one,
    as the official tokenizer does; default True), ``min_coverage`` (fraction of the
    vocabulary the data must have).
    """

    model_name: ClassVar[str] = MODEL
    extra: ClassVar[str] = "geneformer"
    # 2: V2 pools the <cls> token by default; ids collapse through the mapping dictionary.
    version: ClassVar[int] = 2

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        version: Literal["auto", "V1", "V2"] = "auto",
        emb_mode: Literal["auto", "cell", "cls"] = "auto",
        emb_layer: int = -1,
        layer: str | None = "auto",
        model_input_size: int | None = None,
        token_dictionary: str | os.PathLike | None = None,
        gene_median_dictionary: str | os.PathLike | None = None,
        gene_mapping_dictionary: str | os.PathLike | None = None,
        collapse_gene_ids: bool = True,
        min_coverage: float = 0.05,
        batch_size: int = 8,
        device: str = "cpu",
        trust_pickle: bool = False,
        label: str | None = None,
    ) -> None:
        super().__init__(
            model_dir,
            layer=layer,
            min_coverage=min_coverage,
            batch_size=batch_size,
            device=device,
            trust_pickle=trust_pickle,
            label=label,
        )
        if version not in ("auto", "V1", "V2"):
            raise ConfigError(f"version={version!r}: choose 'auto', 'V1' or 'V2'")
        if emb_mode not in ("auto", "cell", "cls"):
            raise ConfigError(
                f"emb_mode={emb_mode!r}: choose 'auto' (the official extractor's choice: cls "
                "for V2, cell for V1), 'cell' (mean over gene tokens) or 'cls' (the <cls> "
                "token, V2 models only)"
            )
        if emb_mode == "cls" and version == "V1":
            raise ConfigError("emb_mode='cls' needs a V2 model: V1 has no <cls> token; use 'cell'")
        if isinstance(emb_layer, bool) or not isinstance(emb_layer, int) or emb_layer > 0:
            raise ConfigError(
                f"emb_layer must be an integer <= 0 (-1: second-to-last layer, as published; "
                f"0: last layer), got {emb_layer!r}"
            )
        if model_input_size is not None:
            check_int("model_input_size", model_input_size, 3 if version == "V2" else 1)
        # Not `version`: that name is the embedder class's cache-key version (base.Embedder).
        self.model_version = version
        self.emb_mode = emb_mode
        self.emb_layer = int(emb_layer)
        self.model_input_size = model_input_size
        folder = self.path if self.path.is_dir() else self.path.parent
        self.folder = folder
        # From the Hub the dictionaries sit in the repo's geneformer/ folder (hub_companions).
        token_dictionary = token_dictionary or self.hub_files.get("token_dictionary")
        gene_median_dictionary = gene_median_dictionary or self.hub_files.get(
            "gene_median_dictionary"
        )
        gene_mapping_dictionary = gene_mapping_dictionary or self.hub_files.get(
            "gene_mapping_dictionary"
        )
        self.token_dictionary_path = _find_dictionary(
            folder, "token_dictionary", token_dictionary, "token_dictionary"
        )
        self.gene_median_dictionary_path = _find_dictionary(
            folder, "gene_median_dictionary", gene_median_dictionary, "gene_median_dictionary"
        )
        self.collapse_gene_ids = self._bool_setting("collapse_gene_ids", collapse_gene_ids)
        self.gene_mapping_dictionary_path = (
            _find_optional_dictionary(
                folder, "ensembl_mapping_dict", gene_mapping_dictionary, "gene_mapping_dictionary"
            )
            if self.collapse_gene_ids
            else None
        )
        self._gene_mapping: dict[str, str] | None = None
        self._mapping_matrix: tuple[tuple[str, ...], sp.csr_matrix] | None = None
        self._vocabulary: GeneformerVocabulary | None = None
        self._bert_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ settings, files

    @classmethod
    def hub_companions(cls, repo_id: str, subfolder: str | None) -> dict[str, str]:
        """ctheodoris/Geneformer keeps the dictionaries in its geneformer/ package folder:
        V1 models (Geneformer-V1-10M, gf-*-30M*) the gc30M set, V2 models the gc104M set."""
        if repo_id.lower() != "ctheodoris/geneformer":
            return {}
        v1 = subfolder is not None and ("V1" in subfolder or "30M" in subfolder)
        folder, tag = (
            ("geneformer/gene_dictionaries_30m", "gc30M") if v1 else ("geneformer", "gc104M")
        )
        return {
            "token_dictionary": f"{folder}/token_dictionary_{tag}.pkl",
            "gene_median_dictionary": f"{folder}/gene_median_dictionary_{tag}.pkl",
            "gene_mapping_dictionary": f"{folder}/ensembl_mapping_dict_{tag}.pkl",
        }

    def settings(self) -> dict[str, Any]:
        files = {
            "token_dictionary": file_digest(self.token_dictionary_path),
            "gene_median_dictionary": file_digest(self.gene_median_dictionary_path),
        }
        if self.gene_mapping_dictionary_path is not None:
            files["gene_mapping_dictionary"] = file_digest(self.gene_mapping_dictionary_path)
        if self.path.is_file():  # the folder's config is not in the checkpoint digest
            files["config"] = file_digest(self._config_path())
        return {
            "version": self.model_version,
            "emb_mode": self.emb_mode,
            "collapse_gene_ids": self.collapse_gene_ids,
            "emb_layer": self.emb_layer,
            "model_input_size": self.model_input_size,
            "files": files,
        }

    def _config_path(self) -> Path:
        return find_file(self.folder, ["config.json"], what="config.json", model=MODEL)

    @property
    def bert_config(self) -> dict[str, Any]:
        """The released config.json, checked to be a BERT config."""
        if self._bert_config is None:
            path = self._config_path()
            try:
                cfg = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{MODEL}: {path} is not readable JSON: {exc}") from exc
            if not isinstance(cfg, dict) or cfg.get("model_type") != "bert":
                raise CheckpointError(
                    f"{MODEL}: {path} is not a BERT config (model_type "
                    f"{cfg.get('model_type') if isinstance(cfg, dict) else None!r}); pass the "
                    "folder of a released Geneformer model (e.g. Geneformer-V1-10M)"
                )
            for key in ("vocab_size", "max_position_embeddings", "num_hidden_layers"):
                if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int):
                    raise CheckpointError(f"{MODEL}: {path} lacks an integer {key!r}")
            self._bert_config = cfg
        return self._bert_config

    @property
    def vocabulary(self) -> GeneformerVocabulary:
        """Both dictionaries, read once and checked against the model's vocabulary size."""
        if self._vocabulary is None:
            tokens = read_dictionary(
                self.token_dictionary_path, trust_pickle=self.trust_pickle, what="token dictionary"
            )
            medians = read_dictionary(
                self.gene_median_dictionary_path,
                trust_pickle=self.trust_pickle,
                what="gene median dictionary",
            )
            vocab = GeneformerVocabulary.from_dicts(tokens, medians)
            n_vocab = self.bert_config["vocab_size"]
            if vocab.max_token >= n_vocab:
                raise CheckpointError(
                    f"{MODEL}: the token dictionary {self.token_dictionary_path.name} uses token "
                    f"{vocab.max_token} but the model has {n_vocab} tokens: the dictionary "
                    "belongs to another release (V1 dictionaries for V1 weights, gc104M for V2)"
                )
            self._vocabulary = vocab
        return self._vocabulary

    @property
    def resolved_version(self) -> str:
        """ "V2" when the token dictionary carries <cls> and <eos> (unless overridden)."""
        vocab = self.vocabulary
        if self.model_version == "V2" and not vocab.has_special:
            raise ConfigError(
                f"{MODEL}: version='V2' but the token dictionary "
                f"{self.token_dictionary_path.name} has no <cls>/<eos> tokens; pass the V2 "
                "dictionary (token_dictionary_gc104M.pkl) or version='V1'"
            )
        resolved = (
            self.model_version
            if self.model_version != "auto"
            else "V2"
            if vocab.has_special
            else "V1"
        )
        if resolved == "V1" and self.emb_mode == "cls":
            raise ConfigError(
                f"{MODEL}: emb_mode='cls' needs a V2 model, but this is V1 (no <cls> token in "
                f"{self.token_dictionary_path.name}); use emb_mode='cell'"
            )
        expected = {"V1": 2048, "V2": 4096}[resolved]
        if self.bert_config["max_position_embeddings"] != expected:
            logger.warning(
                "%s: %s model with max_position_embeddings=%d (released %s models have %d); "
                "check that the dictionaries belong to these weights",
                MODEL,
                resolved,
                self.bert_config["max_position_embeddings"],
                resolved,
                expected,
            )
        return resolved

    @property
    def resolved_emb_mode(self) -> str:
        """``cls`` or ``cell``: ``auto`` follows the official extractor (cls for V2)."""
        if self.emb_mode != "auto":
            return self.emb_mode
        return "cls" if self.resolved_version == "V2" else "cell"

    @property
    def gene_mapping(self) -> dict[str, str] | None:
        """The release's Ensembl mapping dictionary when collapsing applies, else None."""
        if self.gene_mapping_dictionary_path is None:
            return None
        if self._gene_mapping is None:
            self._gene_mapping = read_gene_mapping(
                self.gene_mapping_dictionary_path, trust_pickle=self.trust_pickle
            )
        return self._gene_mapping

    @property
    def input_size(self) -> int:
        limit = self.bert_config["max_position_embeddings"]
        size = self.model_input_size if self.model_input_size is not None else limit
        if size > limit:
            raise ConfigError(
                f"{MODEL}: model_input_size={size} exceeds the model's "
                f"max_position_embeddings={limit}; use at most {limit}"
            )
        return size

    # ------------------------------------------------------------------ network

    def load(self) -> Any:
        import torch

        transformers = require("transformers", extra=self.extra, model=MODEL)
        cfg = transformers.BertConfig.from_dict(dict(self.bert_config))
        n_layers = cfg.num_hidden_layers
        if not 0 <= n_layers + self.emb_layer <= n_layers:
            raise ConfigError(
                f"emb_layer={self.emb_layer} reaches below the embedding layer of a "
                f"{n_layers}-layer model; use a value in [{-n_layers}, 0]"
            )
        weights = find_file(self.path, WEIGHT_FILES, what="weights", model=MODEL)
        state = read_state_dict(weights, trust_pickle=self.trust_pickle, model=MODEL)
        if state and not any(k.startswith("bert.") for k in state):
            state = {f"bert.{k}": v for k, v in state.items()}  # saved from a bare BertModel
        # Key names exactly as released: the encoder sits under "bert.".
        net = torch.nn.ModuleDict({"bert": transformers.BertModel(cfg, add_pooling_layer=False)})
        load_state_dict_strict(net, state, model=MODEL, ignore=IGNORED_KEYS)
        logger.info("%s: loaded %s (%d layers)", MODEL, weights, n_layers)
        return net

    # ------------------------------------------------------------------ tokens, embedding

    def tokenize(self, adata: ad.AnnData) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Each sample's token ids (V2: framed by <cls>/<eos>) and the coverage report."""
        vocab = self.vocabulary
        version = self.resolved_version
        size = self.input_size
        layer = self.source_layer(adata)
        cls_id, eos_id = (vocab.cls_id, vocab.eos_id) if version == "V2" else (None, None)
        report: dict[str, Any] = {}
        tokens: list[np.ndarray] = []
        n_expressed: list[int] = []
        source = adata.layers[layer] if layer is not None else adata.X
        for start in range(0, adata.n_obs, TOKENIZE_CHUNK):
            rows = slice(start, min(start + TOKENIZE_CHUNK, adata.n_obs))
            if self.gene_mapping is None:
                gi = gene_input(
                    adata,
                    list(vocab.genes),
                    layer=layer,
                    model=MODEL,
                    min_fraction=self.min_coverage,
                    rows=rows,
                )
            else:
                gi = self._collapsed_input(adata, layer, rows)
            report = gi.report
            totals = _row_sums(source[rows])
            if not np.isfinite(totals).all():
                raise ExpressionValueError(
                    f"{MODEL}: NaN or inf in the {report['source']} values (outside the model's "
                    "genes too; Geneformer scales by each sample's total over all genes); fix or "
                    "drop them"
                )
            if (gi.values < 0).any() or (totals < 0).any() or _has_negative(source[rows]):
                raise ExpressionValueError(
                    f"{MODEL}: the {report['source']} values include negatives; Geneformer ranks "
                    "raw counts or TPM, not log-ratios or z-scores. Pass un-logged, "
                    "non-negative expression"
                )
            n_expressed += (gi.values > 0).sum(axis=1).tolist()
            tokens += rank_value_encoding(
                gi.values,
                vocab.medians,
                vocab.tokens,
                input_size=size,
                totals=totals,
                cls_id=cls_id,
                eos_id=eos_id,
            )
        n_genes = np.asarray(n_expressed)
        empty = np.flatnonzero(n_genes == 0)
        if len(empty):
            raise ExpressionValueError(
                f"{MODEL}: {len(empty)} samples express none of the model's genes (e.g. "
                f"{list(adata.obs_names[empty[:N_EXAMPLES]])}); remove them or check that "
                "their values were read"
            )
        report.update(self._report_extra(layer, version, size, n_genes))
        return tokens, report

    def _collapsed_input(self, adata: ad.AnnData, layer: str | None, rows: slice) -> GeneInput:
        """The data summed onto vocabulary genes through the mapping dictionary.

        Values flagged in ``layers["missing"]`` count as zero (Geneformer drops zeros, so
        a missing value and an unexpressed gene both leave the gene out of the ranking).
        """
        vocab = self.vocabulary
        mapping = self.gene_mapping or {}
        genes = tuple(adata.var_names.astype(str))
        if self._mapping_matrix is None or self._mapping_matrix[0] != genes:
            # tokenize() asks once per chunk of rows for the same genes: build it once.
            self._mapping_matrix = (genes, gene_mapping_matrix(genes, mapping, list(vocab.genes)))
        matrix = self._mapping_matrix[1]
        used = np.asarray(matrix.getnnz(axis=1) > 0)
        per_gene = np.asarray(matrix.getnnz(axis=0)).ravel()
        hit = per_gene > 0
        n_found = int(hit.sum())
        source = adata.layers[layer] if layer is not None else adata.X
        block = source[rows]
        if keys.MISSING in adata.layers:
            flagged = adata.layers[keys.MISSING][rows]
            flagged = flagged.toarray() if sp.issparse(flagged) else np.asarray(flagged)
            block = np.where(flagged.astype(bool), 0.0, _dense(block))
        summed = sp.csr_matrix(block, dtype=np.float64) @ matrix
        values = np.asarray(summed.toarray(), dtype=np.float64)
        report: dict[str, Any] = {
            "model": MODEL,
            "id_type": "ensembl",
            "source": f"layers[{layer!r}]" if layer else "X",
            "n_vocabulary": len(vocab.genes),
            "n_found": n_found,
            "fraction_found": n_found / len(vocab.genes),
            "n_data_genes": int(adata.n_vars),
            "n_data_genes_used": int(used.sum()),
            "examples_missing": [str(g) for g in vocab.genes[~hit][:N_EXAMPLES]],
            "gene_id_collapsing": {
                "mapping_dictionary": self.gene_mapping_dictionary_path.name
                if self.gene_mapping_dictionary_path is not None
                else None,
                "n_data_genes_not_mapped": int((~used).sum()),
                "n_vocabulary_genes_summed_from_several": int((per_gene > 1).sum()),
            },
        }
        if report["fraction_found"] < self.min_coverage:
            raise GeneMappingError(
                f"{MODEL}: after collapsing gene ids through "
                f"{report['gene_id_collapsing']['mapping_dictionary']}, the data has only "
                f"{n_found} of the model's "
                f"{len(vocab.genes)} genes ({report['fraction_found']:.1%}); harmonise gene "
                "ids to Ensembl (bulkfm data build), check that the mapping dictionary belongs "
                "to these weights, or pass collapse_gene_ids=False"
            )
        return GeneInput(values=values, present=values > 0, report=report)

    def _report_extra(
        self, layer: str | None, version: str, size: int, n_genes: np.ndarray
    ) -> dict[str, Any]:
        """What the model saw: source, version, genes expressed and cut by the input size."""
        vocab = self.vocabulary
        if layer is None:
            source = (
                "X (TPM: the published input is counts; scaling each sample to 10,000 does not "
                "change ranks, but TPM's gene-length normalisation does)"
            )
        else:
            source = f"layers[{layer!r}]" + (
                " (raw counts, as published)" if layer == keys.COUNTS else ""
            )
        return {
            "source": source,
            "version": version,
            "input_size": size,
            "emb_mode": self.resolved_emb_mode,
            "emb_layer": self.emb_layer,
            "gene_ids_collapsed": self.gene_mapping is not None,
            "n_token_dictionary": vocab.n_tokens,
            "n_vocabulary_genes": len(vocab.genes),
            "expressed_genes_per_sample_mean": float(n_genes.mean()),
            "expressed_genes_per_sample_min": int(n_genes.min()),
            # Bulk profiles express far more genes than the input holds: only the top ranks count.
            "n_samples_truncated": int((n_genes > size - (2 if version == "V2" else 0)).sum()),
            "ties": "broken by ascending token id (stable sort)",
        }

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        import torch

        tokens, report = self.tokenize(adata)
        self.coverage_ = report
        net = self.network
        n_layers = net["bert"].config.num_hidden_layers
        index = n_layers + self.emb_layer
        version = report["version"]
        pad = self.vocabulary.pad_id
        out = []
        for rows in batch_slices(len(tokens), self.batch_size, desc=MODEL):
            batch = tokens[rows]
            lengths = torch.as_tensor([len(t) for t in batch])
            ids = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long)
            for i, t in enumerate(batch):
                ids[i, : len(t)] = torch.from_numpy(t)
            positions = torch.arange(ids.shape[1])[None, :]
            valid = positions < lengths[:, None]
            hidden = net["bert"](
                input_ids=ids.to(self.device),
                attention_mask=valid.long().to(self.device),
                output_hidden_states=True,
            ).hidden_states[index]
            if report["emb_mode"] == "cls":
                pooled = hidden[:, 0]
            else:
                genes = valid & (positions >= 1) & (positions < lengths[:, None] - 1)
                pooled = masked_mean(hidden, (genes if version == "V2" else valid).to(self.device))
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out, axis=0)


def _dense(M: Any) -> np.ndarray:
    return np.asarray(M.toarray() if sp.issparse(M) else M, dtype=np.float64)


def _has_negative(M: Any) -> bool:
    """True when any value is negative or not finite (NaN must not pass as non-negative)."""
    data = M.data if sp.issparse(M) else np.asarray(M)
    return bool(data.size) and not bool((np.isfinite(data) & (data >= 0)).all())
