"""CellFM's encoder in PyTorch, and a reader for MindSpore ``.ckpt`` files.

Imported only by :mod:`bulkfm.adapters.cellfm` when it loads a model (torch is
needed here, not at ``import bulkfm.adapters``). Parameter names are the ones of
the MindSpore release (``gene_emb``, ``cls_token``, ``value_enc.value_enc.w1.weight``,
``encoder.0.attn.q_proj.weight``, ``encoder.0.post_norm1.gamma`` ...), so a released
checkpoint loads without renaming. See the adapter module for what was verified and
where in the authors' code.

The MindSpore checkpoint is a protocol-buffer file (``checkpoint.proto``, proto2)::

    message Checkpoint { repeated Value value = 1; }
    message Value { required string tag = 1; TensorProto tensor = 2; ... }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

It is parsed here from the wire format directly (no MindSpore, no ``protobuf``
package, and nothing in it can execute code). A tensor split over several ``Value``
entries with one tag has its contents concatenated, as MindSpore does. What else
``mindspore.save_checkpoint`` writes, and how it is read here (MindSpore 2.x
``train/serialization.py``):

* ``crc_check=True`` appends a 17-byte trailer, ``b"crc_num"`` and the CRC-32 of all
  bytes before it as a 10-byte big-endian integer. The CRC is verified; a mismatch
  is an error (a damaged download).
* ``append_dict`` strings are entries of type ``"str"`` with dims ``[0]`` whose
  content is the numpy UTF-32 text. They are decoded and returned apart from the
  tensors (:func:`read_mindspore_entries`).
* ``BFloat16`` tensors (no numpy dtype) are read bit-exactly as ``torch.bfloat16``.
* dims ``[0]`` on a tensor means a scalar, as MindSpore's loader reads it.

Two official forward passes exist, and :class:`CellFMConfig` selects one:
``variant="mindspore"`` is the authors' MindSpore ``Backbone`` as the released
weights were trained and as their tutorials embed (CLS + genes; LayerNorm epsilon
1e-7, LeakyReLU slope 0.2, the MindSpore defaults; V scaled by 1/sqrt(#genes)).
``variant="pytorch_port"`` is ``FinetuneModel.encode`` of the authors' port
(github.com/biomed-AI/CellFM-torch): CLS, then the two learned ``ST_emb`` tokens,
then genes; PyTorch defaults (epsilon 1e-5, slope 0.01); V scaled by
1/sqrt(#genes - 3 + 1e-6), as the port computes it.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bulkfm.config import check_int
from bulkfm.errors import CheckpointError, ConfigError

__all__ = [
    "VARIANTS",
    "CellFMConfig",
    "CellFMNet",
    "read_mindspore_checkpoint",
    "read_mindspore_entries",
]

# MindSpore's nn.LayerNorm default epsilon (the release never overrides it).
LAYER_NORM_EPS = 1e-7
# Width of the hidden layer of the value encoder's FFN (model.py, FFN(b=256)).
VALUE_HIDDEN = 256
# MindSpore's nn.LeakyReLU default slope (0.2, not PyTorch's 0.01; MindSpore 2.2 as released).
LEAKY_SLOPE = 0.2
# The two official forward passes: (LayerNorm eps, LeakyReLU slope, ST tokens, V-scale offset).
VARIANTS: dict[str, tuple[float, float, bool, float]] = {
    "mindspore": (LAYER_NORM_EPS, LEAKY_SLOPE, False, 0.0),
    # CellFM-torch: nn.LayerNorm / nn.LeakyReLU defaults; rsqrt(n - 3 + 1e-6) in encode.
    "pytorch_port": (1e-5, 0.01, True, 3.0 - 1e-6),
}
# crc_check=True trailer: b"crc_num" + CRC-32 of everything before, 10 bytes big-endian.
_CRC_MARK = b"crc_num"
_CRC_TRAILER = len(_CRC_MARK) + 10

_MS_DTYPES: dict[str, np.dtype] = {
    "Float32": np.dtype("<f4"),
    "Float16": np.dtype("<f2"),
    "Float64": np.dtype("<f8"),
    "Int8": np.dtype("i1"),
    "Int16": np.dtype("<i2"),
    "Int32": np.dtype("<i4"),
    "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"),
    "UInt16": np.dtype("<u2"),
    "UInt32": np.dtype("<u4"),
    "UInt64": np.dtype("<u8"),
    "Bool": np.dtype("?"),
    # No numpy bfloat16: the raw 16-bit words are reinterpreted in torch (_materialise).
    "BFloat16": np.dtype("<i2"),
}


# --------------------------------------------------------------------------- checkpoint file


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or over-long varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _within(pos: int, n: int, end: int) -> int:
    """End of an ``n``-byte field starting at ``pos``; a field may not outrun its message,
    so a hostile length can never make the reader copy more than the file holds."""
    if pos + n > end:
        raise ValueError("a field runs past the end of its message")
    return pos + n


def _skip(buf: memoryview, pos: int, end: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos, end)[1]
    if wire == 1:
        return _within(pos, 8, end)
    if wire == 2:
        length, pos = _varint(buf, pos, end)
        return _within(pos, length, end)
    if wire == 5:
        return _within(pos, 4, end)
    raise ValueError(f"unsupported protobuf wire type {wire}")


@dataclass
class _Entry:
    dims: tuple[int, ...]
    dtype: str
    chunks: list[tuple[int, int]]


def _tensor_proto(buf: memoryview, pos: int, end: int) -> tuple[list[int], str, int, int]:
    dims: list[int] = []
    dtype = ""
    start = length = -1
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            d, pos = _varint(buf, pos, end)
            dims.append(d)
        elif field == 1 and wire == 2:  # packed dims
            n, pos = _varint(buf, pos, end)
            stop = _within(pos, n, end)
            while pos < stop:
                d, pos = _varint(buf, pos, stop)
                dims.append(d)
        elif field == 2 and wire == 2:
            n, pos = _varint(buf, pos, end)
            dtype = bytes(buf[pos : _within(pos, n, end)]).decode("utf-8")
            pos += n
        elif field == 3 and wire == 2:
            length, pos = _varint(buf, pos, end)
            start = pos
            pos = _within(pos, length, end)
        else:
            pos = _skip(buf, pos, end, wire)
    return dims, dtype, start, length


def _payload_end(buf: memoryview) -> int:
    """End of the protobuf message: before a verified ``crc_check`` trailer, if any."""
    end = len(buf)
    if end < _CRC_TRAILER or bytes(buf[end - _CRC_TRAILER : end - 10]) != _CRC_MARK:
        return end
    stored = int.from_bytes(bytes(buf[end - 10 :]), "big")
    payload = end - _CRC_TRAILER
    actual = zlib.crc32(buf[:payload])
    if actual != stored:
        raise _CrcError(
            f"the CRC-32 the file stores ({stored}) does not match its contents ({actual}): "
            "the file is damaged or incomplete; download the checkpoint again"
        )
    return payload


class _CrcError(ValueError):
    """A checkpoint whose crc_check trailer does not match its contents."""


def _index(buf: memoryview) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    pos, end = 0, _payload_end(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        if key != (1 << 3 | 2):  # anything but Checkpoint.value
            pos = _skip(buf, pos, end, key & 7)
            continue
        n, pos = _varint(buf, pos, end)
        stop = _within(pos, n, end)
        tag, tensor = None, None
        while pos < stop:
            sub, pos = _varint(buf, pos, stop)
            if sub == (1 << 3 | 2):
                m, pos = _varint(buf, pos, stop)
                tag = bytes(buf[pos : _within(pos, m, stop)]).decode("utf-8")
                pos += m
            elif sub == (2 << 3 | 2):
                m, pos = _varint(buf, pos, stop)
                tensor = _tensor_proto(buf, pos, _within(pos, m, stop))
                pos += m
            else:
                pos = _skip(buf, pos, stop, sub & 7)
        if tag is None or tensor is None or tensor[2] < 0:
            continue  # not a dense tensor (e.g. a map tensor): nothing CellFM needs
        dims, dtype, start, length = tensor
        if tag in entries:
            entries[tag].chunks.append((start, length))
        else:
            entries[tag] = _Entry(tuple(dims), dtype, [(start, length)])
    return entries


def read_mindspore_checkpoint(
    path: str | os.PathLike, *, keep: Callable[[str], bool] = lambda _: True
) -> dict[str, torch.Tensor]:
    """Tensors of a MindSpore ``.ckpt`` whose name passes ``keep``.

    Only the kept tensors are copied out of the (memory-mapped) file, so optimiser
    moments stored beside the weights cost nothing. String entries (``append_dict``)
    are left out; :func:`read_mindspore_entries` returns them too.
    """
    return read_mindspore_entries(path, keep=keep)[0]


def read_mindspore_entries(
    path: str | os.PathLike, *, keep: Callable[[str], bool] = lambda _: True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string entries of a MindSpore ``.ckpt`` whose name passes ``keep``."""
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                entries = _index(buf)
                out = {
                    name: _materialise(buf, name, e)
                    for name, e in entries.items()
                    if keep(name) and e.dtype != "str"
                }
                strings = {
                    name: _string(buf, name, e)
                    for name, e in entries.items()
                    if keep(name) and e.dtype == "str"
                }
            finally:
                buf.release()
    except _CrcError as exc:
        raise CheckpointError(f"CellFM: {path}: {exc}") from exc
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(
            f"CellFM: {path} is not a readable MindSpore checkpoint ({exc}); pass the released "
            "CellFM .ckpt (not encrypted) or a .safetensors file with the same tensor names"
        ) from exc
    if not entries:
        raise CheckpointError(
            f"CellFM: {path} holds no tensors; it is not a MindSpore checkpoint. Pass the "
            "released CellFM .ckpt or a .safetensors file with the same tensor names"
        )
    return out, strings


def _string(buf: memoryview, name: str, entry: _Entry) -> str:
    """An ``append_dict`` string: numpy ``<U`` text, i.e. UTF-32-LE code points."""
    raw = b"".join(bytes(buf[s : s + n]) for s, n in entry.chunks)
    if len(raw) % 4:
        raise ValueError(f"string entry {name!r} has {len(raw)} bytes, not a multiple of 4")
    return raw.decode("utf-32-le").rstrip("\x00")


def _materialise(buf: memoryview, name: str, entry: _Entry) -> torch.Tensor:
    dtype = _MS_DTYPES.get(entry.dtype)
    if dtype is None:
        raise ValueError(
            f"tensor {name!r} has unsupported type {entry.dtype!r} (readable: {sorted(_MS_DTYPES)})"
        )
    # MindSpore's loader reads dims [0] as a scalar.
    dims = () if entry.dims == (0,) else entry.dims
    # Check the size the header promises before copying anything.
    n_bytes = sum(n for _, n in entry.chunks)
    expected = math.prod(dims) * dtype.itemsize
    if n_bytes != expected:
        raise ValueError(f"tensor {name!r}: {n_bytes} bytes for shape {dims} of {entry.dtype}")
    raw = b"".join(bytes(buf[s : s + n]) for s, n in entry.chunks)
    arr = np.frombuffer(raw, dtype=dtype).reshape(dims)
    tensor = torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))
    return tensor.view(torch.bfloat16) if entry.dtype == "BFloat16" else tensor


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class CellFMConfig:
    """Sizes of a CellFM encoder (80M release: 27,855 genes, 1536 wide, 2 layers, 48 heads)."""

    n_genes: int
    dims: int
    n_layers: int
    n_heads: int
    variant: str = "mindspore"

    def __post_init__(self) -> None:
        for name in ("n_genes", "dims", "n_layers", "n_heads"):
            check_int(f"CellFM: {name}", getattr(self, name), 1)
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"CellFM: variant={self.variant!r}; choose 'mindspore' (the released weights' "
                "own forward pass, default) or 'pytorch_port' (CellFM-torch's encode)"
            )
        if self.dims % self.n_heads:
            raise ConfigError(
                f"CellFM: width {self.dims} is not divisible by num_heads={self.n_heads}; the "
                "released models use 48 heads"
            )

    @property
    def embedding_rows(self) -> int:
        """Rows of ``gene_emb``: genes + the padding id 0, rounded up to a multiple of 8."""
        return self.n_genes + 1 + (-self.n_genes - 1) % 8

    @property
    def layer_norm_eps(self) -> float:
        return VARIANTS[self.variant][0]

    @property
    def leaky_slope(self) -> float:
        return VARIANTS[self.variant][1]

    @property
    def st_tokens(self) -> bool:
        """Whether the two ``ST_emb`` tokens follow the CLS token (the PyTorch port)."""
        return VARIANTS[self.variant][2]

    @property
    def v_scale_offset(self) -> float:
        """V is scaled by 1 / sqrt(#genes - offset)."""
        return VARIANTS[self.variant][3]


def _srms(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS scaling over the last axis (CellFM's SRMSNorm)."""
    x32 = x.float()
    rms = torch.linalg.vector_norm(x32 / math.sqrt(x.shape[-1]), dim=-1, keepdim=True)
    return (x32 / rms.clamp_min(1e-12)).to(x.dtype)


class _LayerNorm(nn.Module):
    """LayerNorm with MindSpore's parameter names (gamma, beta) and the variant's epsilon."""

    def __init__(self, dims: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dims))
        self.beta = nn.Parameter(torch.zeros(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.gamma, self.beta, self.eps)


def _dense(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class _ValueFFN(nn.Module):
    """Scalar expression -> vector: a soft lookup into a learned table."""

    def __init__(self, dims: int, slope: float = LEAKY_SLOPE) -> None:
        super().__init__()
        self.w1 = _dense(1, VALUE_HIDDEN)
        self.w3 = _dense(VALUE_HIDDEN, VALUE_HIDDEN)
        self.table = _dense(VALUE_HIDDEN, dims)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.w1(x), self.slope)
        h = self.w3(h) + h * self.a
        return self.table(torch.softmax(h, dim=-1))


class _ValueEncoder(nn.Module):
    def __init__(self, dims: int, slope: float = LEAKY_SLOPE) -> None:
        super().__init__()
        self.value_enc = _ValueFFN(dims, slope)
        # Embedding of masked values in pre-training; unused for embedding (nothing masked).
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, dims))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.value_enc(values.unsqueeze(-1))


class _Retention(nn.Module):
    """Multi-head linear retention: ReLU kernels, no softmax, no decay, gated output."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = _dense(dims, dims)
        self.k_proj = _dense(dims, dims)
        self.v_proj = _dense(dims, dims)
        self.u_proj = _dense(dims, dims)
        self.o_proj = _dense(dims, dims)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        scale = math.sqrt(d // self.heads)
        q = torch.relu(self._split(self.q_proj(x))) / scale
        k = torch.relu(self._split(self.k_proj(x))) * mask / scale
        v = self._split(self.v_proj(x)) * v_scale
        u = nn.functional.silu(self._split(self.u_proj(x)))
        out = _srms(q @ (k.transpose(-1, -2) @ v)) * u
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class _GatedBilinear(nn.Module):
    """CellFM's feed-forward: o(u(x) * v(x)), no activation."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.u_proj = _dense(dims, dims)
        self.v_proj = _dense(dims, dims)
        self.o_proj = _dense(dims, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class _RetentionLayer(nn.Module):
    """Post-norm block with DeepNorm-style residual scaling alpha = (2 L)^(1/4)."""

    def __init__(self, dims: int, heads: int, n_layers: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.attn = _Retention(dims, heads)
        self.ffn = _GatedBilinear(dims)
        self.post_norm1 = _LayerNorm(dims, eps)
        self.post_norm2 = _LayerNorm(dims, eps)
        self.alpha = (2 * n_layers) ** 0.25

    def forward(self, x: torch.Tensor, mask: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
        x = self.post_norm1(x * self.alpha + self.attn(x, mask, v_scale))
        return self.post_norm2(x * self.alpha + self.ffn(x))


class CellFMNet(nn.Module):
    """CellFM's encoder (the authors' ``Backbone``): genes + values + CLS -> retention stack."""

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dims
        self.gene_emb = nn.Parameter(torch.zeros(config.embedding_rows, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if config.st_tokens:
            self.ST_emb = nn.Parameter(torch.zeros(1, 2, d))
        self.value_enc = _ValueEncoder(d, config.leaky_slope)
        self.encoder = nn.ModuleList(
            _RetentionLayer(d, config.n_heads, config.n_layers, config.layer_norm_eps)
            for _ in range(config.n_layers)
        )
        # Leading tokens before the genes: CLS (and the two ST tokens in the port).
        self.n_lead = 3 if config.st_tokens else 1

    def forward(
        self, genes: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [batch, n_lead + length, dims]; position 0 is the CLS token.

        ``genes`` are 1-based vocabulary ids (0 = padding), ``values`` the normalised
        expression, ``valid`` marks real genes. Padding is zeroed and excluded from the
        retention keys in every layer, so a sample's output does not depend on how
        much padding its batch needs. In the PyTorch-port variant the two ``ST_emb``
        tokens follow the CLS token, as its ``encode`` places them.
        """
        b = genes.shape[0]
        n_valid = valid.sum(dim=1).to(values.dtype)
        v_scale = torch.rsqrt(n_valid - self.config.v_scale_offset).view(b, 1, 1, 1)
        x = self.gene_emb[genes] + self.value_enc(values)
        lead = [self.cls_token.expand(b, -1, -1)]
        if self.config.st_tokens:
            lead.append(self.ST_emb.expand(b, -1, -1))
        x = torch.cat([t.to(x.dtype) for t in lead] + [x], dim=1)
        keep = torch.cat([valid.new_ones(b, self.n_lead), valid], dim=1).to(x.dtype)
        x = x * keep.unsqueeze(-1)
        mask = keep.view(b, 1, -1, 1)
        for layer in self.encoder:
            x = layer(x, mask, v_scale)
        return x
