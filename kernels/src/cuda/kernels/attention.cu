// Causal attention over a dense KV cache, one block per (query row, query head).
//
// ATTN_WARPS warps per block; warp w takes keys start + w, start + w + ATTN_WARPS, ...; the
// lanes split the head dimension (dim = lane + 32 t, t < ceil(D / 32) <= 8) and reduce the dot
// product with shuffles. Each warp keeps an online softmax (running max m, sum l, accumulator
// acc) and the warps are merged through shared memory at the end. f32 throughout; K/V rows are
// f32, f16 or bf16. GQA: query head h reads KV head h / group. Sliding window: keys in
// (p - window, p] for a query at position p.
//
// This file is compiled together with ops.cu (which defines to_f32, warp_sum, ...).

#define ATTN_WARPS 4
#define ATTN_MAX_T 8
#define NEG_INF __int_as_float(0xff800000)

template <typename T>
__device__ void attention(const float* q, int q_cols, int q_row0, int q_col0, const T* k,
                          const T* v, int kv_cols, float* out, int out_cols, int out_row0,
                          int n_past, int n_heads, int group, int head_dim, int window,
                          float scale) {
    int i = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = h / group;
    int end = n_past + i + 1;
    int start = (window > 0 && end > window) ? end - window : 0;

    const float* qp = q + (size_t)(q_row0 + i) * q_cols + q_col0 + (size_t)h * head_dim;
    float qr[ATTN_MAX_T], acc[ATTN_MAX_T];
    #pragma unroll
    for (int t = 0; t < ATTN_MAX_T; t++) {
        int d = lane + 32 * t;
        qr[t] = d < head_dim ? qp[d] : 0.0f;
        acc[t] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int j = start + warp; j < end; j += ATTN_WARPS) {
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

#define ATTN_ARGS(T)                                                                        \
    const float *q, int q_cols, int q_row0, int q_col0, const T *k, const T *v, int kv_cols, \
        float *out, int out_cols, int out_row0, int n_past, int n_heads, int group,          \
        int head_dim, int window, float scale
#define ATTN_CALL                                                                            \
    attention(q, q_cols, q_row0, q_col0, k, v, kv_cols, out, out_cols, out_row0, n_past,     \
              n_heads, group, head_dim, window, scale)
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_f32(ATTN_ARGS(float)) { ATTN_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_f16(ATTN_ARGS(f16_t)) { ATTN_CALL; }
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_bf16(ATTN_ARGS(bf16_t)) { ATTN_CALL; }
