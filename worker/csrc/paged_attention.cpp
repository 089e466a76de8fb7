// Decode attention through the paged KV cache's block tables, for any CPU, in fp32 or bf16
// (worker/cpu_paged.py). Plain C++ for the compiler to vectorise: no intrinsics, any head size.
//
// One query token per row, in two passes around torch's softmax, as worker/csrc/cpu_kernels.cpp's
// AVX-512 bf16 kernel (the arithmetic of transformers' eager attention, fp32 inside):
//   tgq_paged_scores:  s[r, h, g, c] = T(bias[r, c] + cap(scale * sum_d q[r, h*G + g, d] * k[r, h, c, d]))
//   tgq_paged_mix:     out[r, (h*G + g)*D + d] = T(sum_c p[r, h, g, c] * v[r, h, c, d])
// where T rounds to the model dtype and cap is Gemma 2's soft-cap (cap * tanh(x / cap)) or none.
// Column c of (row r, KV head h) is at pool + h * kv_head + table[r][c / block_size] * block_stride +
// (c % block_size) * D. Columns the bias masks (-inf) are skipped: score -inf, probability 0.
#include <cmath>
#include <cstdint>

#include "bf16.h"

namespace {

constexpr int64_t kMaxGroups = 8;
constexpr int64_t kMaxHeadDim = 256;

struct F32 {
    using T = float;
    static float load(float x) { return x; }
    static float store(float f) { return f; }
};

struct BF16 {
    using T = uint16_t;
    static float load(uint16_t h) { return tgq::bf16_to_float(h); }
    static uint16_t store(float f) { return tgq::float_to_bf16(f); }
};

struct Pool {
    const int64_t* table;
    int64_t table_row, block_size, block_stride, kv_head;
};

template <class E>
void scores(const typename E::T* q, int64_t q_row, const typename E::T* k, Pool pool, const typename E::T* bias,
            int64_t bias_row, typename E::T* out, int64_t rows, int64_t heads, int64_t groups, int64_t columns,
            int64_t D, float scale, float softcap) {
    const float neg_inf = -INFINITY;
#pragma omp parallel for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        const int64_t r = rh / heads, h = rh % heads;
        const typename E::T* br = bias + r * bias_row;
        const int64_t* tr = pool.table + r * pool.table_row;
        typename E::T* o = out + rh * groups * columns;
        float qv[kMaxGroups][kMaxHeadDim];
        float kv[kMaxHeadDim];
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t d = 0; d < D; ++d) qv[g][d] = E::load(q[r * q_row + (h * groups + g) * D + d]);
        for (int64_t c = 0; c < columns; ++c) {
            const float b = E::load(br[c]);
            if (b == neg_inf) {
                for (int64_t g = 0; g < groups; ++g) o[g * columns + c] = E::store(neg_inf);
                continue;
            }
            const typename E::T* kc = k + h * pool.kv_head + tr[c / pool.block_size] * pool.block_stride +
                                      (c % pool.block_size) * D;
            for (int64_t d = 0; d < D; ++d) kv[d] = E::load(kc[d]);
            for (int64_t g = 0; g < groups; ++g) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t d = 0; d < D; ++d) acc += qv[g][d] * kv[d];
                float s = scale * acc;
                if (softcap > 0.0f) s = std::tanh(s / softcap) * softcap;
                o[g * columns + c] = E::store(b + s);
            }
        }
    }
}

template <class E>
void mix(const typename E::T* p, const typename E::T* v, Pool pool, const typename E::T* bias, int64_t bias_row,
         typename E::T* out, int64_t rows, int64_t heads, int64_t groups, int64_t columns, int64_t D) {
    const float neg_inf = -INFINITY;
#pragma omp parallel for schedule(static)
    for (int64_t rh = 0; rh < rows * heads; ++rh) {
        const int64_t r = rh / heads, h = rh % heads;
        const typename E::T* pr = p + rh * groups * columns;
        const typename E::T* br = bias + r * bias_row;
        const int64_t* tr = pool.table + r * pool.table_row;
        float acc[kMaxGroups][kMaxHeadDim];
        float vv[kMaxHeadDim];
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t d = 0; d < D; ++d) acc[g][d] = 0.0f;
        for (int64_t c = 0; c < columns; ++c) {
            if (E::load(br[c]) == neg_inf) continue;
            const typename E::T* vc = v + h * pool.kv_head + tr[c / pool.block_size] * pool.block_stride +
                                      (c % pool.block_size) * D;
            for (int64_t d = 0; d < D; ++d) vv[d] = E::load(vc[d]);
            for (int64_t g = 0; g < groups; ++g) {
                const float w = E::load(pr[g * columns + c]);
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) acc[g][d] += w * vv[d];
            }
        }
        typename E::T* o = out + rh * groups * D;
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t d = 0; d < D; ++d) o[g * D + d] = E::store(acc[g][d]);
    }
}

bool handled(int64_t groups, int64_t head_dim, int64_t block_size) {
    return groups >= 1 && groups <= kMaxGroups && head_dim >= 1 && head_dim <= kMaxHeadDim && block_size >= 1;
}

}  // namespace

extern "C" {

// Returns 0, or -1 for a head size, group count or block size this build does not handle.
// dtype 0: fp32, 1: bf16 (every tensor argument in that dtype but the int64 table). softcap <= 0: none.
int tgq_paged_scores(int dtype, const void* q, int64_t q_row, const void* k, int64_t kv_head, const int64_t* table,
                     int64_t table_row, int64_t block_size, int64_t block_stride, const void* bias, int64_t bias_row,
                     void* out, int64_t rows, int64_t heads, int64_t groups, int64_t columns, int64_t head_dim,
                     float scale, float softcap) {
    if (!handled(groups, head_dim, block_size)) return -1;
    const Pool pool{table, table_row, block_size, block_stride, kv_head};
    if (dtype == 0) {
        scores<F32>(static_cast<const float*>(q), q_row, static_cast<const float*>(k), pool,
                    static_cast<const float*>(bias), bias_row, static_cast<float*>(out), rows, heads, groups,
                    columns, head_dim, scale, softcap);
    } else {
        scores<BF16>(static_cast<const uint16_t*>(q), q_row, static_cast<const uint16_t*>(k), pool,
                     static_cast<const uint16_t*>(bias), bias_row, static_cast<uint16_t*>(out), rows, heads, groups,
                     columns, head_dim, scale, softcap);
    }
    return 0;
}

int tgq_paged_mix(int dtype, const void* p, const void* v, int64_t kv_head, const int64_t* table, int64_t table_row,
                  int64_t block_size, int64_t block_stride, const void* bias, int64_t bias_row, void* out,
                  int64_t rows, int64_t heads, int64_t groups, int64_t columns, int64_t head_dim) {
    if (!handled(groups, head_dim, block_size)) return -1;
    const Pool pool{table, table_row, block_size, block_stride, kv_head};
    if (dtype == 0) {
        mix<F32>(static_cast<const float*>(p), static_cast<const float*>(v), pool, static_cast<const float*>(bias),
                 bias_row, static_cast<float*>(out), rows, heads, groups, columns, head_dim);
    } else {
        mix<BF16>(static_cast<const uint16_t*>(p), static_cast<const uint16_t*>(v), pool,
                  static_cast<const uint16_t*>(bias), bias_row, static_cast<uint16_t*>(out), rows, heads, groups,
                  columns, head_dim);
    }
    return 0;
}

}  // extern "C"
