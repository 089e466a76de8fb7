// bf16 kernels for the fused Llama forward on x86-64 CPUs with AVX-512 (worker/cpu_kernels.py).
//
// Decode attention, one query token per row against the rows' KV buffers (dense, or the paged
// cache's blocks through each row's block table), in two passes around
// torch's softmax:
//   tgq_scores:  scores[r, h, g, c] = bf16(bias[r, c] + scale * sum_d q[r, h*G + g, d] * k[r, h, c, d])
//   tgq_mix:     out[r, (h*G + g)*D + d] = bf16(sum_c p[r, h, g, c] * v[r, h, c, d])
// the arithmetic of transformers' eager attention (a bf16 matmul rounded once, fp32 inside), with
// the grouped query heads of a KV head sharing one read of its keys and values, and the columns
// the bias masks (-inf) skipped: their score is -inf and their probability 0. Each (row, KV head)
// sums its columns in column order, whatever other rows share the batch.
//
// RMS norm, transformers' LlamaRMSNorm: in fp32 x / sqrt(mean(x^2) + eps), rounded to bf16, times
// the weight, rounded again; optionally after a residual add, rounded to bf16 as torch's add rounds:
//   tgq_rms_norm:  [sum[r, i] = bf16(x[r, i] + d[r, i]), x = sum]  out[r, i] = bf16(bf16(x[r, i] * inv_rms(x[r])) * w[i])
//
// Rotary embedding, transformers' q * cos + rotate_half(q) * sin with rotate_half's negation in the
// sin table; each product and the sum rounded to bf16, as torch's three ops round them:
//   tgq_rope:  out[r, h, i] = bf16(bf16(x[r, h, i] * cos[r, i]) + bf16(x[r, h, i +- D/2] * sin[r, i]))
//
// Greedy choice of a row of bf16 logits with no processing: torch.argmax (the first maximum, or the
// first NaN) and the chosen token's log_softmax in fp32, in two passes over the row instead of a
// float copy, amax, argmax and a [rows, V] log_softmax:
//   tgq_greedy:  ids[r] = argmax(x[r]), logprobs[r] = -log(sum_i exp(x[r, i] - max(x[r])))
// (exp: a degree-6 polynomial after range reduction, within ~2e-7 of expf).
//
// Built and loaded at run time with -fopenmp: the loops run on the OpenMP pool torch already started.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace {

constexpr uint16_t kNegInf = 0xff80;
constexpr int kMaxGroups = 8;

inline __m512 load16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline float to_float(uint16_t h) { return tgq::bf16_to_float(h); }
inline uint16_t to_bf16(float f) { return tgq::float_to_bf16(f); }

// Where column c of (row r, KV head h) lives: k + r * kv_row + h * kv_head, then block c / block_size
// of the row's block table (table + r * table_row) times block_stride, then (c % block_size) * D.
// A dense buffer is one block of `columns` columns (a one-entry table holding 0); the paged KV
// cache's pool is blocks of block_size columns with kv_row = 0.
struct Blocks {
    const int64_t* table;
    int64_t table_row, block_size, block_stride;
};

template <int NCH>
void scores(const uint16_t* q, int64_t q_row, const uint16_t* k, int64_t kv_row, int64_t kv_head, Blocks blocks,
            const uint16_t* bias, int64_t bias_row, uint16_t* out, int64_t rows, int64_t heads,
            int64_t groups, int64_t columns, float scale) {
    constexpr int64_t D = NCH * 16;
#pragma omp parallel for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        const int64_t r = rh / heads, h = rh % heads;
        const uint16_t* qr = q + r * q_row + h * groups * D;
        const uint16_t* kr = k + r * kv_row + h * kv_head;
        const uint16_t* br = bias + r * bias_row;
        uint16_t* o = out + rh * groups * columns;
        __m512 qv[kMaxGroups][NCH];
        for (int64_t g = 0; g < groups; ++g)
            for (int j = 0; j < NCH; ++j) qv[g][j] = load16(qr + g * D + j * 16);
        const int64_t* tr = blocks.table + r * blocks.table_row;
        for (int64_t c0 = 0, blk = 0; c0 < columns; c0 += blocks.block_size, ++blk) {
            const uint16_t* kb = kr + tr[blk] * blocks.block_stride;
            const int64_t end = c0 + blocks.block_size < columns ? c0 + blocks.block_size : columns;
            for (int64_t c = c0; c < end; ++c) {
                if (br[c] == kNegInf) {
                    for (int64_t g = 0; g < groups; ++g) o[g * columns + c] = kNegInf;
                    continue;
                }
                const float b = to_float(br[c]);
                __m512 kv[NCH];
                for (int j = 0; j < NCH; ++j) kv[j] = load16(kb + (c - c0) * D + j * 16);
                for (int64_t g = 0; g < groups; ++g) {
                    __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
                    for (int j = 1; j < NCH; ++j) acc = _mm512_fmadd_ps(qv[g][j], kv[j], acc);
                    o[g * columns + c] = to_bf16(b + scale * _mm512_reduce_add_ps(acc));
                }
            }
        }
    }
}

template <int NCH>
void mix(const uint16_t* p, const uint16_t* v, int64_t kv_row, int64_t kv_head, Blocks blocks, const uint16_t* bias,
         int64_t bias_row, uint16_t* out, int64_t rows, int64_t heads, int64_t groups, int64_t columns) {
    constexpr int64_t D = NCH * 16;
#pragma omp parallel for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        const int64_t r = rh / heads, h = rh % heads;
        const uint16_t* pr = p + rh * groups * columns;
        const uint16_t* vr = v + r * kv_row + h * kv_head;
        const uint16_t* br = bias + r * bias_row;
        __m512 acc[kMaxGroups][NCH];
        for (int64_t g = 0; g < groups; ++g)
            for (int j = 0; j < NCH; ++j) acc[g][j] = _mm512_setzero_ps();
        const int64_t* tr = blocks.table + r * blocks.table_row;
        for (int64_t c0 = 0, blk = 0; c0 < columns; c0 += blocks.block_size, ++blk) {
            const uint16_t* vb = vr + tr[blk] * blocks.block_stride;
            const int64_t end = c0 + blocks.block_size < columns ? c0 + blocks.block_size : columns;
            for (int64_t c = c0; c < end; ++c) {
                if (br[c] == kNegInf) continue;
                __m512 vv[NCH];
                for (int j = 0; j < NCH; ++j) vv[j] = load16(vb + (c - c0) * D + j * 16);
                for (int64_t g = 0; g < groups; ++g) {
                    const __m512 w = _mm512_set1_ps(to_float(pr[g * columns + c]));
                    for (int j = 0; j < NCH; ++j) acc[g][j] = _mm512_fmadd_ps(w, vv[j], acc[g][j]);
                }
            }
        }
        uint16_t* o = out + (r * heads + h) * groups * D;
        alignas(64) float lanes[16];
        for (int64_t g = 0; g < groups; ++g)
            for (int j = 0; j < NCH; ++j) {
                _mm512_store_ps(lanes, acc[g][j]);
                for (int l = 0; l < 16; ++l) o[g * D + j * 16 + l] = to_bf16(lanes[l]);
            }
    }
}

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2 / 2. Below -86 it gives e^-86 (about 4e-38) rather
// than expf's underflow: the smallest result stays a normal float, because sums of denormals run
// about a hundred times slower (a constrained row's logits are mostly -inf), and 49k such terms add
// under 3e-33 to a sum of at least 1.
inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-86.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

}  // namespace

extern "C" {

// x [rows, vocab] bf16 with rows `row_stride` apart; ids [rows] int64 and logprobs [rows] fp32 written.
void tgq_greedy(const uint16_t* x, int64_t row_stride, int64_t* ids, float* logprobs, int64_t rows, int64_t vocab) {
    const int64_t body = vocab - vocab % 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = x + r * row_stride;
        __m512 top16 = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < body; i += 16) {
            const __m512 v = load16(xr + i);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            top16 = _mm512_max_ps(top16, v);
        }
        float top = _mm512_reduce_max_ps(top16);
        bool has_nan = nan != 0;
        for (int64_t i = body; i < vocab; ++i) {
            const float v = to_float(xr[i]);
            has_nan |= v != v;
            top = v > top ? v : top;
        }
        int64_t at = 0;
        if (has_nan) {  // torch.argmax picks the first NaN; log_softmax gives NaN
            while (to_float(xr[at]) == to_float(xr[at])) ++at;
            ids[r] = at;
            logprobs[r] = NAN;
            continue;
        }
        while (at < vocab - 1 && to_float(xr[at]) != top) ++at;
        ids[r] = at;
        if (std::isinf(top)) {  // all -inf, or an infinite score: log_softmax gives NaN
            logprobs[r] = NAN;
            continue;
        }
        const __m512 shift = _mm512_set1_ps(top);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < body; i += 16) acc = _mm512_add_ps(acc, exp_nonpositive(_mm512_sub_ps(load16(xr + i), shift)));
        float sum = _mm512_reduce_add_ps(acc);
        for (int64_t i = body; i < vocab; ++i) sum += std::exp(to_float(xr[i]) - top);
        logprobs[r] = -std::log(sum);
    }
}

// x and out [rows, width] with x's rows `row_stride` apart, w [width]. With `delta` (rows contiguous,
// like `sum`), x + delta is written to `sum` and normalised. Returns -1 unless width % 16 == 0.
int tgq_rms_norm(const uint16_t* x, int64_t row_stride, const uint16_t* delta, uint16_t* sum, const uint16_t* w,
                 uint16_t* out, int64_t rows, int64_t width, float eps) {
    if (width % 16 != 0) return -1;
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = x + r * row_stride;
        if (delta != nullptr) {
            const uint16_t* dr = delta + r * width;
            uint16_t* sr = sum + r * width;
            for (int64_t i = 0; i < width; ++i) sr[i] = to_bf16(to_float(xr[i]) + to_float(dr[i]));
            xr = sr;
        }
        uint16_t* o = out + r * width;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < width; i += 16) {
            const __m512 v = load16(xr + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(width) + eps);
        for (int64_t i = 0; i < width; ++i) o[i] = to_bf16(to_float(to_bf16(to_float(xr[i]) * inv)) * to_float(w[i]));
    }
    return 0;
}

// x [rows, heads, D] with rows `row_stride` apart (heads contiguous), cos and sin [rows, D], out
// [rows, heads, D] contiguous.
void tgq_rope(const uint16_t* x, int64_t row_stride, const uint16_t* cos, const uint16_t* sin, uint16_t* out,
              int64_t rows, int64_t heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* c = cos + r * head_dim;
        const uint16_t* s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            const uint16_t* xh = x + r * row_stride + h * head_dim;
            uint16_t* o = out + (r * heads + h) * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) {
                const float rotated = to_float(xh[i < half ? i + half : i - half]);
                o[i] = to_bf16(to_float(to_bf16(to_float(xh[i]) * to_float(c[i]))) +
                               to_float(to_bf16(rotated * to_float(s[i]))));
            }
        }
    }
}

// Returns 0, or -1 for a head size or group count this build does not handle.
// table [rows, table_row] int64: each row's blocks (block_size columns, block_stride elements apart);
// a dense buffer passes one block of `columns` columns (table_row 0, a table holding 0).
int tgq_scores(const uint16_t* q, int64_t q_row, const uint16_t* k, int64_t kv_row, int64_t kv_head,
               const int64_t* table, int64_t table_row, int64_t block_size, int64_t block_stride,
               const uint16_t* bias, int64_t bias_row, uint16_t* out, int64_t rows, int64_t heads,
               int64_t groups, int64_t columns, int64_t head_dim, float scale) {
    if (groups < 1 || groups > kMaxGroups || block_size < 1) return -1;
    const Blocks blocks{table, table_row, block_size, block_stride};
    switch (head_dim) {
        case 64: scores<4>(q, q_row, k, kv_row, kv_head, blocks, bias, bias_row, out, rows, heads, groups, columns, scale); return 0;
        case 128: scores<8>(q, q_row, k, kv_row, kv_head, blocks, bias, bias_row, out, rows, heads, groups, columns, scale); return 0;
        default: return -1;
    }
}

int tgq_mix(const uint16_t* p, const uint16_t* v, int64_t kv_row, int64_t kv_head, const int64_t* table,
            int64_t table_row, int64_t block_size, int64_t block_stride, const uint16_t* bias,
            int64_t bias_row, uint16_t* out, int64_t rows, int64_t heads, int64_t groups, int64_t columns,
            int64_t head_dim) {
    if (groups < 1 || groups > kMaxGroups || block_size < 1) return -1;
    const Blocks blocks{table, table_row, block_size, block_stride};
    switch (head_dim) {
        case 64: mix<4>(p, v, kv_row, kv_head, blocks, bias, bias_row, out, rows, heads, groups, columns); return 0;
        case 128: mix<8>(p, v, kv_row, kv_head, blocks, bias, bias_row, out, rows, heads, groups, columns); return 0;
        default: return -1;
    }
}

}  // extern "C"
