// farsight CUDA kernels: element-wise ops, norms, rope, conversions, attention.
// Compiled at run time by NVRTC (no headers: f16/bf16 are handled as raw 16-bit words).
// Activations are f32; weights and caches are f32, f16 or bf16.

typedef unsigned short u16;
typedef unsigned int u32;

struct f16_t { u16 x; };
struct bf16_t { u16 x; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((u32)v.x) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    // Round to nearest even, NaN kept quiet (as the `half` crate does).
    u32 b = __float_as_uint(v);
    bf16_t r;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        r.x = (u16)((b >> 16) | 0x0040u);
    } else {
        r.x = (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
    }
    return r;
}

// ---- embedding: out[i, :] = table[ids[i], :] ----------------------------------------------
template <typename T>
__device__ void embedding(const T* table, const u32* ids, float* out, int cols, int rows) {
    for (int i = blockIdx.y; i < rows; i += gridDim.y) {
        const T* row = table + (size_t)ids[i] * cols;
        float* o = out + (size_t)i * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            o[c] = to_f32(row[c]);
    }
}
extern "C" __global__ void embedding_f32(const float* t, const u32* ids, float* o, int c, int n) { embedding(t, ids, o, c, n); }
extern "C" __global__ void embedding_f16(const f16_t* t, const u32* ids, float* o, int c, int n) { embedding(t, ids, o, c, n); }
extern "C" __global__ void embedding_bf16(const bf16_t* t, const u32* ids, float* o, int c, int n) { embedding(t, ids, o, c, n); }

// ---- block reductions -----------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// IEEE total order of f32 as unsigned order (Rust's f32::total_cmp), and back: the keys of the
// radix selects (top-k in sparse.cu, sampling in sample.cu).
__device__ __forceinline__ u32 f32_ord(float v) {
    u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float f32_unord(u32 o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = lane < nw ? part[lane] : 0.0f;
    return warp_sum(t);
}

// ---- rms_norm: one block per row ------------------------------------------------------------
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int cols, float eps) {
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c] * xr[c];
    s = block_sum(s);
    float inv = 1.0f / sqrtf(s / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = w[c] * (xr[c] * inv);
}

// ---- bias add: out[r, c] += b[c] ------------------------------------------------------------
extern "C" __global__ void add_bias(float* out, const float* b, int cols, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] += b[i % cols];
    }
}

// ---- add: x += y ----------------------------------------------------------------------------
extern "C" __global__ void add(float* x, const float* y, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// ---- silu_mul: out[r, c] = silu(gu[r, c]) * gu[r, I + c] ------------------------------------
extern "C" __global__ void silu_mul(const float* gu, float* out, int inter, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / inter;
        int c = (int)(i - r * inter);
        float g = gu[r * 2 * inter + c];
        float u = gu[r * 2 * inter + inter + c];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

// ---- rope (rotate half): grid (rows, heads), threads over the half dim ----------------------
extern "C" __global__ void rope(float* x, int cols, int col0, int head_dim, const u32* pos,
                                const float* inv_freq, float scaling) {
    int r = blockIdx.x, h = blockIdx.y, half = head_dim / 2;
    float* hp = x + (size_t)r * cols + col0 + (size_t)h * head_dim;
    float p = (float)pos[r];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = p * inv_freq[i];
        float c = cosf(a) * scaling, s = sinf(a) * scaling;
        float x0 = hp[i], x1 = hp[i + half];
        hp[i] = x0 * c - x1 * s;
        hp[i + half] = x1 * c + x0 * s;
    }
}

// ---- gather_rows: dst[dst_row0 + i] = src[rows[i]] ------------------------------------------
extern "C" __global__ void gather_rows(const float* src, const u32* rows, float* dst, int cols, int n) {
    for (int i = blockIdx.y; i < n; i += gridDim.y) {
        const float* s = src + (size_t)rows[i] * cols;
        float* d = dst + (size_t)i * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) d[c] = s[c];
    }
}

// ---- cache_write: cache[dst_row0 + i, :] = convert(src[src_row0 + i, src_col0 ..]) ----------
template <typename T>
__device__ void cache_write(T* cache, int cache_cols, const float* src, int src_cols, int n) {
    for (int i = blockIdx.y; i < n; i += gridDim.y) {
        const float* s = src + (size_t)i * src_cols;
        T* d = cache + (size_t)i * cache_cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cache_cols; c += gridDim.x * blockDim.x)
            d[c] = from_f32<T>(s[c]);
    }
}
extern "C" __global__ void cache_write_f32(float* c, int cc, const float* s, int sc, int n) { cache_write(c, cc, s, sc, n); }
extern "C" __global__ void cache_write_f16(f16_t* c, int cc, const float* s, int sc, int n) { cache_write(c, cc, s, sc, n); }
extern "C" __global__ void cache_write_bf16(bf16_t* c, int cc, const float* s, int sc, int n) { cache_write(c, cc, s, sc, n); }

// ---- cast f32 activations to a 16-bit weight dtype (for cuBLAS with 16-bit weights) ---------
// x is rows x cols with row stride `stride` (elements); out is dense rows x cols.
template <typename T>
__device__ void cast_rows(const float* x, T* out, int cols, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = from_f32<T>(x[i]);
    }
}
extern "C" __global__ void cast_f16(const float* x, f16_t* o, int c, long long t) { cast_rows(x, o, c, t); }
extern "C" __global__ void cast_bf16(const float* x, bf16_t* o, int c, long long t) { cast_rows(x, o, c, t); }

// Eight (16-bit T) or four (f32) values of one 16-byte word as floats.
template <typename T> __device__ __forceinline__ void unpack_u4(uint4 w, float* o) {
    if constexpr (sizeof(T) == 4) {
        o[0] = __uint_as_float(w.x); o[1] = __uint_as_float(w.y);
        o[2] = __uint_as_float(w.z); o[3] = __uint_as_float(w.w);
    } else {
        u32 a[4] = {w.x, w.y, w.z, w.w};
        #pragma unroll
        for (int t = 0; t < 4; t++) {
            T lo, hi;
            lo.x = (u16)(a[t] & 0xffffu);
            hi.x = (u16)(a[t] >> 16);
            o[2 * t] = to_f32(lo);
            o[2 * t + 1] = to_f32(hi);
        }
    }
}

// x[0..8] . the 8 16-bit weights of one 16-byte word, in the order of the CPU backend's sum.
template <typename T>
__device__ __forceinline__ float dot8(uint4 q, float4 a, float4 b) {
    float wf[8];
    unpack_u4<T>(q, wf);
    return a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
           b.z * wf[6] + b.w * wf[7];
}

// ---- gemv for a few rows: out[r, j] = sum_k x[r, k] * W[j, k], W 16-bit, x f32 --------------
// One warp per output column j (a row of W); lanes stride over k, 8 weights (16 bytes) at a time
// when k is a multiple of 8. x rows (at most GEMV_ROWS) are read through the cache. f32
// accumulation of f32 x times the exact weight values: the same function as the CPU backend.
#define GEMV_ROWS 8
template <typename T>
__device__ void gemv(const float* x, const T* w, float* out, int n, int k, int nout) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= nout) return;
    const T* wr = w + (size_t)warp * k;
    float acc[GEMV_ROWS];
    #pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
    if ((k & 7) == 0) {
        const uint4* wv = (const uint4*)wr;
        int nv = k >> 3;
        for (int v = lane; v < nv; v += 32) {
            uint4 q = wv[v];
            #pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r < n) {
                    const float4* xv = (const float4*)(x + (size_t)r * k + v * 8);
                    acc[r] += dot8<T>(q, xv[0], xv[1]);
                }
            }
        }
    } else {
        for (int c = lane; c < k; c += 32) {
            float wf = to_f32(wr[c]);
            #pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++)
                if (r < n) acc[r] += x[(size_t)r * k + c] * wf;
        }
    }
    #pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < n) {
            float s = warp_sum(acc[r]);
            if (lane == 0) out[(size_t)r * nout + warp] = s;
        }
    }
}
// One activation row (batch-1 decode), k a multiple of 8: each lane keeps L 16-byte weight loads
// in flight (streaming, not kept in L1) before using them, so that enough bytes are outstanding
// to cover HBM latency with one warp per output. Kernels: gemv1_* (L = 8), gemv1l4_* (L = 4).
template <typename T, int L>
__device__ void gemv1(const float* x, const T* w, float* out, int k, int nout) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= nout) return;
    const uint4* wv = (const uint4*)(w + (size_t)warp * k);
    const float4* xv = (const float4*)x;
    int nv = k >> 3;
    float acc = 0.0f;
    int v = lane;
    for (; v + 32 * (L - 1) < nv; v += 32 * L) {
        uint4 q[L];
        #pragma unroll
        for (int u = 0; u < L; u++) q[u] = __ldcs(wv + v + 32 * u);
        #pragma unroll
        for (int u = 0; u < L; u++) {
            int c = v + 32 * u;
            acc += dot8<T>(q[u], __ldg(xv + 2 * c), __ldg(xv + 2 * c + 1));
        }
    }
    for (; v < nv; v += 32) acc += dot8<T>(__ldcs(wv + v), __ldg(xv + 2 * v), __ldg(xv + 2 * v + 1));
    acc = warp_sum(acc);
    if (lane == 0) out[warp] = acc;
}
// The same sums as gemv1<T, 8>, bit for bit, from a persistent grid: each warp walks rows
// warp, warp + warps, ... as one stream of 8-load batches and issues the next batch's loads
// (possibly the next row's) before it computes the current one, so a warp never waits for a
// whole batch's latency between rows and no block launches or retires mid-GEMV.
// Kernels gemv1p_* (`FARSIGHT_GEMV=persist`); launched with a few blocks per SM.
template <typename T>
__device__ void gemv1p(const float* x, const T* w, float* out, int k, int nout) {
    const int L = 8;
    int lane = threadIdx.x & 31;
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int stride = (gridDim.x * blockDim.x) >> 5;
    if (row >= nout) return;
    const float4* xv = (const float4*)x;
    int nv = k >> 3, nb = max((nv + 32 * L - 1) / (32 * L), 1);
    uint4 cur[L], nxt[L];
    int b = 0;
    const uint4* wr = (const uint4*)(w + (size_t)row * k);
    #pragma unroll
    for (int u = 0; u < L; u++) {
        int c = lane + 32 * u;
        if (c < nv) cur[u] = __ldcs(wr + c);
    }
    float acc = 0.0f;
    for (;;) {
        int nrow = row, nbt = b + 1;
        if (nbt == nb) { nbt = 0; nrow += stride; }
        bool more = nrow < nout;
        if (more) {
            const uint4* wn = (const uint4*)(w + (size_t)nrow * k);
            #pragma unroll
            for (int u = 0; u < L; u++) {
                int c = nbt * 32 * L + lane + 32 * u;
                if (c < nv) nxt[u] = __ldcs(wn + c);
            }
        }
        #pragma unroll
        for (int u = 0; u < L; u++) {
            int c = b * 32 * L + lane + 32 * u;
            if (c < nv) acc += dot8<T>(cur[u], __ldg(xv + 2 * c), __ldg(xv + 2 * c + 1));
        }
        if (nbt == 0) {
            acc = warp_sum(acc);
            if (lane == 0) out[row] = acc;
            acc = 0.0f;
        }
        if (!more) break;
        row = nrow;
        b = nbt;
        #pragma unroll
        for (int u = 0; u < L; u++) cur[u] = nxt[u];
    }
}
extern "C" __global__ void __launch_bounds__(256, 2) gemv1_f16(const float* x, const f16_t* w, float* o, int k, int m) { gemv1<f16_t, 8>(x, w, o, k, m); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv1_bf16(const float* x, const bf16_t* w, float* o, int k, int m) { gemv1<bf16_t, 8>(x, w, o, k, m); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv1p_f16(const float* x, const f16_t* w, float* o, int k, int m) { gemv1p<f16_t>(x, w, o, k, m); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv1p_bf16(const float* x, const bf16_t* w, float* o, int k, int m) { gemv1p<bf16_t>(x, w, o, k, m); }
extern "C" __global__ void gemv1l4_f16(const float* x, const f16_t* w, float* o, int k, int m) { gemv1<f16_t, 4>(x, w, o, k, m); }
extern "C" __global__ void gemv1l4_bf16(const float* x, const bf16_t* w, float* o, int k, int m) { gemv1<bf16_t, 4>(x, w, o, k, m); }
extern "C" __global__ void gemv_f16(const float* x, const f16_t* w, float* o, int n, int k, int m) { gemv(x, w, o, n, k, m); }
extern "C" __global__ void gemv_bf16(const float* x, const bf16_t* w, float* o, int n, int k, int m) { gemv(x, w, o, n, k, m); }
