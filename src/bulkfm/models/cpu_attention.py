"""Exact CPU attention for head size 32, compiled from C on first use.

BulkRNABert's heads have size 32. For that size torch's CPU flash kernel reaches about
two thirds of the machine's matmul rate; the kernel in ``cpu_attention.c`` (AVX2 + FMA,
online softmax, register-tiled products, a polynomial exponential accurate to float32
rounding) reaches more, with the same bounded memory. It is used for inference only:
float32 CPU tensors, no autograd, no mask, no attention maps. Everything else, and
every machine where the kernel cannot be built, runs ``scaled_dot_product_attention``.

The library is built once per source version with the system C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``) into a per-user cache, written atomically, and
loaded through :mod:`ctypes`; it needs no torch headers and compiles in about a
second. Without a compiler, on a non-x86-64 machine, on a CPU without AVX2 or outside
Linux and macOS, bulkfm uses SDPA and :func:`status` says why.

Environment:

- ``BULKFM_CPU_ATTENTION``: ``auto`` (default) uses the kernel where it applies;
  ``off`` always uses SDPA (also ``0``, ``false``, ``sdpa``).
- ``BULKFM_KERNEL_CACHE``: where the compiled library is kept (default
  ``$XDG_CACHE_HOME/bulkfm/kernels``, else ``~/.cache/bulkfm/kernels``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from bulkfm.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_SWITCH = "BULKFM_CPU_ATTENTION"
ENV_CACHE = "BULKFM_KERNEL_CACHE"
HEAD_SIZE = 32
KEY_GROUP = 16  # keys per packed group (the kernel's register tile width)
MIN_LENGTH = 64  # below this, SDPA's lower call overhead wins
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread")
OPENMP_FLAG = "-fopenmp"  # tried first; a compiler without OpenMP builds the pthread variant
COMPILE_TIMEOUT_S = 120

_ON = {"auto", "on", "1", "true", "yes", ""}
_OFF = {"off", "0", "false", "no", "sdpa"}


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernel can run here, and if not, why (``reason``)."""

    available: bool
    reason: str
    library: str | None = None
    openmp: bool = False


_lock = threading.Lock()
_status: KernelStatus | None = None
_lib: ctypes.CDLL | None = None
_disabled_depth = 0


def enabled() -> bool:
    """The ``BULKFM_CPU_ATTENTION`` switch (and :func:`disabled`), without building."""
    if _disabled_depth:
        return False
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(
        f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not understood: "
        "use 'auto' (the default) or 'off'"
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, attention runs through SDPA (for comparisons and tests).

    Process-wide: it also holds for other threads while the block runs."""
    global _disabled_depth
    with _lock:
        _disabled_depth += 1
    try:
        yield
    finally:
        with _lock:
            _disabled_depth -= 1


def status() -> KernelStatus:
    """Build and load the kernel if not done yet; say whether it is available."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _build_and_load()
                if _status.available:
                    logger.info("CPU attention: bulkfm kernel, %s", _status.library)
                else:
                    logger.info("CPU attention kernel unavailable (%s); using SDPA", _status.reason)
    return _status


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when :func:`attention` should compute this call instead of SDPA."""
    if not (q.device.type == k.device.type == v.device.type == "cpu"):
        return False
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        return False
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return False
    if q.shape[-1] != HEAD_SIZE or q.shape[-2] < MIN_LENGTH:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return enabled() and status().available


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(32)) v`` for [batch, heads, length, 32] float32 CPU tensors.

    The inputs may be strided views (e.g. heads split off a [batch, length, heads * 32]
    projection) as long as the last dimension is contiguous. The result is a
    [batch, heads, length, 32] view of a [batch, length, heads, 32] tensor, so merging
    the heads afterwards needs no copy. Uses ``torch.get_num_threads()`` threads.
    """
    info = status()
    if not info.available or _lib is None:
        raise RuntimeError(f"the CPU attention kernel is not available: {info.reason}")
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4 or q.shape[-1] != HEAD_SIZE:
        raise ValueError(
            f"q, k and v must share one [batch, heads, length, {HEAD_SIZE}] shape, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}: the CPU kernel takes float32 CPU "
                "tensors (use torch.nn.functional.scaled_dot_product_attention otherwise)"
            )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, length, _ = q.shape
    padded = -(-length // KEY_GROUP) * KEY_GROUP
    packed = torch.empty(batch * heads * padded * HEAD_SIZE, dtype=torch.float32)
    _lib.bulkfm_attention_pack_keys(
        k.data_ptr(), *k.stride()[:3], packed.data_ptr(), batch, heads, length, padded
    )
    out = torch.empty(batch, length, heads, HEAD_SIZE, dtype=torch.float32).transpose(1, 2)
    scale = math.log2(math.e) / math.sqrt(HEAD_SIZE)
    with torch.profiler.record_function("bulkfm::cpu_attention"):
        code = _call_forward(q, packed, v, out, padded, scale)
    if code != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
    return out


def _call_forward(
    q: torch.Tensor,
    packed: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    padded: int,
    scale: float,
) -> int:
    assert _lib is not None
    batch, heads, length, _ = q.shape
    return _lib.bulkfm_attention_forward(
        q.data_ptr(),
        *q.stride()[:3],
        packed.data_ptr(),
        v.data_ptr(),
        *v.stride()[:3],
        out.data_ptr(),
        *out.stride()[:3],
        batch,
        heads,
        length,
        padded,
        scale,
        max(1, torch.get_num_threads()),
    )


# --------------------------------------------------------------------------- build


def _source() -> bytes:
    return resources.files("bulkfm.models").joinpath("cpu_attention.c").read_bytes()


def cache_dir() -> Path:
    """Where compiled kernels are kept (``BULKFM_KERNEL_CACHE`` overrides)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bulkfm" / "kernels"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (which may carry a wrapper, e.g. ``ccache gcc``),
    else the first of cc, gcc and clang found."""
    if os.environ.get("CC", "").strip():
        words = shlex.split(os.environ["CC"])
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _build_and_load() -> KernelStatus:
    global _lib
    if not sys.platform.startswith(("linux", "darwin")):
        return KernelStatus(False, f"built only on Linux and macOS, this is {sys.platform}")
    machine = platform.machine().lower()
    if machine not in {"x86_64", "amd64"}:
        return KernelStatus(False, f"needs an x86-64 CPU, this is {machine or 'unknown'}")
    compiler = _compiler()
    if compiler is None:
        return KernelStatus(False, "no C compiler found (set CC, or install gcc or clang)")
    source = _source()
    errors = []
    for flags in ((*COMPILE_FLAGS, OPENMP_FLAG), COMPILE_FLAGS):
        try:
            target = _built_library(compiler, source, flags)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        _declare(lib)
        openmp = bool(lib.bulkfm_attention_uses_openmp())
        if not lib.bulkfm_attention_supported():
            return KernelStatus(False, "this CPU lacks AVX2 or FMA", str(target), openmp)
        _lib = lib
        return KernelStatus(True, "ok", str(target), openmp)
    return KernelStatus(False, f"building or loading the kernel failed: {errors[-1]}")


def _built_library(compiler: list[str], source: bytes, flags: tuple[str, ...]) -> Path:
    """The cached library for this source, compiler and flags, compiled if missing."""
    key = source + " ".join([*compiler, *flags]).encode()
    target = cache_dir() / f"cpu_attention-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        _compile(compiler, source, target, flags)
    except PermissionError:
        # Unwritable cache: build into a private directory for this process only
        # (never a shared, predictable path another user could plant a file in).
        target = Path(tempfile.mkdtemp(prefix="bulkfm-kernel-")) / target.name
        _compile(compiler, source, target, flags)
    return target


def _compile(compiler: list[str], source: bytes, target: Path, flags: tuple[str, ...]) -> None:
    """Compile into a temporary file beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src = Path(work) / "cpu_attention.c"
        src.write_bytes(source)
        built = Path(work) / target.name
        cmd = [*compiler, *flags, "-o", str(built), str(src), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise subprocess.SubprocessError(f"{' '.join(cmd)} exited {proc.returncode}: {tail}")
        os.replace(built, target)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in ("bulkfm_attention_supported", "bulkfm_attention_uses_openmp"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    lib.bulkfm_attention_pack_keys.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, i64]
    lib.bulkfm_attention_pack_keys.restype = None
    lib.bulkfm_attention_forward.argtypes = [
        *(ptr, i64, i64, i64),  # q
        ptr,  # packed keys
        *(ptr, i64, i64, i64),  # v
        *(ptr, i64, i64, i64),  # out
        *(i64, i64, i64, i64),  # batch, heads, length, padded
        ctypes.c_float,
        ctypes.c_int,
    ]
    lib.bulkfm_attention_forward.restype = ctypes.c_int


def _reset_for_tests() -> None:
    """Forget the loaded kernel so the next :func:`status` builds again."""
    global _status, _lib
    with _lock:
        _status, _lib = None, None
