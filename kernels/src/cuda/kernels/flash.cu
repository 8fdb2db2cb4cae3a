// Flash attention (FlashAttention-2 style) for chunked causal prefill over a 16-bit KV cache, on
// the tensor cores (mma.sync m16n8k16, f32 accumulation).
//
// One block of FA_WARPS warps per (tile of FA_BM query rows, query head); warp w owns query rows
// w*16 .. w*16+15 of the tile. The block walks the key range of its rows in tiles of FA_BN keys:
// K and V tiles are copied to shared memory with cp.async (two stages: the next tile loads while
// the current one is used), S = Q K^T comes from ldmatrix'd K fragments, the online softmax
// (running max m, sum l, per row) is kept in registers, and P (rounded to the KV dtype) times V
// (ldmatrix.trans) accumulates into the f32 output fragments. Causal mask, sliding window (keys
// in (p - window, p]), GQA (head h reads KV head h / group) and chunked prefill (queries at
// positions n_past ..) as CausalAttn documents; rows past the cache's last key are zero-filled.
//
// Precision: Q is rounded to the KV dtype (f16 or bf16) for the QK^T product and P likewise for
// PV, as FlashAttention and PyTorch SDPA do; everything else is f32. Head dims 64 and 128.
//
// Compiled together with ops.cu (u16, u32, f16_t, bf16_t, NEG_INF from attention.cu).

#define FA_BM 64
#define FA_BN 64
#define FA_WARPS 4
#define FA_PAD 8

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// Two f32 values as a packed pair of the 16-bit type (lo in the low half), rounded to nearest.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<bf16_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ u32 pack2<f16_t>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c (16x8 f32) += a (16x16, row) * b (16x8, col).
template <typename T> __device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<bf16_t>(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16_t>(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

extern __shared__ __align__(16) unsigned char fa_smem[];

template <typename T, int D>
__device__ void flash_attn(const float* q, int q_cols, int q_row0, int q_col0, const T* k,
                           const T* v, int kv_cols, float* out, int out_cols, int out_row0,
                           int n_q, int n_past, int group, int window, float scale_log2) {
    constexpr int STRIDE = D + FA_PAD;  // u16 per shared row (16-byte pad: no bank conflicts)
    constexpr int KD = D / 16;          // k-steps of QK^T
    constexpr int CH = D / 8;           // 16-byte chunks per row
    u16* ks = (u16*)fa_smem;            // [2][FA_BN][STRIDE]
    u16* vs = ks + 2 * FA_BN * STRIDE;  // [2][FA_BN][STRIDE]

    const int qb = gridDim.x - 1 - blockIdx.x;  // the longest (last) query tiles first
    const int h = blockIdx.y, g = h / group;
    const int i0 = qb * FA_BM;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gr = lane >> 2, gc = lane & 3;
    const int total = n_past + n_q;
    const int last = min(i0 + FA_BM, n_q) - 1;
    const int kend = n_past + last + 1;
    const int kbeg = window > 0 ? max(0, n_past + i0 + 1 - window) : 0;
    const int t0 = kbeg / FA_BN, t1 = (kend + FA_BN - 1) / FA_BN;

    // Q fragments (A operand) of rows r0 = i0 + 16 warp + gr and r1 = r0 + 8.
    const int r0 = i0 + warp * 16 + gr, r1 = r0 + 8;
    const bool v0 = r0 < n_q, v1 = r1 < n_q;
    const float* q0 = q + (size_t)(q_row0 + (v0 ? r0 : 0)) * q_cols + q_col0 + (size_t)h * D;
    const float* q1 = q + (size_t)(q_row0 + (v1 ? r1 : 0)) * q_cols + q_col0 + (size_t)h * D;
    u32 qf[KD][4];
    #pragma unroll
    for (int kk = 0; kk < KD; kk++) {
        int d = kk * 16 + 2 * gc;
        qf[kk][0] = v0 ? pack2<T>(q0[d], q0[d + 1]) : 0u;
        qf[kk][1] = v1 ? pack2<T>(q1[d], q1[d + 1]) : 0u;
        qf[kk][2] = v0 ? pack2<T>(q0[d + 8], q0[d + 9]) : 0u;
        qf[kk][3] = v1 ? pack2<T>(q1[d + 8], q1[d + 9]) : 0u;
    }

    auto load_tile = [&](int t, int buf) {
        const int j0 = t * FA_BN;
        for (int c = threadIdx.x; c < FA_BN * CH; c += FA_WARPS * 32) {
            int r = c / CH, cc = c - r * CH;
            int j = j0 + r;
            bool ok = j < total;
            size_t off = (size_t)(ok ? j : 0) * kv_cols + (size_t)g * D + cc * 8;
            int so = (buf * FA_BN + r) * STRIDE + cc * 8;
            cp_async16(smem_u32(ks + so), k + off, ok ? 16 : 0);
            cp_async16(smem_u32(vs + so), v + off, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    float o[D / 8][4];
    #pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const int pos0 = n_past + r0, pos1 = n_past + r1;

    if (t0 < t1) load_tile(t0, 0);
    for (int t = t0; t < t1; t++) {
        const int buf = (t - t0) & 1;
        if (t + 1 < t1) {
            load_tile(t + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows and the tile's FA_BN keys.
        float s[FA_BN / 8][4];
        #pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const u16* kb = ks + buf * FA_BN * STRIDE;
        #pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            #pragma unroll
            for (int np = 0; np < FA_BN / 16; np++) {
                int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
                int dim = kk * 16 + ((lane >> 3) & 1) * 8;
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_u32(kb + key * STRIDE + dim), b0, b1, b2, b3);
                mma16816<T>(s[2 * np], qf[kk], b0, b1);
                mma16816<T>(s[2 * np + 1], qf[kk], b2, b3);
            }
        }

        // Scale (to log2 units), mask, online softmax.
        const int j0 = t * FA_BN;
        const bool need_mask = (j0 + FA_BN - 1 > n_past + i0) ||
                               (window > 0 && j0 <= n_past + i0 + FA_BM - 1 - window);
        #pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[nt][e] * scale_log2;
                if (need_mask) {
                    int j = j0 + nt * 8 + 2 * gc + (e & 1);
                    int p = e < 2 ? pos0 : pos1;
                    if (j > p || (window > 0 && j <= p - window)) x = NEG_INF;
                }
                s[nt][e] = x;
            }
        }
        float mx[2] = {m[0], m[1]};
        #pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
        float mu[2], corr[2];
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            mu[r] = mx[r] == NEG_INF ? 0.0f : mx[r];  // a row with no key yet stays at zero
            corr[r] = exp2f(m[r] - mu[r]);
            m[r] = mx[r];
            l[r] *= corr[r];
        }
        #pragma unroll
        for (int nt = 0; nt < FA_BN / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - mu[0]);
            s[nt][1] = exp2f(s[nt][1] - mu[0]);
            s[nt][2] = exp2f(s[nt][2] - mu[1]);
            s[nt][3] = exp2f(s[nt][3] - mu[1]);
            l[0] += s[nt][0] + s[nt][1];
            l[1] += s[nt][2] + s[nt][3];
        }
        #pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }

        // O += P V.
        const u16* vb = vs + buf * FA_BN * STRIDE;
        #pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++) {
            u32 a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                        pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            #pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                int dim = dp * 16 + (lane >> 4) * 8;
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(vb + key * STRIDE + dim), b0, b1, b2, b3);
                mma16816<T>(o[2 * dp], a, b0, b1);
                mma16816<T>(o[2 * dp + 1], a, b2, b3);
            }
        }
        __syncthreads();  // the buffer is refilled two tiles later
    }

    #pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if (v0) {
        float inv = 1.0f / l[0];
        float* op = out + (size_t)(out_row0 + r0) * out_cols + (size_t)h * D + 2 * gc;
        #pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            op[dt * 8] = o[dt][0] * inv;
            op[dt * 8 + 1] = o[dt][1] * inv;
        }
    }
    if (v1) {
        float inv = 1.0f / l[1];
        float* op = out + (size_t)(out_row0 + r1) * out_cols + (size_t)h * D + 2 * gc;
        #pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            op[dt * 8] = o[dt][2] * inv;
            op[dt * 8 + 1] = o[dt][3] * inv;
        }
    }
}

#define FA_ARGS(T)                                                                            \
    const float *q, int q_cols, int q_row0, int q_col0, const T *k, const T *v, int kv_cols,   \
        float *out, int out_cols, int out_row0, int n_q, int n_past, int group, int window,    \
        float scale_log2
#define FA_CALL(T, D)                                                                         \
    flash_attn<T, D>(q, q_cols, q_row0, q_col0, k, v, kv_cols, out, out_cols, out_row0, n_q,   \
                     n_past, group, window, scale_log2)
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_f16_d64(FA_ARGS(f16_t)) { FA_CALL(f16_t, 64); }
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_f16_d128(FA_ARGS(f16_t)) { FA_CALL(f16_t, 128); }
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_bf16_d64(FA_ARGS(bf16_t)) { FA_CALL(bf16_t, 64); }
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_bf16_d128(FA_ARGS(bf16_t)) { FA_CALL(bf16_t, 128); }
