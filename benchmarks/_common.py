"""Helpers shared by the benchmark scripts in this folder.

- Every measured configuration runs in a fresh child process (:func:`run_child`), so
  one configuration's allocations (or the allocator's cached pages) cannot inflate
  another's peak memory. The peak reported is that of the timed repetitions alone
  (:func:`measure_around` resets the child's ``VmHWM`` just before them, after the
  warm-up and the reference matmul), so the benchmark's own instruments do not count.
  The whole child's peak is kept beside it (``process_peak_rss_mb``), and so is
  ``ru_maxrss`` from ``wait4``, which Linux carries over exec from the parent's image,
  so it reads max(parent RSS at launch (or its peak), child peak). The parent never
  imports torch, which keeps it at ~20 MB; ``parent_rss_mb`` is recorded to show it.
- :func:`model_flops` counts the FLOPs of a BulkRNABert forward analytically (the
  multiply-adds of every matmul, as 2 FLOPs each); :func:`counted_flops` checks it with
  ``torch.utils.flop_counter`` on the explicit-attention path (the counter has no
  formula for the CPU flash kernel).
- :func:`matmul_timing` measures what this machine sustains on a dense matmul, the
  denominator of every "fraction of the machine" figure printed (:func:`rates`), by
  wall clock and by process CPU time (see :class:`Timing` for why both).

Scripts import this module as ``_common`` (the scripts' folder is on ``sys.path``
when they run), and children are the scripts themselves run with ``--child JSON``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHILD_FLAG = "--child"
RESULT_TAG = "@@bulkfm-bench-result@@ "
DEFAULT_THREADS = 2

# Dense bf16 tensor-core peaks (no sparsity), vendor data sheets, in TFLOP/s. Matched
# against torch.cuda.get_device_name() in this order (so "L40S" is tried before "L4").
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
)


# --------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status (``VmHWM``, ``VmRSS``) in MB; None without /proc."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MB (VmHWM; ru_maxrss without
    /proc)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return _maxrss_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_rss() -> bool:
    """Start a new resident-memory high-water mark here: hand freed heap pages back to
    the OS (glibc ``malloc_trim``) and reset VmHWM to the current RSS (Linux, writing 5
    to ``/proc/self/clear_refs``). False where the reset is unavailable; the peak then
    keeps covering the whole process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def memory_fields(timing: Timing) -> dict[str, Any]:
    """The peaks a child reports: ``peak_rss_mb``, of the timed phase where it could be
    isolated (else of the whole process), and ``process_peak_rss_mb``, which also
    covers loading, warm-up and the instruments (matmul reference, profiler)."""
    process = peak_rss_mb()
    phase = timing.peak_rss_mb
    return {
        "peak_rss_mb": phase if phase is not None else process,
        "peak_scope": "timed phase" if phase is not None else "process",
        "process_peak_rss_mb": process,
    }


def peak_ratio(rows: list[dict[str, Any]], **match: Any) -> float | None:
    """Peak RSS of the run with the most samples over that of the fewest, among the
    rows that ran (no ``error``) and whose fields equal ``match``; None: fewer than two."""
    ok = [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in match.items())]
    if len(ok) < 2:
        return None
    ok.sort(key=lambda r: r["samples"])
    return float(ok[-1]["peak_rss_mb"] / ok[0]["peak_rss_mb"])


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return math.nan if rss is None else rss


def _maxrss_to_mb(value: int) -> float:
    # Linux reports kilobytes, macOS bytes.
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024


# --------------------------------------------------------------------------- processes
def run_child(
    script: str | os.PathLike,
    payload: dict[str, Any],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter and return its result dict.

    Adds ``ru_maxrss_mb`` (``wait4`` rusage of exactly that child; at least the
    parent's RSS at launch, see the module docstring) and ``parent_rss_mb``; the child
    itself reports ``peak_rss_mb`` (its VmHWM). A child that fails returns
    ``{"error": ...}`` with the tail of its stderr instead of stopping the benchmark, so
    one out-of-memory configuration does not lose the others' numbers.
    """
    cmd = [sys.executable, str(script), CHILD_FLAG, json.dumps(payload)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    parent_rss = current_rss_mb()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        status, maxrss = _wait_with_rusage(proc, timeout)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - start
    if status is None:
        return {"error": f"timed out after {timeout} s", **payload}
    result: dict[str, Any] | None = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    if status != 0 or result is None:
        killed = os.WIFSIGNALED(status) if status else False
        tail = " | ".join(stderr.strip().splitlines()[-4:])
        why = f"killed by signal {os.WTERMSIG(status)} (out of memory?)" if killed else tail
        return {"error": f"child failed: {why}", **payload}
    result["ru_maxrss_mb"] = maxrss
    result["parent_rss_mb"] = parent_rss
    result["parent_peak_rss_mb"] = peak_rss_mb()
    result["process_wall_s"] = wall
    return result


def _wait_with_rusage(proc: subprocess.Popen, timeout: float | None) -> tuple[int | None, float]:
    """Reap ``proc`` with ``os.wait4`` (its own rusage); (None, nan) after a timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = status  # reaped here: keep Popen from waiting again
            return status, _maxrss_to_mb(usage.ru_maxrss)
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None, math.nan
        time.sleep(0.05)


def run_config(
    handler: Callable[[dict[str, Any]], dict[str, Any]],
    script: str | os.PathLike,
    payload: dict[str, Any],
    *,
    inline: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One configuration: in a fresh child (the default) or, with ``inline``, in this
    process (for smoke tests: quick, but the memory figure is then this whole
    process's peak, not the configuration's; ``env`` is then not applied)."""
    if not inline:
        return run_child(script, payload, timeout=timeout, env=env)
    result = {**payload, **handler(payload)}
    result["ru_maxrss_mb"] = _maxrss_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    return result


def add_run_arguments(
    p: Any, *, budget_s: float, max_reps: int, timeout_s: float, compile_help: str
) -> None:
    """Options every speed script shares: repetitions, GPU extras, output, isolation."""
    p.add_argument("--budget-s", type=float, default=budget_s, help="timing budget per config")
    p.add_argument("--min-reps", type=int, default=1)
    p.add_argument("--max-reps", type=int, default=max_reps)
    p.add_argument("--compile", action="store_true", help=compile_help)
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak for MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=timeout_s, help="per child process")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (bytes; see _common.malloc_env)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (for tests)")
    p.add_argument(
        "--inline",
        action="store_true",
        help="run configurations in this process (tests; peak memory then not isolated)",
    )


def malloc_env(threshold: int | None) -> dict[str, str]:
    """Child environment asking glibc to mmap allocations above ``threshold`` bytes.

    By default glibc raises its mmap threshold up to 32 MB as large blocks are freed,
    after which tensors come from the heap and freed ones stay resident: the peak RSS
    then shows allocator retention on top of the live tensors. A fixed small threshold
    returns every large tensor to the OS on free, so the peak tracks what the model
    really holds (``--malloc-mmap-threshold 65536``).
    """
    return {} if not threshold else {"MALLOC_MMAP_THRESHOLD_": str(int(threshold))}


def device_of(requested: str, *, inline: bool = False) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; the parent stays
    torch-free by asking a throw-away interpreter (unless running inline)."""
    if requested != "auto":
        return requested
    if inline:
        return resolve_device("auto")
    probe = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.stdout.strip() or "cpu"


def is_child(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else list(argv)
    return bool(argv) and argv[0] == CHILD_FLAG


def child_main(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Entry point of a child: run ``handler(payload)`` and print its result, tagged."""
    payload = json.loads(sys.argv[2])
    result = handler(payload)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(RESULT_TAG + json.dumps({**payload, **result}), flush=True)
    return 0


# --------------------------------------------------------------------------- torch set-up
def setup_torch(threads: int, device: str = "cpu") -> Any:
    """Import torch with ``threads`` intra-op threads (set before any parallel work)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set by an earlier parallel call
        torch.set_num_interop_threads(1)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when available, else cpu. Needs torch, so only children call it."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch sees no CUDA device")
    return requested


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return float(override)
    for key, value in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["threads"] = torch.get_num_threads()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def device_peak_memory_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def reset_device_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopCount:
    """FLOPs (2 per multiply-add) of one forward, split by what scales how with genes."""

    attention: int  # QK^T and PV: quadratic in genes
    dense: int  # projections, FFN, gene projection, LM head: linear in genes

    @property
    def total(self) -> int:
        return self.attention + self.dense

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def model_flops(
    config: Any, n_genes: int, batch: int = 1, *, lm_head: bool = True, depth: int | None = None
) -> FlopCount:
    """Matmul FLOPs of one BulkRNABert forward over ``batch`` samples of ``n_genes`` genes.

    Counts every matrix product (embedding lookups, LayerNorm, GELU, softmax and
    residual adds are element-wise and left out, as in the usual MFU convention). The
    gene projection runs once per forward on [genes, init_dim], not per sample.
    """
    layers = config.num_layers if depth is None else depth
    d, heads, key = config.embed_dim, config.num_attention_heads, config.key_size
    inner = heads * key
    tokens = batch * n_genes
    per_layer_dense = 2 * tokens * (3 * d * inner + inner * d + 2 * d * config.ffn_embed_dim)
    per_layer_attention = 2 * 2 * batch * heads * n_genes * n_genes * key
    dense = layers * per_layer_dense
    if config.use_gene_embedding and config.project_gene_embedding:
        dense += 2 * n_genes * config.init_gene_embed_dim * d
    if lm_head:
        dense += 2 * tokens * d * config.n_expressions_bins
    return FlopCount(attention=layers * per_layer_attention, dense=dense)


def counted_flops(model: Any, tokens: Any, gene_index: Any = None) -> int:
    """FLOPs torch's flop counter sees in a forward with explicit attention (which runs
    the attention as plain matmuls it can count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(tokens, gene_index=gene_index, output_attentions=True)
    return int(counter.get_total_flops())


def attention_kernels(fn: Callable[[], Any]) -> list[str]:
    """Names of the attention operators ``fn`` dispatches to (e.g. the CPU flash kernel
    ``aten::_scaled_dot_product_flash_attention_for_cpu``, or bulkfm's own
    ``bulkfm::cpu_attention``), found with the profiler."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    names = {event.name for event in prof.events()}
    return sorted(n for n in names if "attention" in n and n.startswith(("aten::_", "bulkfm::")))


def scaling_exponent(n1: float, v1: float, n2: float, v2: float) -> float:
    """k in v ~ n^k between two points."""
    if min(n1, n2, v1, v2) <= 0 or n1 == n2:
        return math.nan
    return math.log(v2 / v1) / math.log(n2 / n1)


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock and process CPU seconds of each repetition.

    On a machine shared with other jobs the wall time also counts the time the
    scheduler gave the cores to others; the process CPU time (all threads) does not,
    so ``flops * threads / cpu_s`` is a rate that other load barely moves. Threads
    spinning at a barrier count as CPU time, so that rate is, if anything, low.
    """

    wall: list[float]
    cpu: list[float]
    peak_rss_mb: float | None = None  # of these repetitions alone, where measurable

    def wall_rate(self, flops: float) -> float:
        return flops / median(self.wall)

    def cpu_rate(self, flops: float, threads: int) -> float:
        cpu = median(self.cpu)
        return flops * threads / cpu if cpu > 0 else math.nan


def timed_reps(
    fn: Callable[[], Any],
    *,
    budget_s: float,
    min_reps: int = 1,
    max_reps: int = 5,
    device: str = "cpu",
) -> Timing:
    """Call ``fn`` until ``budget_s`` is spent (at least ``min_reps``, at most
    ``max_reps`` times)."""
    timing = Timing([], [])
    spent = 0.0
    while len(timing.wall) < max_reps and (len(timing.wall) < min_reps or spent < budget_s):
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        timing.wall.append(time.perf_counter() - wall)
        timing.cpu.append(time.process_time() - cpu)
        spent += timing.wall[-1]
    return timing


# --------------------------------------------------------------------------- GEMM rate
def matmul_timing(
    n: int = 2048, reps: int = 5, *, device: str = "cpu", dtype: str = "float32"
) -> Timing:
    """Timing of ``reps`` n x n x n matmuls (``2 n^3`` FLOPs each): what the machine
    sustains on the operation the model is made of."""
    import torch

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
    out = torch.empty(n, n, device=device, dtype=torch_dtype)
    for _ in range(2):  # warm-up: thread pool, kernels
        torch.mm(a, b, out=out)
    inner = 1 if device == "cpu" else 20
    timing = timed_reps(
        lambda: [torch.mm(a, b, out=out) for _ in range(inner)],
        budget_s=0.0,
        min_reps=reps,
        max_reps=reps,
        device=device,
    )
    timing.wall = [t / inner for t in timing.wall]
    timing.cpu = [t / inner for t in timing.cpu]
    return timing


def gemm_settings(device: str, smoke: bool) -> tuple[int, str]:
    """Matmul size and dtype of the reference rate: fp32 on CPU, bf16 on GPU (what the
    model runs in under autocast there)."""
    if device == "cuda":
        return (256 if smoke else 8192), "bfloat16"
    return (64 if smoke else 2048), "float32"


def measure_around(
    run: Callable[[], Timing], device: str, smoke: bool
) -> tuple[Timing, Timing, int]:
    """``run()`` between two matmul measurements; (run timing, matmul timing, matmul n).

    The run's own peak RSS goes into ``timing.peak_rss_mb`` (see :func:`reset_peak_rss`),
    so the reference matmuls, and anything before them, do not count in it."""
    n, dtype = gemm_settings(device, smoke)
    before = matmul_timing(n, 5, device=device, dtype=dtype)
    isolated = reset_peak_rss()
    timing = run()
    timing.peak_rss_mb = peak_rss_mb() if isolated else None
    after = matmul_timing(n, 5, device=device, dtype=dtype)
    return timing, join(before, after), n


def join(*timings: Timing) -> Timing:
    return Timing([t for x in timings for t in x.wall], [t for x in timings for t in x.cpu])


def rates(
    flops: float, timing: Timing, gemm: Timing, gemm_n: int, threads: int, device: str = "cpu"
) -> dict[str, float | None]:
    """Achieved FLOP/s of a run next to the matmul rate measured around it (medians
    against medians: both saw the same kind of interference)."""
    gemm_flops = 2 * gemm_n**3
    out = {
        "flops_per_s": timing.wall_rate(flops),
        "gemm_flops_per_s": gemm.wall_rate(gemm_flops),
        "gemm_best_flops_per_s": gemm_flops / min(gemm.wall),
        "cpu_flops_per_s": timing.cpu_rate(flops, threads),
        "gemm_cpu_flops_per_s": gemm.cpu_rate(gemm_flops, threads),
    }
    out["ratio_to_gemm"] = out["flops_per_s"] / out["gemm_flops_per_s"]
    out["cpu_ratio_to_gemm"] = out["cpu_flops_per_s"] / out["gemm_cpu_flops_per_s"]
    if device == "cuda":  # host CPU time says nothing about GPU work
        for key in ("cpu_flops_per_s", "gemm_cpu_flops_per_s", "cpu_ratio_to_gemm"):
            out[key] = None
    return out


def cost_fields(res: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    """The report columns every speed benchmark derives from a child's result: FLOP
    rates in GFLOP/s, the peak memory, and on CUDA the MFU against the bf16 peak
    (``peak_tflops`` overrides the table)."""
    achieved = res["flops_per_s"]
    out: dict[str, Any] = {
        "gflops_achieved": achieved / 1e9,
        "gemm_gflops": res["gemm_flops_per_s"] / 1e9,
        "reps": len(res["times_s"]),
        "peak_mb": res["peak_rss_mb"],
    }
    if res["device"] == "cuda":
        peak = gpu_peak_tflops(res.get("device_name", ""), peak_tflops)
        out["mfu"] = achieved / (peak * 1e12) if peak else None
        out["peak_tflops"] = peak
    return out


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --------------------------------------------------------------------------- printing
def cost_columns(device: str) -> list[tuple[str, str]]:
    """Report columns every speed benchmark prints after its own: FLOP rate against the
    measured matmul rate, and memory (GPU peak and MFU on CUDA)."""
    columns = [
        ("gflops_achieved", "GFLOP/s"),
        ("gemm_gflops", "matmul GFLOP/s"),
        ("ratio_to_gemm", "ratio"),
        ("cpu_ratio_to_gemm", "ratio (CPU time)"),
        ("base_rss_mb", "RSS after load MB"),
        ("peak_mb", "peak RSS MB"),
        ("process_peak_rss_mb", "process peak MB"),
    ]
    if device == "cuda":
        columns += [("device_peak_mb", "GPU peak MB"), ("mfu", "MFU (bf16 peak)")]
    return columns


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table; ``columns`` are (key, header) pairs, floats in 4 significant
    digits."""
    header = [h for _, h in columns]
    body = [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | os.PathLike | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def machine_line(threads: int) -> str:
    """One line on where the numbers come from (load average shows sharing)."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (
        f"machine: {os.cpu_count()} logical CPUs, threads used: {threads}, "
        f"load average (1/5/15 min): {load}"
    )
