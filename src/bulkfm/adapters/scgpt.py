"""scGPT (Cui et al., Nature Methods 2024) as a frozen bulk embedder.

Released checkpoint folder (e.g. ``scGPT_human``, from the links in the README of
github.com/bowang-lab/scGPT): ``args.json`` (model config), ``best_model.pt`` (a
plain state dict, a pickle: loading it needs ``trust_pickle=True``; a
``model.safetensors`` with the same keys is read without it) and ``vocab.json``
(gene symbol -> token id). The network is re-implemented in
:mod:`bulkfm.adapters.scgpt_net` from the public code (scgpt 0.2.4), so bulkfm does
not depend on the ``scgpt`` package, whose ``__init__`` imports scvi-tools and scib.
The package's own model and ``cell_emb`` code do run on current torch once that
``__init__`` is kept from running (torchtext is needed only by 0.2.4's tokenizer,
which the embedding does not use, and no longer by 0.2.5):
``tests/adapters/test_scgpt_official.py`` builds a tiny ``TransformerModel`` and
checks that this adapter reproduces ``get_batch_cell_embeddings`` (to 1.5e-6).

Published embedding procedure (``scgpt.tasks.cell_emb.embed_data`` and
``get_batch_cell_embeddings``, ``DataCollator``, ``preprocess.binning``), as verified
in that code:

- vocabulary: ``vocab.json``; ``<pad>``, ``<cls>``, ``<eoc>`` appended (next ids) when
  absent; data genes not in the vocabulary are dropped. Here the vocabulary symbols
  are mapped to the data's Ensembl ids through the data layer (approved, previous and
  alias symbols), with a coverage report.
- per cell: the genes with a non-zero value only, preceded by ``<cls>`` whose value is
  ``pad_value`` (-2 in the release). The values are whatever ``adata.X`` holds:
  ``embed_data`` does no normalisation. They are binned per cell with ``n_bins`` from
  ``args.json`` (51 in the release, equal to the value the published collator
  hard-codes; ``load`` warns when a config says otherwise): edges =
  ``np.quantile(nonzero, linspace(0, 1, n_bins - 1))``, bin = ``np.digitize`` against
  them, tied values spread uniformly at random over the bins their edges span, so
  bins run 1..n_bins-1. Binning is by rank within a sample, so raw counts,
  counts-per-10k and log1p give the same bins; TPM does not (gene-length scaling
  changes ranks). This adapter therefore uses ``layers["counts"]`` when the data has
  it, else X (TPM), and says which in the coverage report.
- ``max_length`` 1,200 tokens including ``<cls>``: a cell with more genes keeps
  ``<cls>`` and a uniformly random subset of the already-binned genes; padding to the
  batch's longest sequence with ``<pad>``/``pad_value`` and a key padding mask.
- forward through ``_encode`` (continuous value encoder, post-norm layers), output at
  the ``<cls>`` position, divided by its L2 norm.

Bulk defaults (the published recipe stays available as options):

- ``max_length=None`` (default): every expressed vocabulary gene of a sample enters the
  sequence. A bulk profile expresses ~18-24k vocabulary genes (TCGA counts); sampling 1,199 of them
  throws most of the profile away and makes the embedding depend on the draw. With no
  positional encoding, the model sees a set, and the whole set is what the random
  subsets estimate. The cost is attention over the whole set, quadratic in length:
  ~10 s per sample and layer on one CPU core at 20k genes (minutes per sample for the
  12-layer release), so use a GPU, or ``max_length`` on CPU;
  ``scaled_dot_product_attention`` keeps memory linear in length.
  ``max_length=1200, gene_selection="random"`` is the published recipe (seeded here);
  ``max_length=N, gene_selection="top"`` keeps the N-1 highest-valued genes
  (deterministic, cheap on CPU; bins still computed over all expressed genes, as the
  collator bins before it samples).
- Randomness (bin ties, random sampling) comes from a generator seeded by ``seed`` and
  the sample id, so a sample's embedding depends neither on the run nor on its batch.

Faithfulness caveats: the release ran attention with flash-attn in fp16 autocast; this
runs float32 PyTorch attention (same weights, same arithmetic up to rounding; the
``Wqkv`` <-> ``in_proj`` layout is identical). ``embed_data`` always builds the
continuous value encoder and post-norm layers and loads non-strictly; here encoder
keys are checked strictly and the top-level modules it does not use (``decoder``,
``cls_decoder``, ``mvc_decoder``, ...) are ignored. The released ``vocab.json`` and
the full key list of the released ``best_model.pt`` could not be inspected here (no
weights available): the layout follows the code and public issue reports
(bowang-lab/scGPT#173 lists the ``Wqkv`` keys).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from bulkfm import schema as keys
from bulkfm.adapters.base import (
    N_EXAMPLES,
    FoundationEmbedder,
    batch_slices,
    file_digest,
    find_file,
    gene_input,
    load_state_dict_strict,
    read_state_dict,
)
from bulkfm.config import check_bool, check_int
from bulkfm.embedders.registry import register_embedder
from bulkfm.errors import CheckpointError, ConfigError, ExpressionValueError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "ScGPTArgs",
    "ScGPTEmbedder",
    "bin_values",
    "parameter_count",
    "read_vocab",
    "select_tokens",
]

MODEL = "scGPT"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
WEIGHT_FILES = ("model.safetensors", "best_model.safetensors", "best_model.pt")
PUBLISHED_MAX_LENGTH = 1200
PUBLISHED_N_BINS = 51  # hard-coded in the published DataCollator
GENE_SELECTION = ("top", "random")
ROWS_PER_CHUNK = 256  # samples laid out on the vocabulary at a time (memory bound)


# --------------------------------------------------------------------------- config, vocab


@dataclass(frozen=True)
class ScGPTArgs:
    """The fields of a release's ``args.json`` that shape the embedding."""

    embsize: int
    nheads: int
    d_hid: int
    nlayers: int
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    n_bins: int = 51

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "embsize",
        "nheads",
        "d_hid",
        "nlayers",
        "pad_token",
        "pad_value",
    )

    def __post_init__(self) -> None:
        for name in ("embsize", "nheads", "d_hid", "nlayers"):
            check_int(name, getattr(self, name), 1)
        check_int("n_bins", self.n_bins, 3)
        if self.embsize % self.nheads:
            raise CheckpointError(
                f"{MODEL}: args.json has embsize={self.embsize} not divisible by "
                f"nheads={self.nheads}; this is not a scGPT config"
            )
        if not isinstance(self.pad_token, str) or not self.pad_token:
            raise CheckpointError(f"{MODEL}: args.json pad_token must be a token string")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, int | float):
            raise CheckpointError(f"{MODEL}: args.json pad_value must be a number")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ScGPTArgs:
        """Read ``args.json``; missing fields and unsupported styles are errors."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{MODEL}: cannot read {path} as JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{MODEL}: {path} must hold a JSON object (the model config)")
        missing = [k for k in cls.REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(
                f"{MODEL}: {path} lacks {missing}; use the args.json released with the weights"
            )
        style = raw.get("input_emb_style", "continuous")
        if style != "continuous":
            raise CheckpointError(
                f"{MODEL}: input_emb_style={style!r} in {path}; the published embedding "
                "(embed_data) supports the continuous value encoder only"
            )
        if raw.get("pre_norm", False):
            raise CheckpointError(
                f"{MODEL}: pre_norm=true in {path}; the published embedding builds post-norm "
                "layers only"
            )
        fields = {k: raw[k] for k in (*cls.REQUIRED, "n_bins") if k in raw}
        try:
            return cls(**fields)
        except ConfigError as exc:
            raise CheckpointError(f"{MODEL}: bad value in {path}: {exc}") from exc


def read_vocab(path: str | os.PathLike, pad_token: str = "<pad>") -> dict[str, int]:
    """Token -> id from ``vocab.json``, with the special tokens appended as scGPT does."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{MODEL}: cannot read {path} as JSON: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{MODEL}: {path} must be a non-empty JSON object token -> id")
    bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int)][:5]
    if bad:
        raise CheckpointError(f"{MODEL}: {path} has non-integer ids for {bad}")
    ids = sorted(raw.values())
    if ids != list(range(len(ids))):
        raise CheckpointError(
            f"{MODEL}: the ids in {path} are not 0..{len(ids) - 1} without gaps or repeats; "
            "scGPT vocabularies are consecutive: use the vocab.json released with the weights"
        )
    vocab = dict(raw)
    for token in dict.fromkeys((pad_token, *SPECIAL_TOKENS)):
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def _is_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


# --------------------------------------------------------------------------- preprocessing


def bin_values(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT's per-sample binning of positive values into 1..n_bins-1.

    Edges are the ``n_bins - 1`` evenly spaced quantiles of the values; a value gets
    the ``np.digitize`` index (left side); a value equal to several coinciding edges
    (ties) is spread uniformly at random over the bins those edges span, exactly as
    ``scgpt.preprocess._digitize(side="both")``, drawing from ``rng`` instead of the
    global numpy state.
    """
    x = np.asarray(values, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError("bin_values takes one sample's values (1-D)")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (x <= 0).any():
        raise ExpressionValueError("bin_values takes the non-zero (positive) values only")
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    spread = rng.random(x.size) * (right - left) + left
    return np.ceil(spread).astype(np.int64)


def select_tokens(
    values: np.ndarray,
    present: np.ndarray,
    *,
    n_bins: int,
    max_length: int | None,
    gene_selection: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the vocabulary genes) and bins of one sample's gene tokens.

    Expressed genes (present, non-zero) are binned first, then, when they exceed
    ``max_length - 1`` (one slot is ``<cls>``), ``"random"`` keeps a uniform random
    subset (published) and ``"top"`` the highest-valued ones (ties by vocabulary
    order). Positions come back in vocabulary order except for a random draw, whose
    order is the draw's (order is irrelevant: scGPT has no positional encoding).
    """
    pos = np.flatnonzero(present & (values != 0))
    bins = bin_values(values[pos], n_bins, rng)
    if max_length is not None and pos.size > max_length - 1:
        keep = max_length - 1
        if gene_selection == "random":
            pick = rng.permutation(pos.size)[:keep]
        else:
            pick = np.sort(np.argsort(-values[pos], kind="stable")[:keep])
        pos, bins = pos[pick], bins[pick]
    return pos, bins


# --------------------------------------------------------------------------- the embedder


@dataclass
class _Release:
    args: ScGPTArgs
    vocab: dict[str, int]
    genes: list[str]  # vocabulary gene tokens (specials excluded), in id order
    gene_ids: np.ndarray  # token id of each of ``genes``
    weights: Path


@register_embedder("scgpt")
class ScGPTEmbedder(FoundationEmbedder):
    """scGPT cell embedding (``<cls>`` output, L2-normalised) of bulk samples.

    Options: ``max_length`` (tokens including ``<cls>``; None = every expressed
    vocabulary gene, the default; 1200 = published), ``gene_selection`` ("top" or the
    published "random", used only when a sample exceeds ``max_length``), ``seed``
    (bin ties and random sampling), ``layer`` ("auto": ``layers["counts"]`` when
    present, else X; or a layer name, or "X"), ``l2_normalize`` (published: True).
    """

    model_name: ClassVar[str] = MODEL
    extra: ClassVar[str] = "scgpt"

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        max_length: int | None = None,
        gene_selection: str = "top",
        seed: int = 0,
        layer: str | None = "auto",
        l2_normalize: bool = True,
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
        self.max_length = None if max_length is None else check_int("max_length", max_length, 2)
        if gene_selection not in GENE_SELECTION:
            raise ConfigError(
                f"gene_selection={gene_selection!r}: choose 'top' (highest values, "
                "deterministic) or 'random' (published scGPT sampling)"
            )
        self.gene_selection = gene_selection
        self.seed = check_int("seed", seed, 0)
        check_bool("l2_normalize", l2_normalize)
        self.l2_normalize = l2_normalize
        self._release: _Release | None = None

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_length": self.max_length,
            "gene_selection": self.gene_selection,
            "seed": self.seed,
            "l2_normalize": self.l2_normalize,
        }
        if self.path.is_file():  # the side files are not in the weights file's digest
            folder = self.path.parent
            out["files"] = {
                name: file_digest(find_file(folder, [name], what=what, model=MODEL))
                for name, what in (("args.json", "config"), ("vocab.json", "vocabulary"))
            }
        return out

    # ----------------------------------------------------------------- loading

    def release(self) -> _Release:
        """Config, vocabulary and weights file of the checkpoint folder."""
        if self._release is None:
            folder = self.path if self.path.is_dir() else self.path.parent
            weights = find_file(self.path, WEIGHT_FILES, what="weights", model=MODEL)
            args = ScGPTArgs.from_json(find_file(folder, ["args.json"], what="config", model=MODEL))
            vocab = read_vocab(
                find_file(folder, ["vocab.json"], what="vocabulary", model=MODEL), args.pad_token
            )
            genes = [
                t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if not _is_special(t)
            ]
            gene_ids = np.array([vocab[g] for g in genes], dtype=np.int64)
            self._release = _Release(args, vocab, genes, gene_ids, weights)
        return self._release

    def load(self) -> Any:
        from bulkfm.adapters.scgpt_net import ScGPTEncoder, canonical_state, unused_prefixes

        rel = self.release()
        a = rel.args
        if a.n_bins != PUBLISHED_N_BINS:
            logger.warning(
                "%s: args.json has n_bins=%d, the published collator bins into %d; "
                "embeddings follow args.json and may not match the released model's training",
                MODEL,
                a.n_bins,
                PUBLISHED_N_BINS,
            )
        state = canonical_state(
            read_state_dict(rel.weights, trust_pickle=self.trust_pickle, model=MODEL)
        )
        net = ScGPTEncoder(len(rel.vocab), a.embsize, a.nheads, a.d_hid, a.nlayers)
        ignore = unused_prefixes(state)
        if ignore:
            logger.info("%s: not used for embeddings, ignored: %s", MODEL, ", ".join(ignore))
        load_state_dict_strict(net, state, model=MODEL, ignore=ignore)
        return net

    # ----------------------------------------------------------------- embedding

    def _rng(self, sample_id: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(sample_id.encode("utf-8"))])

    def embed(self, adata: ad.AnnData) -> np.ndarray:
        net = self.network
        rel = self.release()
        layer = self.source_layer(adata)
        out = np.zeros((adata.n_obs, rel.args.embsize), dtype=np.float32)
        lengths: list[int] = []
        report: dict[str, Any] | None = None
        for rows in batch_slices(adata.n_obs, ROWS_PER_CHUNK, desc=MODEL):
            g = gene_input(
                adata,
                rel.genes,
                id_type="symbol",
                layer=layer,
                model=MODEL,
                min_fraction=self.min_coverage,
                rows=rows,
            )
            report = report or g.report
            if (g.values < 0).any():
                raise ExpressionValueError(
                    f"{MODEL}: the input ({g.report['source']}) has negative values; scGPT "
                    "expects non-negative expression (counts or TPM), not centred or scaled data"
                )
            self._check_expressed(g.values, g.present, adata.obs_names[rows])
            tokens = []
            for i, sample in enumerate(adata.obs_names[rows]):
                pos, bins = select_tokens(
                    g.values[i],
                    g.present[i],
                    n_bins=rel.args.n_bins,
                    max_length=self.max_length,
                    gene_selection=self.gene_selection,
                    rng=self._rng(str(sample)),
                )
                lengths.append(int(np.count_nonzero(g.present[i] & (g.values[i] != 0))))
                tokens.append((rel.gene_ids[pos], bins.astype(np.float32)))
            out[rows] = self._forward(net, tokens)
        self.coverage_ = self._report(report or {}, layer, lengths)
        return out

    @staticmethod
    def _check_expressed(values: np.ndarray, present: np.ndarray, names: Any) -> None:
        """Refuse samples with no expressed vocabulary gene (the published collator fails)."""
        empty = np.flatnonzero(~(present & (values != 0)).any(axis=1))
        if len(empty):
            raise ExpressionValueError(
                f"{MODEL}: {len(empty)} samples express none of the model's genes (e.g. "
                f"{[str(n) for n in names[empty[:N_EXAMPLES]]]}); remove them or check that "
                "their values were read"
            )

    def _forward(self, net: Any, tokens: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """CLS outputs of token sequences, batched by similar length (less padding)."""
        import torch

        rel = self.release()
        pad_id, cls_id = rel.vocab[rel.args.pad_token], rel.vocab["<cls>"]
        pad_value = float(rel.args.pad_value)
        out = np.zeros((len(tokens), rel.args.embsize), dtype=np.float32)
        order = np.argsort([len(t[0]) for t in tokens], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = 1 + max(len(tokens[i][0]) for i in idx)
            genes = torch.full((len(idx), width), pad_id, dtype=torch.long)
            values = torch.full((len(idx), width), pad_value, dtype=torch.float32)
            genes[:, 0] = cls_id
            for r, i in enumerate(idx):
                ids, bins = tokens[i]
                genes[r, 1 : 1 + len(ids)] = torch.from_numpy(ids)
                values[r, 1 : 1 + len(ids)] = torch.from_numpy(bins)
            genes, values = genes.to(self.device), values.to(self.device)
            cls = net(genes, values, genes.eq(pad_id))[:, 0].float()
            if self.l2_normalize:
                cls = torch.nn.functional.normalize(cls, dim=1)
            out[idx] = cls.cpu().numpy()
        return out

    def _report(self, report: dict[str, Any], layer: str | None, lengths: list[int]) -> dict:
        """Coverage record plus what the model was fed."""
        n_long = (
            0 if self.max_length is None else int(sum(n > self.max_length - 1 for n in lengths))
        )
        return {
            **report,
            "input": _input_note(layer),
            "n_expressed_tokens": {
                "min": int(min(lengths)),
                "median": float(np.median(lengths)),
                "max": int(max(lengths)),
            },
            "max_length": self.max_length,
            "gene_selection": self.gene_selection,
            "n_samples_subsampled": n_long,
            "n_bins": self.release().args.n_bins,
        }


def _input_note(layer: str | None) -> str:
    if layer == keys.COUNTS:
        return "layers['counts']: raw counts (binning is by rank within a sample)"
    if layer is None:
        return "X: TPM (no counts layer; TPM ranks differ from count ranks by gene length)"
    return f"layers[{layer!r}]"


def parameter_count(args: ScGPTArgs, ntoken: int) -> int:
    """Parameters of the embedding path (no decoders), from the config alone."""
    d, h = args.embsize, args.d_hid
    layer = (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + 4 * d
    encoders = ntoken * d + 2 * d + (d + d) + (d * d + d) + 2 * d
    return int(encoders + args.nlayers * layer)
