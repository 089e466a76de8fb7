"""Compiled decode attention through the paged cache's block tables, for any CPU, fp32 or bf16
(worker/csrc/paged_attention.cpp).

The AVX-512 bf16 kernels (worker/cpu_kernels.py) read the paged pool in place. Everywhere else
(an fp32 model, a CPU without AVX-512, Gemma 2's soft-capped scores) torch's ops would first
gather each row's blocks into a dense copy, every layer of every step: at 32 rows ~5% of a
SmolLM2 step. This kernel reads the blocks through the tables instead. It is plain C++ that the
compiler vectorises (AVX2 and FMA on x86-64 CPUs that have them), with the arithmetic of
`worker.models.layers.decode_attention`: fp32 sums, each score rounded once to the model dtype,
torch's softmax between the two passes. Only the order of the fp32 additions differs from
torch's matmuls.

Built like the AVX-512 kernels: compiled at first use into the model cache, loaded with ctypes,
checked against torch's ops at load (worker/models/checks.py); without a compiler it is None and
torch's ops are kept.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .cpu_kernels import build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
MAX_GROUPS = 8
MAX_HEAD_DIM = 256
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def flags() -> tuple[str, ...]:
    """The compiler flags for this CPU: AVX2 and FMA where torch finds them (x86-64), else the baseline."""
    capability = torch.backends.cpu.get_cpu_capability()
    vector = ("-mavx2", "-mfma") if platform.machine() in ("x86_64", "AMD64") and capability != "DEFAULT" else ()
    return BASE_FLAGS + vector


class PagedAttention:
    """The compiled kernel, called on fp32 or bf16 CPU tensors."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))

        def bind(name: str, *argtypes: type) -> Any:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
            return fn

        i32, i64, ptr, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._scores = bind("tgq_paged_scores", i32, ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64,
                            i64, i64, i64, f32, f32)
        self._mix = bind("tgq_paged_mix", i32, ptr, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64,
                         i64)

    @staticmethod
    def handles(n_q: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> bool:
        return (dtype in DTYPES and 0 < head_dim <= MAX_HEAD_DIM and n_kv > 0 and n_q % n_kv == 0
                and n_q // n_kv <= MAX_GROUPS)

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 column_bias: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
        """q [B, n_q, 1, D] (heads D apart), pools [blocks, n_kv, block_size, D] (worker.paged.cache.KVPool),
        tables [B, W] int64, column_bias [B, W * block_size] (0 or -inf) -> [B, 1, n_q * D]."""
        b, n_q, _, d = q.shape
        _, n_kv, block_size, _ = k_pool.shape
        dtype = q.dtype
        columns, groups = column_bias.shape[1], n_q // n_kv
        for pool in (k_pool, v_pool):
            if pool.dtype != dtype or not pool.is_contiguous():
                raise ValueError("paged attention: unexpected KV pool layout")
        if (dtype not in DTYPES or (q.stride(1), q.stride(3)) != (d, 1) or column_bias.dtype != dtype
                or column_bias.stride(1) != 1 or tables.dtype != torch.long or tables.stride(1) != 1
                or columns > tables.shape[1] * block_size):
            raise ValueError("paged attention: unexpected query, bias or table layout")
        code = DTYPES[dtype]
        pool_args = (k_pool.stride(1), tables.data_ptr(), tables.stride(0), block_size, k_pool.stride(0))
        scores = torch.empty(b * n_kv, groups, columns, dtype=dtype)
        if self._scores(code, q.data_ptr(), q.stride(0), k_pool.data_ptr(), *pool_args, column_bias.data_ptr(),
                        column_bias.stride(0), scores.data_ptr(), b, n_kv, groups, columns, d, scale,
                        softcap or 0.0):
            raise ValueError(f"paged attention: head size {d} with {groups} groups not built")
        probs = torch.softmax(scores, dim=-1)
        out = torch.empty(b, 1, n_q * d, dtype=dtype)
        self._mix(code, probs.data_ptr(), v_pool.data_ptr(), *pool_args, column_bias.data_ptr(),
                  column_bias.stride(0), out.data_ptr(), b, n_kv, groups, columns, d)
        return out


def load_paged_attention(cache_dir: str | Path) -> PagedAttention | None:
    """The compiled kernel, or None (logged) where it cannot be built or loaded here."""
    try:
        return PagedAttention(build_library(cache_dir, SOURCE, flags()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("paged attention kernel unavailable, torch's ops kept: %s", exc)
        return None
