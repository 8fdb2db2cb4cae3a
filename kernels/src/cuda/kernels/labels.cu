// 4-bit labels (ALGORITHMS.md section 1, `--label-bits 4`): the writers (from a KV cache, and a
// warp-wide writer that ds_put_rows in offload.cu calls for new rows) and the label scores.
// Compiled after sparse.cu (u64, DS_MAX_R) and before offload.cu.
//
// Layout, per KV head g and token t (`cap` tokens per head):
//   codes[g][t][W] (u32, W = ceil(r / 8)): channel c's 4-bit code in bits 4*(c%8) of word c/8,
//     so that, read as bytes, a row is the CPU LabelCache's code bytes (two channels a byte, the
//     lower channel in the low nibble); the codes of channels r .. 8W are 0;
//   params[g][t] (u32): f16 lo in the low half, f16 scale in the high half (the CPU's row bytes
//     0..4); value(c) = lo + scale * code(c).
// A scoring thread reads W aligned words (one 4/8/16-byte load per 8/16/32 channels) and one
// word of parameters; both arrays are contiguous in t, so a warp's loads are coalesced.
//
// Quantisation is offload/src/sparse/labels.rs LabelCache::write bit for bit: lo and hi the min
// and max of the r values (f32), lo16 = f16(lo), scale16 = f16((hi - lo) / 15), then with the
// f32 values of those two, code = clamp(round((v - lo) / scale), 0, 15) (round half away from
// zero, as Rust's f32::round and roundf), or 0 when scale is not > 0. IEEE-rounded division
// and subtraction (__fdiv_rn, __fsub_rn), no contraction.

#define DS4_MAX_W (DS_MAX_R / 8)

__device__ __forceinline__ u32 ds4_code(float v, float lo, float scale) {
    if (!(scale > 0.0f)) return 0u;
    float x = roundf(__fdiv_rn(__fsub_rn(v, lo), scale));
    x = fminf(fmaxf(x, 0.0f), 15.0f);  // a NaN becomes 0, as Rust's `as u8`
    return (u32)x;
}

// (lo16 | scale16 << 16) from the min and max; *lo and *scale get their f32 values.
__device__ __forceinline__ u32 ds4_params(float lo_v, float hi_v, float* lo, float* scale) {
    f16_t l = from_f32<f16_t>(lo_v);
    f16_t s = from_f32<f16_t>(__fdiv_rn(__fsub_rn(hi_v, lo_v), 15.0f));
    *lo = to_f32(l);
    *scale = to_f32(s);
    return (u32)l.x | ((u32)s.x << 16);
}

// ---- writer from a KV cache -----------------------------------------------------------------
// Labels of tokens [t0, t1) from K rows (row t of head g at k + t*tok_stride + g*head_dim
// elements): one thread per (token, head). Grid (ceil(n / 256), n_kv). Two passes over the r
// values (min/max, then codes), read again from L1 rather than kept in a local array.
template <typename T>
__device__ void ds_labels4_from_cache(const T* k, long tok_stride, int head_dim, const int* chan,
                                      int r, int words, long t0, long t1, long cap, u32* codes,
                                      u32* params) {
    long t = t0 + (long)blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y;
    if (t >= t1) return;
    const T* row = k + t * tok_stride + (long)g * head_dim;
    const int* ch = chan + g * r;
    float lo_v = __int_as_float(0x7f800000), hi_v = -__int_as_float(0x7f800000);
    for (int c = 0; c < r; c++) {
        float v = to_f32(row[ch[c]]);
        lo_v = fminf(lo_v, v);
        hi_v = fmaxf(hi_v, v);
    }
    float lo, scale;
    params[(long)g * cap + t] = ds4_params(lo_v, hi_v, &lo, &scale);
    u32* out = codes + ((long)g * cap + t) * words;
    for (int w = 0; w < words; w++) {
        u32 x = 0;
        #pragma unroll
        for (int e = 0; e < 8; e++) {
            int c = 8 * w + e;
            if (c < r) x |= ds4_code(to_f32(row[ch[c]]), lo, scale) << (4 * e);
        }
        out[w] = x;
    }
}
extern "C" __global__ void ds_labels4_from_cache_bf16(u64 k, long tok_stride, int head_dim,
                                                      const int* chan, int r, int words, long t0,
                                                      long t1, long cap, u32* codes,
                                                      u32* params) {
    ds_labels4_from_cache((const bf16_t*)k, tok_stride, head_dim, chan, r, words, t0, t1, cap,
                          codes, params);
}
extern "C" __global__ void ds_labels4_from_cache_f16(u64 k, long tok_stride, int head_dim,
                                                     const int* chan, int r, int words, long t0,
                                                     long t1, long cap, u32* codes,
                                                     u32* params) {
    ds_labels4_from_cache((const f16_t*)k, tok_stride, head_dim, chan, r, words, t0, t1, cap,
                          codes, params);
}

// ---- writer of one label by one warp ----------------------------------------------------------
// Called by all 32 lanes of a warp (ds_put_rows): the label of one (token, head) from the f32
// key `key` (head_dim values) at channels ch[0..r) (r <= 64: lane l holds channels l and l + 32),
// min and max by shuffles, each lane quantises its channels, groups of 8 lanes OR their codes
// into a word.
__device__ void ds_label4_warp(const float* key, const int* ch, int r, int words, u32* codes,
                               u32* params) {
    int lane = threadIdx.x & 31;
    float inf = __int_as_float(0x7f800000);
    float v0 = lane < r ? key[ch[lane]] : 0.0f;
    float v1 = lane + 32 < r ? key[ch[lane + 32]] : 0.0f;
    float lo_v = fminf(lane < r ? v0 : inf, lane + 32 < r ? v1 : inf);
    float hi_v = fmaxf(lane < r ? v0 : -inf, lane + 32 < r ? v1 : -inf);
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo_v = fminf(lo_v, __shfl_xor_sync(0xffffffffu, lo_v, o));
        hi_v = fmaxf(hi_v, __shfl_xor_sync(0xffffffffu, hi_v, o));
    }
    float lo, scale;
    u32 p = ds4_params(lo_v, hi_v, &lo, &scale);
    u32 x0 = lane < r ? ds4_code(v0, lo, scale) << (4 * (lane & 7)) : 0u;
    u32 x1 = lane + 32 < r ? ds4_code(v1, lo, scale) << (4 * (lane & 7)) : 0u;
    #pragma unroll
    for (int o = 1; o < 8; o <<= 1) {
        x0 |= __shfl_xor_sync(0xffffffffu, x0, o);
        x1 |= __shfl_xor_sync(0xffffffffu, x1, o);
    }
    if ((lane & 7) == 0) {
        int w = lane >> 3;
        if (w < words) codes[w] = x0;
        if (w + 4 < words) codes[w + 4] = x1;
    }
    if (lane == 0) *params = p;
}

// ---- label scores ---------------------------------------------------------------------------
// scores[g][t - t0] = lo * qsum + scale * sum_c qs[g][c] * code(c) for t in [t0, t1), where
// qs[g][c] = sum over the group's query heads (in order) of q[h*D + chan[g][c]] and qsum = sum_c
// qs[g][c] (the CPU LabelCache::score's formula). W words per row (a template parameter: the
// loads are 16, 8 or 4 bytes wide); DS4_TOK tokens per thread, blockDim apart, their loads issued
// before any arithmetic. A code becomes a float exactly through its bits: 0x4B0000cc is 2^23 + cc.
// Grid (ceil(n / (256 * DS4_TOK)), n_kv), 256 threads.
#define DS4_TOK 2
template <int W>
__device__ __forceinline__ void ds4_load(const u32* p, u32* w) {
    if constexpr (W % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < W / 4; i++) {
            uint4 v = ((const uint4*)p)[i];
            w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
    } else if constexpr (W % 2 == 0) {
        #pragma unroll
        for (int i = 0; i < W / 2; i++) {
            uint2 v = ((const uint2*)p)[i];
            w[2 * i] = v.x; w[2 * i + 1] = v.y;
        }
    } else {
        #pragma unroll
        for (int i = 0; i < W; i++) w[i] = p[i];
    }
}
template <int W>
__device__ void ds_label_scores4(const float* q, const int* chan, int group, int head_dim, int r,
                                 const u32* __restrict__ codes, const u32* __restrict__ params,
                                 long cap, long t0, long t1, float* scores) {
    __shared__ __align__(16) float qs[8 * W];
    __shared__ float qsum_sh;
    int g = blockIdx.y;
    if (threadIdx.x < 8 * W) {
        float s = 0.0f;
        if (threadIdx.x < r) {
            int c = chan[g * r + threadIdx.x];
            for (int j = 0; j < group; j++) s += q[(long)(g * group + j) * head_dim + c];
        }
        qs[threadIdx.x] = s;  // 0 past r: the zero codes there add nothing
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int c = 0; c < r; c++) s += qs[c];
        qsum_sh = s;
    }
    __syncthreads();
    float qsum = qsum_sh;
    long n = t1 - t0;
    long i0 = (long)blockIdx.x * blockDim.x * DS4_TOK + threadIdx.x;
    const u32* cg = codes + ((long)g * cap + t0) * W;
    const u32* pg = params + (long)g * cap + t0;
    u32 w[DS4_TOK][W];
    u32 p[DS4_TOK];
    #pragma unroll
    for (int u = 0; u < DS4_TOK; u++) {
        long i = i0 + (long)u * blockDim.x;
        if (i < n) {
            ds4_load<W>(cg + i * W, w[u]);
            p[u] = pg[i];
        }
    }
    float acc[DS4_TOK];
    #pragma unroll
    for (int u = 0; u < DS4_TOK; u++) acc[u] = 0.0f;
    #pragma unroll
    for (int k = 0; k < W; k++) {
        float4 qa = ((const float4*)qs)[2 * k], qb = ((const float4*)qs)[2 * k + 1];
        // Channels 8k + 2b (low nibbles) and 8k + 2b + 1 (high nibbles) of byte b.
        float qe[4] = {qa.x, qa.z, qb.x, qb.z}, qo[4] = {qa.y, qa.w, qb.y, qb.w};
        #pragma unroll
        for (int u = 0; u < DS4_TOK; u++) {
            u32 lo_n = w[u][k] & 0x0f0f0f0fu, hi_n = (w[u][k] >> 4) & 0x0f0f0f0fu;
            #pragma unroll
            for (int b = 0; b < 4; b++) {
                float ce = __uint_as_float(__byte_perm(lo_n, 0x4b000000u, 0x7440 + b)) - 8388608.0f;
                float co = __uint_as_float(__byte_perm(hi_n, 0x4b000000u, 0x7440 + b)) - 8388608.0f;
                acc[u] = fmaf(qe[b], ce, acc[u]);
                acc[u] = fmaf(qo[b], co, acc[u]);
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < DS4_TOK; u++) {
        long i = i0 + (long)u * blockDim.x;
        if (i < n) {
            float lo = to_f32(f16_t{(u16)(p[u] & 0xffffu)});
            float scale = to_f32(f16_t{(u16)(p[u] >> 16)});
            scores[(long)g * n + i] = lo * qsum + scale * acc[u];
        }
    }
}
#define SCORES4_ARGS                                                                           \
    const float *q, const int *chan, int group, int head_dim, int r, const u32 *codes,        \
        const u32 *params, long cap, long t0, long t1, float *scores
#define SCORES4_KERNEL(W)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) ds_label_scores4_w##W(SCORES4_ARGS) {   \
        ds_label_scores4<W>(q, chan, group, head_dim, r, codes, params, cap, t0, t1, scores);  \
    }
SCORES4_KERNEL(1)
SCORES4_KERNEL(2)
SCORES4_KERNEL(3)
SCORES4_KERNEL(4)
SCORES4_KERNEL(5)
SCORES4_KERNEL(6)
SCORES4_KERNEL(7)
SCORES4_KERNEL(8)
