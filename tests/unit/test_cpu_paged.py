"""The portable paged decode attention (worker/cpu_paged.py) computes torch's ops' attention over the
same rows gathered dense, in fp32 and bf16, for any head size, grouping and soft-cap."""
from __future__ import annotations

import pytest
import torch

from worker import cpu_kernels, cpu_paged
from worker.models import layers
from worker.models.checks import paged_copy

pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return cpu_paged.PagedAttention(cpu_kernels.build_library(tmp_path_factory.mktemp("kernels"), cpu_paged.SOURCE,
                                                              cpu_paged.flags()))


def _case(dtype, n_q, n_kv, d, rows=6, columns=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 1, n_q + 2 * n_kv, d, generator=g).to(dtype)[:, :, :n_q].transpose(1, 2)
    kbuf, vbuf = (torch.randn(rows, n_kv, columns, d, generator=g).to(dtype) for _ in range(2))
    bias = torch.zeros(rows, columns, dtype=dtype)
    bias[:, 40:] = float("-inf")  # columns past the rows' lengths
    bias[2, :11] = float("-inf")  # a sliding window's hidden columns
    return q, kbuf, vbuf, bias, g


def _want(q, kbuf, vbuf, bias, scale, softcap):
    grouped = layers.grouped_bias(bias, q.shape[1], kbuf.shape[1])
    return layers.decode_attention(q, kbuf, vbuf, grouped, scale, False, softcap)


@pytest.mark.parametrize("n_q,n_kv,d", [(9, 3, 64), (4, 4, 80), (16, 2, 128), (8, 1, 32)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fp32_matches_torchs_attention(kernel, n_q, n_kv, d, softcap):
    q, kbuf, vbuf, bias, g = _case(torch.float32, n_q, n_kv, d)
    k_pool, v_pool, tables, wide = paged_copy(kbuf, vbuf, bias, 4, g)
    got = kernel(q, k_pool, v_pool, tables, wide, d ** -0.5, softcap)
    want = _want(q, kbuf, vbuf, bias, d ** -0.5, softcap)
    assert got.shape == want.shape == (6, 1, n_q * d) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_bf16_stays_within_bf16_rounding_of_torchs_attention(kernel, softcap):
    q, kbuf, vbuf, bias, g = _case(torch.bfloat16, 9, 3, 64)
    k_pool, v_pool, tables, wide = paged_copy(kbuf, vbuf, bias, 16, g)
    got = kernel(q, k_pool, v_pool, tables, wide, 0.125, softcap).float()
    want = _want(q, kbuf, vbuf, bias, 0.125, softcap).float()
    exact = _want(*(t.float() for t in (q, kbuf, vbuf, bias)), 0.125, softcap)
    assert (got - want).abs().max() < 0.03 and (got - exact).abs().mean() <= 1.5 * (want - exact).abs().mean()


def test_masked_columns_are_never_read(kernel):
    # NaN in every slot the bias hides (the pool's spare block, the rows' padding): torch's ops would
    # spread it (NaN * 0); the kernel skips those columns.
    q, kbuf, vbuf, bias, g = _case(torch.float32, 9, 3, 64)
    k_pool, v_pool, tables, wide = paged_copy(kbuf, vbuf, bias, 4, g)
    want = kernel(q, k_pool, v_pool, tables, wide, 0.125)
    used = torch.zeros(k_pool.shape[0], k_pool.shape[2], dtype=torch.bool)
    for r in range(tables.shape[0]):
        for c in (wide[r] == 0).nonzero().flatten().tolist():
            used[tables[r, c // 4], c % 4] = True
    for pool in (k_pool, v_pool):
        pool.transpose(1, 2)[~used] = float("nan")
    got = kernel(q, k_pool, v_pool, tables, wide, 0.125)
    assert torch.equal(got, want)


def test_unexpected_layouts_are_refused(kernel):
    q, kbuf, vbuf, bias, g = _case(torch.float32, 9, 3, 64)
    k_pool, v_pool, tables, wide = paged_copy(kbuf, vbuf, bias, 4, g)
    with pytest.raises(ValueError):
        kernel(q, k_pool.to(torch.bfloat16), v_pool, tables, wide, 0.125)
    with pytest.raises(ValueError):
        kernel(q, k_pool, v_pool, tables.int(), wide, 0.125)
    with pytest.raises(ValueError):
        kernel(q, k_pool, v_pool, tables[:, :2], wide, 0.125)  # fewer blocks than the bias's columns
    assert not kernel.handles(9, 3, 512, torch.float32) and not kernel.handles(9, 3, 64, torch.float16)
