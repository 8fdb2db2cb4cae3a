// Causal attention over a dense KV cache, one block per (query row, query head, key split).
//
// ATTN_WARPS warps per block; warp w takes keys kb + w, kb + w + ATTN_WARPS, ... of the block's
// key range; the lanes split the head dimension (dim = lane + 32 t, t < ceil(D / 32) <= 8) and
// reduce the dot product with shuffles. Each warp keeps an online softmax (running max m, sum l,
// accumulator acc) and the warps are merged through shared memory at the end. f32 throughout;
// K/V rows are f32, f16 or bf16. GQA: query head h reads KV head h / group. Sliding window: keys
// in (p - window, p] for a query at position p.
//
// Split-K (flash-decoding): with n_split > 1 the query's key range is cut into chunks of `chunk`
// keys, block z taking chunk z; each block writes its unnormalised partial (acc[D], m, l) to
// `part` and attention_combine merges the splits. With n_split == 1 the block writes the output.
//
// This file is compiled together with ops.cu (which defines to_f32, warp_sum, ...).

#define ATTN_WARPS 4
#define ATTN_MAX_T 8
#define NEG_INF __int_as_float(0xff800000)

template <typename T>
__device__ void attention(const float* q, int q_cols, int q_row0, int q_col0, const T* k,
                          const T* v, int kv_cols, float* out, int out_cols, int out_row0,
                          int n_past, int n_heads, int group, int head_dim, int window,
                          float scale, int n_split, int chunk, float* part) {
    int i = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = h / group;
    int end = n_past + i + 1;
    int start = (window > 0 && end > window) ? end - window : 0;
    int kb = start + split * chunk;
    int ke = min(end, kb + chunk);

    const float* qp = q + (size_t)(q_row0 + i) * q_cols + q_col0 + (size_t)h * head_dim;
    float qr[ATTN_MAX_T], acc[ATTN_MAX_T];
    #pragma unroll
    for (int t = 0; t < ATTN_MAX_T; t++) {
        int d = lane + 32 * t;
        qr[t] = d < head_dim ? qp[d] : 0.0f;
        acc[t] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int j = kb + warp; j < ke; j += ATTN_WARPS) {
        const T* kr = k + (size_t)j * kv_cols + (size_t)g * head_dim;
        float s = 0.0f;
        #pragma unroll
        for (int t = 0; t < ATTN_MAX_T; t++) {
            int d = lane + 32 * t;
            if (d < head_dim) s += qr[t] * to_f32(kr[d]);
        }
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new);  // 0 when m was -inf
        float p = expf(s - m_new);
        l = l * corr + p;
        const T* vr = v + (size_t)j * kv_cols + (size_t)g * head_dim;
        #pragma unroll
        for (int t = 0; t < ATTN_MAX_T; t++) {
            int d = lane + 32 * t;
            if (d < head_dim) acc[t] = acc[t] * corr + p * to_f32(vr[d]);
        }
        m = m_new;
    }

    // Merge the warps: every warp publishes (m, l, acc); warp 0 combines.
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
    __shared__ float sm_acc[ATTN_WARPS][ATTN_MAX_T * 32];
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
    #pragma unroll
    for (int t = 0; t < ATTN_MAX_T; t++) sm_acc[warp][lane + 32 * t] = acc[t];
    __syncthreads();
    if (warp != 0) return;
    float mm = NEG_INF;
    #pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) mm = fmaxf(mm, sm_m[w]);
    float lt = 0.0f, f[ATTN_WARPS];
    #pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) {
        f[w] = sm_l[w] > 0.0f ? expf(sm_m[w] - mm) : 0.0f;  // a warp with no keys adds nothing
        lt += sm_l[w] * f[w];
    }
    if (n_split > 1) {
        // Partial of this split, relative to its own max mm (l = 0 and m = -inf when empty).
        float* pp = part + ((size_t)(i * n_heads + h) * n_split + split) * (head_dim + 2);
        #pragma unroll
        for (int t = 0; t < ATTN_MAX_T; t++) {
            int d = lane + 32 * t;
            if (d < head_dim) {
                float o = 0.0f;
                #pragma unroll
                for (int w = 0; w < ATTN_WARPS; w++) o += sm_acc[w][d] * f[w];
                pp[d] = o;
            }
        }
        if (lane == 0) { pp[head_dim] = mm; pp[head_dim + 1] = lt; }
        return;
    }
    float inv = 1.0f / lt;
    float* op = out + (size_t)(out_row0 + i) * out_cols + (size_t)h * head_dim;
    #pragma unroll
    for (int t = 0; t < ATTN_MAX_T; t++) {
        int d = lane + 32 * t;
        if (d < head_dim) {
            float o = 0.0f;
            #pragma unroll
            for (int w = 0; w < ATTN_WARPS; w++) o += sm_acc[w][d] * f[w];
            op[d] = o * inv;
        }
    }
}

// Merges the n_split partials of each (query row, head): grid (n_q, n_heads), threads over D.
extern "C" __global__ void attention_combine(const float* part, float* out, int out_cols,
                                             int out_row0, int n_heads, int head_dim,
                                             int n_split) {
    int i = blockIdx.x, h = blockIdx.y;
    const float* pp = part + (size_t)(i * n_heads + h) * n_split * (head_dim + 2);
    int stride = head_dim + 2;
    float mm = NEG_INF;
    for (int s = 0; s < n_split; s++)
        if (pp[s * stride + head_dim + 1] > 0.0f) mm = fmaxf(mm, pp[s * stride + head_dim]);
    float* op = out + (size_t)(out_row0 + i) * out_cols + (size_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < n_split; s++) {
            float l = pp[s * stride + head_dim + 1];
            if (l > 0.0f) {
                float f = expf(pp[s * stride + head_dim] - mm);
                num += pp[s * stride + d] * f;
                den += l * f;
            }
        }
        op[d] = num / den;
    }
}

#define ATTN_ARGS(T)                                                                        \
    const float *q, int q_cols, int q_row0, int q_col0, const T *k, const T *v, int kv_cols, \
        float *out, int out_cols, int out_row0, int n_past, int n_heads, int group,          \
        int head_dim, int window, float scale, int n_split, int chunk, float *part
#define ATTN_CALL                                                                            \
    attention(q, q_cols, q_row0, q_col0, k, v, kv_cols, out, out_cols, out_row0, n_past,     \
              n_heads, group, head_dim, window, scale, n_split, chunk, part)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_f32(ATTN_ARGS(float)) { ATTN_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_f16(ATTN_ARGS(f16_t)) { ATTN_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_bf16(ATTN_ARGS(bf16_t)) { ATTN_CALL; }

// ---- GQA attention, one key per lane --------------------------------------------------------
// One block (ATTN_WARPS warps) per (query row, KV head, key split) serving all `group` query
// heads of that KV head, so each K/V row is read once per block instead of once per query head.
// A warp takes 32 keys at a time, one per lane: the lane computes the full dot products of its
// key with the group's queries (queries in shared memory, K read 16 bytes at a time), the warp
// updates an online softmax per head, then accumulates V with the lanes splitting the head dim.
// Needs group <= GQA_MAX_GROUP, head_dim % 32 == 0 and head_dim <= GQA_MAX_D.
#define GQA_MAX_GROUP 8
#define GQA_MAX_D 128
#define GQA_T (GQA_MAX_D / 32)

__device__ __forceinline__ void load8(const float* p, float* o) {
    float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <typename T> __device__ __forceinline__ void load8(const T* p, float* o) {
    uint4 q = *(const uint4*)p;
    u32 w[4] = {q.x, q.y, q.z, q.w};
    #pragma unroll
    for (int t = 0; t < 4; t++) {
        T lo, hi;
        lo.x = (u16)(w[t] & 0xffffu);
        hi.x = (u16)(w[t] >> 16);
        o[2 * t] = to_f32(lo);
        o[2 * t + 1] = to_f32(hi);
    }
}

template <typename T>
__device__ void attention_gqa(const float* q, int q_cols, int q_row0, int q_col0, const T* k,
                              const T* v, int kv_cols, float* out, int out_cols, int out_row0,
                              int n_past, int n_heads, int group, int head_dim, int window,
                              float scale, int n_split, int chunk, float* part) {
    int i = blockIdx.x, g = blockIdx.y, split = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int end = n_past + i + 1;
    int start = (window > 0 && end > window) ? end - window : 0;
    int kb = start + split * chunk;
    int ke = min(end, kb + chunk);
    int nt = head_dim >> 5;

    __shared__ float qs[GQA_MAX_GROUP * GQA_MAX_D];
    const float* qp = q + (size_t)(q_row0 + i) * q_cols + q_col0 + (size_t)g * group * head_dim;
    for (int x = threadIdx.x; x < group * head_dim; x += blockDim.x) qs[x] = qp[x];
    __syncthreads();

    float m[GQA_MAX_GROUP], l[GQA_MAX_GROUP], acc[GQA_MAX_GROUP][GQA_T];
    #pragma unroll
    for (int r = 0; r < GQA_MAX_GROUP; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
        #pragma unroll
        for (int t = 0; t < GQA_T; t++) acc[r][t] = 0.0f;
    }
    for (int j0 = kb + warp * 32; j0 < ke; j0 += ATTN_WARPS * 32) {
        int j = j0 + lane;
        bool valid = j < ke;
        float s[GQA_MAX_GROUP];
        #pragma unroll
        for (int r = 0; r < GQA_MAX_GROUP; r++) s[r] = 0.0f;
        if (valid) {
            const T* kr = k + (size_t)j * kv_cols + (size_t)g * head_dim;
            for (int d = 0; d < head_dim; d += 8) {
                float kf[8];
                load8(kr + d, kf);
                #pragma unroll
                for (int r = 0; r < GQA_MAX_GROUP; r++) {
                    if (r < group) {
                        const float* qr = qs + r * head_dim + d;
                        s[r] += qr[0] * kf[0] + qr[1] * kf[1] + qr[2] * kf[2] + qr[3] * kf[3] +
                                qr[4] * kf[4] + qr[5] * kf[5] + qr[6] * kf[6] + qr[7] * kf[7];
                    }
                }
            }
        }
        float p[GQA_MAX_GROUP];
        #pragma unroll
        for (int r = 0; r < GQA_MAX_GROUP; r++) {
            if (r < group) {
                float sc = valid ? s[r] * scale : NEG_INF;
                float m_new = fmaxf(m[r], warp_max(sc));  // finite: lane 0's key is valid
                float corr = expf(m[r] - m_new);
                p[r] = valid ? expf(sc - m_new) : 0.0f;
                l[r] = l[r] * corr + p[r];  // per-lane partial sums, reduced at the end
                #pragma unroll
                for (int t = 0; t < GQA_T; t++) acc[r][t] *= corr;
                m[r] = m_new;
            }
        }
        int nk = min(32, ke - j0);
        for (int jj = 0; jj < nk; jj++) {
            const T* vr = v + (size_t)(j0 + jj) * kv_cols + (size_t)g * head_dim;
            float vf[GQA_T];
            #pragma unroll
            for (int t = 0; t < GQA_T; t++) vf[t] = t < nt ? to_f32(vr[lane + 32 * t]) : 0.0f;
            #pragma unroll
            for (int r = 0; r < GQA_MAX_GROUP; r++) {
                if (r < group) {
                    float pj = __shfl_sync(0xffffffffu, p[r], jj);
                    #pragma unroll
                    for (int t = 0; t < GQA_T; t++) acc[r][t] += pj * vf[t];
                }
            }
        }
    }

    // Merge the warps through shared memory.
    __shared__ float sm_m[ATTN_WARPS][GQA_MAX_GROUP], sm_l[ATTN_WARPS][GQA_MAX_GROUP];
    __shared__ float sm_acc[ATTN_WARPS][GQA_MAX_GROUP][GQA_MAX_D];
    #pragma unroll
    for (int r = 0; r < GQA_MAX_GROUP; r++) {
        if (r < group) {
            float lr = warp_sum(l[r]);
            if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = lr; }
            #pragma unroll
            for (int t = 0; t < GQA_T; t++)
                if (t < nt) sm_acc[warp][r][lane + 32 * t] = acc[r][t];
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < group * head_dim; x += blockDim.x) {
        int r = x / head_dim, d = x - r * head_dim;
        float mm = NEG_INF;
        #pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) mm = fmaxf(mm, sm_m[w][r]);
        float lt = 0.0f, o = 0.0f;
        #pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) {
            float f = sm_l[w][r] > 0.0f ? expf(sm_m[w][r] - mm) : 0.0f;
            lt += sm_l[w][r] * f;
            o += sm_acc[w][r][d] * f;
        }
        int h = g * group + r;
        if (n_split > 1) {
            float* pp = part + ((size_t)(i * n_heads + h) * n_split + split) * (head_dim + 2);
            pp[d] = o;
            if (d == 0) { pp[head_dim] = mm; pp[head_dim + 1] = lt; }
        } else {
            out[(size_t)(out_row0 + i) * out_cols + (size_t)h * head_dim + d] = o / lt;
        }
    }
}

#define GQA_CALL                                                                             \
    attention_gqa(q, q_cols, q_row0, q_col0, k, v, kv_cols, out, out_cols, out_row0, n_past, \
                  n_heads, group, head_dim, window, scale, n_split, chunk, part)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_gqa_f32(ATTN_ARGS(float)) { GQA_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_gqa_f16(ATTN_ARGS(f16_t)) { GQA_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_gqa_bf16(ATTN_ARGS(bf16_t)) { GQA_CALL; }
