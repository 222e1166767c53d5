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
entries with one tag has its contents concatenated, as MindSpore does.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bulkfm.config import check_int
from bulkfm.errors import CheckpointError, ConfigError

__all__ = ["CellFMConfig", "CellFMNet", "read_mindspore_checkpoint"]

# MindSpore's nn.LayerNorm default epsilon (the release never overrides it).
LAYER_NORM_EPS = 1e-7
# Width of the hidden layer of the value encoder's FFN (model.py, FFN(b=256)).
VALUE_HIDDEN = 256
# MindSpore's nn.LeakyReLU default slope (0.2, not PyTorch's 0.01; MindSpore 2.2 as released).
LEAKY_SLOPE = 0.2

_MS_DTYPES: dict[str, np.dtype] = {
    "Float32": np.dtype("<f4"),
    "Float16": np.dtype("<f2"),
    "Float64": np.dtype("<f8"),
    "Int8": np.dtype("i1"),
    "Int16": np.dtype("<i2"),
    "Int32": np.dtype("<i4"),
    "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"),
    "Bool": np.dtype("?"),
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


def _index(buf: memoryview) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    pos, end = 0, len(buf)
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
    moments stored beside the weights cost nothing.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                entries = _index(buf)
                out = {
                    name: _materialise(buf, name, e) for name, e in entries.items() if keep(name)
                }
            finally:
                buf.release()
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
    return out


def _materialise(buf: memoryview, name: str, entry: _Entry) -> torch.Tensor:
    dtype = _MS_DTYPES.get(entry.dtype)
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unsupported type {entry.dtype!r}")
    # Check the size the header promises before copying anything.
    n_bytes = sum(n for _, n in entry.chunks)
    expected = math.prod(entry.dims) * dtype.itemsize
    if n_bytes != expected:
        raise ValueError(
            f"tensor {name!r}: {n_bytes} bytes for shape {entry.dims} of {entry.dtype}"
        )
    raw = b"".join(bytes(buf[s : s + n]) for s, n in entry.chunks)
    arr = np.frombuffer(raw, dtype=dtype)
    arr = arr.reshape(entry.dims) if entry.dims else arr
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class CellFMConfig:
    """Sizes of a CellFM encoder (80M release: 27,855 genes, 1536 wide, 2 layers, 48 heads)."""

    n_genes: int
    dims: int
    n_layers: int
    n_heads: int

    def __post_init__(self) -> None:
        for name in ("n_genes", "dims", "n_layers", "n_heads"):
            check_int(f"CellFM: {name}", getattr(self, name), 1)
        if self.dims % self.n_heads:
            raise ConfigError(
                f"CellFM: width {self.dims} is not divisible by num_heads={self.n_heads}; the "
                "released models use 48 heads"
            )

    @property
    def embedding_rows(self) -> int:
        """Rows of ``gene_emb``: genes + the padding id 0, rounded up to a multiple of 8."""
        return self.n_genes + 1 + (-self.n_genes - 1) % 8


def _srms(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS scaling over the last axis (CellFM's SRMSNorm)."""
    x32 = x.float()
    rms = torch.linalg.vector_norm(x32 / math.sqrt(x.shape[-1]), dim=-1, keepdim=True)
    return (x32 / rms.clamp_min(1e-12)).to(x.dtype)


class _LayerNorm(nn.Module):
    """LayerNorm with MindSpore's parameter names (gamma, beta) and epsilon."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dims))
        self.beta = nn.Parameter(torch.zeros(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.gamma, self.beta, LAYER_NORM_EPS)


def _dense(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class _ValueFFN(nn.Module):
    """Scalar expression -> vector: a soft lookup into a learned table."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.w1 = _dense(1, VALUE_HIDDEN)
        self.w3 = _dense(VALUE_HIDDEN, VALUE_HIDDEN)
        self.table = _dense(VALUE_HIDDEN, dims)
        self.a = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.w1(x), LEAKY_SLOPE)
        h = self.w3(h) + h * self.a
        return self.table(torch.softmax(h, dim=-1))


class _ValueEncoder(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.value_enc = _ValueFFN(dims)
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

    def __init__(self, dims: int, heads: int, n_layers: int) -> None:
        super().__init__()
        self.attn = _Retention(dims, heads)
        self.ffn = _GatedBilinear(dims)
        self.post_norm1 = _LayerNorm(dims)
        self.post_norm2 = _LayerNorm(dims)
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
        self.value_enc = _ValueEncoder(d)
        self.encoder = nn.ModuleList(
            _RetentionLayer(d, config.n_heads, config.n_layers) for _ in range(config.n_layers)
        )

    def forward(
        self, genes: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states [batch, 1 + length, dims]; position 0 is the CLS token.

        ``genes`` are 1-based vocabulary ids (0 = padding), ``values`` the normalised
        expression, ``valid`` marks real genes. Padding is zeroed and excluded from the
        retention keys in every layer, so a sample's output does not depend on how
        much padding its batch needs.
        """
        b = genes.shape[0]
        n_valid = valid.sum(dim=1).to(values.dtype)
        v_scale = torch.rsqrt(n_valid).view(b, 1, 1, 1)
        x = self.gene_emb[genes] + self.value_enc(values)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        keep = torch.cat([valid.new_ones(b, 1), valid], dim=1).to(x.dtype)
        x = x * keep.unsqueeze(-1)
        mask = keep.view(b, 1, -1, 1)
        for layer in self.encoder:
            x = layer(x, mask, v_scale)
        return x
