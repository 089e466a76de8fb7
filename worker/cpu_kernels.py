"""Small C++ kernels for the fused forward in bf16 on AVX-512 CPUs (worker/csrc/cpu_kernels.cpp).

Decode attention. At 32 rows torch runs a decode step's attention as a bf16 baddbmm and a bmm
over [96, 3, C] x [96, C, 64] blocks: thousands of tiny matrix products, ~0.55 ms a layer at
C = 192 columns on this machine's 2 cores, against ~0.2 ms to read the layer's keys and values
once. The kernel reads each (row, KV head)'s keys and values once for its grouped query heads,
skips the columns the bias masks, and keeps torch's softmax between its two passes. The
arithmetic is transformers' eager attention, as in `worker.models.layers.decode_attention`: scores rounded
once to bf16, softmax in fp32 rounded to bf16, probabilities times values summed in fp32 and
rounded once. Only the order of fp32 additions differs from oneDNN's, so an output may be one
bf16 place apart.

RMS norm (with the residual add before it) and the rotary embedding. torch's `rms_norm` on a
[32, 576] bf16 decode input costs ~25 us (several ops with dtype conversions), a [1000, 576]
prefill ~1.9 ms; the kernel does each row in one pass (~8 us / ~0.15 ms). The rotary embedding
is four torch ops (a cat, two products, a sum). Both round where torch's ops round (LlamaRMSNorm's
arithmetic; each product and sum to bf16), so their outputs are torch's but for the order of the
norm's fp32 sum of squares.

The source is compiled at first use with the system's C++ compiler (`CXX`, else g++ or c++) into
the model cache, keyed by the source's hash (`common.model_files.build_once`: one process builds,
the others wait), and loaded with ctypes; its OpenMP loops run on the
thread pool torch already started (the library asks for `libgomp.so.1`, which torch has loaded).
`worker/models/checks.py` checks each kernel against torch's ops at load; without a compiler or AVX-512, or
if a check fails, it keeps torch's ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from common.model_files import build_once

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
FLAGS = ("-O3", "-mavx512f", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
HEAD_DIMS = (64, 128)
MAX_GROUPS = 8
BF16 = torch.bfloat16

def cpu_supported() -> bool:
    """AVX-512 on this CPU (as torch detects it)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "g++", "c++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def build_library(cache_dir: str | Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile `source` into `cache_dir` once (per source and flags); returns the library's path."""
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:16]
    library = source.stem + ".so"

    def compile_into(tmp: Path) -> None:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        done = subprocess.run([compiler, *flags, "-o", str(tmp / library), str(source)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")

    # Locked and renamed into place whole: workers starting together compile once.
    return build_once(Path(cache_dir) / "kernels" / f"{source.stem}-{key}", compile_into) / library


def _check_buffer(buf: torch.Tensor) -> None:
    _, _, columns, d = buf.shape
    if buf.dtype != BF16 or (buf.stride(1), buf.stride(2), buf.stride(3)) != (columns * d, d, 1):
        raise ValueError("cpu kernels: unexpected KV buffer layout")


class _Blocks:
    """Where the C++ attention finds column c of (row r, KV head h): a dense buffer [B, n_kv, C, D] is one
    block of C columns per row (`dense`: rows `row_stride` apart, a one-entry table holding 0); a paged
    pool [blocks, n_kv, block_size, D] (row_stride 0) is read through each row's block table, its
    blocks `stride(0)` apart."""

    def __init__(self, tensor: torch.Tensor, row_stride: int, table: torch.Tensor, table_row: int,
                 block_size: int | None = None) -> None:
        _check_buffer(tensor)
        self.tensor, self.row_stride, self.table, self.table_row = tensor, row_stride, table, table_row
        self.heads = tensor.shape[1]
        self.block_size = block_size if block_size is not None else tensor.shape[2]
        self.block_stride = tensor.stride(0) if block_size is None else 0

    @classmethod
    def dense(cls, buf: torch.Tensor, zero_table: torch.Tensor) -> _Blocks:
        return cls(buf, buf.stride(0), zero_table, 0, block_size=buf.shape[2])

    def args(self) -> tuple[int, ...]:
        t = self.tensor
        return (t.data_ptr(), self.row_stride, t.stride(1), self.table.data_ptr(), self.table_row, self.block_size,
                self.block_stride)


class CpuKernels:
    """The compiled kernels, called on bf16 CPU tensors."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))

        def bind(name: str, restype: type | None, *argtypes: type) -> Any:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), restype
            return fn

        i64, ptr, f32, status = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
        self._scores = bind("tgq_scores", status, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64,
                            i64, i64, i64, i64, f32)
        self._mix = bind("tgq_mix", status, ptr, ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64,
                         i64)
        self._dense = torch.zeros(1, dtype=torch.long)  # the block table of a dense buffer: one block, at 0
        self._rms_norm = bind("tgq_rms_norm", status, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, f32)
        self._rope = bind("tgq_rope", None, ptr, i64, ptr, ptr, ptr, i64, i64, i64)
        self._greedy = bind("tgq_greedy", None, ptr, i64, ptr, ptr, i64, i64)

    # ---- decode attention ------------------------------------------------------------------------

    @staticmethod
    def handles_attention(n_q: int, n_kv: int, head_dim: int) -> bool:
        return head_dim in HEAD_DIMS and n_kv > 0 and n_q % n_kv == 0 and n_q // n_kv <= MAX_GROUPS

    def attention(self, q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, column_bias: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """q [B, n_q, 1, D] (heads D apart), kbuf/vbuf [B, n_kv, C, D] (each head's [C, D] contiguous),
        column_bias [B, C] (0 or -inf, rows contiguous) -> [B, 1, n_q * D]."""
        return self.mix(torch.softmax(self.scores(q, kbuf, column_bias, scale), dim=-1), vbuf, column_bias)

    def paged_attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                        column_bias: torch.Tensor, scale: float) -> torch.Tensor:
        """The same through the paged cache: pools [blocks, n_kv, block_size, D] (worker.paged.cache.KVPool),
        tables [B, W] int64 (each row's blocks), column_bias [B, W * block_size] over each row's columns."""
        if tables.dtype != torch.long or tables.stride(1) != 1:
            raise ValueError("cpu kernels: unexpected block table layout")
        k, v = (_Blocks(pool, 0, tables, tables.stride(0)) for pool in (k_pool, v_pool))
        scores = self._scores_of(q, k, column_bias, scale, tables.shape[0])
        return self._mix_of(torch.softmax(scores, dim=-1), v, column_bias, tables.shape[0])

    def scores(self, q: torch.Tensor, kbuf: torch.Tensor, column_bias: torch.Tensor, scale: float) -> torch.Tensor:
        """bias + scale * q k^T per KV head and grouped query head: [B * n_kv, groups, C], bf16."""
        return self._scores_of(q, _Blocks.dense(kbuf, self._dense), column_bias, scale, kbuf.shape[0])

    def mix(self, probs: torch.Tensor, vbuf: torch.Tensor, column_bias: torch.Tensor) -> torch.Tensor:
        """probs [B * n_kv, groups, C] (contiguous) times the values: [B, 1, n_q * D], bf16."""
        return self._mix_of(probs, _Blocks.dense(vbuf, self._dense), column_bias, vbuf.shape[0])

    def _scores_of(self, q: torch.Tensor, k: _Blocks, column_bias: torch.Tensor, scale: float, b: int) -> torch.Tensor:
        n_q, d = q.shape[1], q.shape[3]
        n_kv, columns = k.heads, column_bias.shape[1]
        if q.dtype != BF16 or (q.stride(1), q.stride(3)) != (d, 1) or column_bias.stride(1) != 1:
            raise ValueError("cpu kernels: unexpected query or bias layout")
        out = torch.empty(b * n_kv, n_q // n_kv, columns, dtype=BF16)
        if self._scores(q.data_ptr(), q.stride(0), *k.args(), column_bias.data_ptr(), column_bias.stride(0),
                        out.data_ptr(), b, n_kv, n_q // n_kv, columns, d, scale):
            raise ValueError(f"cpu kernels: attention with head size {d} and {n_q // n_kv} groups not built")
        return out

    def _mix_of(self, probs: torch.Tensor, v: _Blocks, column_bias: torch.Tensor, b: int) -> torch.Tensor:
        n_kv, d, columns = v.heads, v.tensor.shape[3], column_bias.shape[1]
        groups = probs.shape[1]
        if not probs.is_contiguous() or probs.dtype != BF16 or probs.shape != (b * n_kv, groups, columns):
            raise ValueError("cpu kernels: unexpected probabilities layout")
        out = torch.empty(b, 1, n_kv * groups * d, dtype=BF16)
        if self._mix(probs.data_ptr(), *v.args(), column_bias.data_ptr(), column_bias.stride(0), out.data_ptr(), b,
                     n_kv, groups, columns, d):
            raise ValueError(f"cpu kernels: attention with head size {d} and {groups} groups not built")
        return out

    # ---- RMS norm --------------------------------------------------------------------------------

    @staticmethod
    def handles_norm(width: int) -> bool:
        return width % 16 == 0

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' LlamaRMSNorm of x [..., H] (bf16, rows evenly spaced, each contiguous)."""
        return self._norm(x, None, weight, eps)[1]

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its RMS norm): a residual add and the next norm in one pass (x, delta contiguous)."""
        if not (x.is_contiguous() and delta.is_contiguous() and delta.shape == x.shape and delta.dtype == BF16):
            raise ValueError("cpu kernels: unexpected residual layout")
        return self._norm(x, delta, weight, eps)

    def _norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        rows = x.numel() // width
        flat = x.reshape(rows, width)  # a view for the model's layouts (no copy)
        if x.dtype != BF16 or weight.dtype != BF16 or flat.stride(1) != 1 or not weight.is_contiguous():
            raise ValueError("cpu kernels: unexpected norm input layout")
        total = torch.empty(x.shape, dtype=BF16) if delta is not None else x
        out = torch.empty(x.shape, dtype=BF16)
        if self._rms_norm(flat.data_ptr(), flat.stride(0), 0 if delta is None else delta.data_ptr(),
                          0 if delta is None else total.data_ptr(), weight.data_ptr(), out.data_ptr(), rows,
                          width, eps):
            raise ValueError(f"cpu kernels: norm width {width} not built")
        return total, out

    # ---- rotary embedding ------------------------------------------------------------------------

    @staticmethod
    def handles_rope(head_dim: int) -> bool:
        return head_dim % 2 == 0

    def rope(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """`worker.models.layers.rope` of qk [B, T, heads, D] (each position's heads contiguous) with cos and
        signed_sin [B, T, 1, D] (contiguous): a new contiguous [B, T, heads, D]."""
        b, t, heads, d = qk.shape
        rows = qk.reshape(b * t, heads, d)  # a view when positions are evenly spaced
        if (qk.dtype != BF16 or rows.stride(1) != d or rows.stride(2) != 1 or not cos.is_contiguous()
                or not signed_sin.is_contiguous() or cos.numel() != b * t * d or signed_sin.numel() != b * t * d):
            raise ValueError("cpu kernels: unexpected rotary input layout")
        out = torch.empty(b, t, heads, d, dtype=BF16)
        self._rope(rows.data_ptr(), rows.stride(0), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(),
                   b * t, heads, d)
        return out

    # ---- greedy choice ---------------------------------------------------------------------------

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For bf16 logits [n, V] (rows contiguous) with no processing to apply: torch.argmax and the
        chosen ids' log_softmax (fp32) -- what `sampling.choose` gives for plain greedy rows."""
        n, vocab = logits.shape
        if logits.dtype != BF16 or logits.device.type != "cpu" or logits.stride(1) != 1:
            raise ValueError("cpu kernels: unexpected logits layout")
        ids = torch.empty(n, dtype=torch.long)
        logprobs = torch.empty(n, dtype=torch.float32)
        self._greedy(logits.data_ptr(), logits.stride(0), ids.data_ptr(), logprobs.data_ptr(), n, vocab)
        return ids, logprobs


def load_cpu_kernels(cache_dir: str | Path) -> CpuKernels | None:
    """The compiled kernels, or None (logged) where they cannot be built or run here."""
    if not cpu_supported():
        log.info("cpu kernels: not used (this CPU has no AVX-512)")
        return None
    try:
        return CpuKernels(build_library(cache_dir))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("cpu kernels unavailable, torch's ops kept: %s", exc)
        return None
