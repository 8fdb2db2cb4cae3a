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

// Merges the n_split partials of each (query row, head): grid (n_q, n_heads), blockDim.x >= D
// threads (a multiple of 32). The splits' weights exp(m_s - max) are computed once per split, in
// parallel, and kept in shared memory a chunk at a time; each thread then sums its dim over the
// splits with independent loads (the partials are L2-resident).
#define COMBINE_CHUNK 256
extern "C" __global__ void attention_combine(const float* part, float* out, int out_cols,
                                             int out_row0, int n_heads, int head_dim,
                                             int n_split) {
    int i = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    int stride = head_dim + 2;
    const float* pp = part + (size_t)(i * n_heads + h) * n_split * stride;
    __shared__ float red[32];
    __shared__ float f[COMBINE_CHUNK];
    // Largest max over the splits with keys (l > 0; an empty split has m = -inf).
    float mm = NEG_INF;
    for (int s = tid; s < n_split; s += nt)
        if (pp[s * stride + head_dim + 1] > 0.0f) mm = fmaxf(mm, pp[s * stride + head_dim]);
    mm = warp_max(mm);
    if (lane == 0) red[warp] = mm;
    __syncthreads();
    mm = NEG_INF;
    for (int w = 0; w < nw; w++) mm = fmaxf(mm, red[w]);
    float num = 0.0f, den = 0.0f;
    for (int s0 = 0; s0 < n_split; s0 += COMBINE_CHUNK) {
        int n = min(COMBINE_CHUNK, n_split - s0);
        __syncthreads();  // the previous chunk's weights are used up (and red[] is read)
        for (int t = tid; t < n; t += nt) {
            const float* ps = pp + (size_t)(s0 + t) * stride;
            float l = ps[head_dim + 1];
            float w = l > 0.0f ? expf(ps[head_dim] - mm) : 0.0f;
            f[t] = w;
            den += l * w;
        }
        __syncthreads();
        if (tid < head_dim) {
            const float* pd = pp + (size_t)s0 * stride + tid;
            #pragma unroll 8
            for (int t = 0; t < n; t++) num += pd[(size_t)t * stride] * f[t];
        }
    }
    // den: each thread summed its own splits; add them up.
    den = warp_sum(den);
    __syncthreads();
    if (lane == 0) red[warp] = den;
    __syncthreads();
    den = 0.0f;
    for (int w = 0; w < nw; w++) den += red[w];
    if (tid < head_dim)
        out[(size_t)(out_row0 + i) * out_cols + (size_t)h * head_dim + tid] = num / den;
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
// key with the group's queries (queries in shared memory; the key's row read as 16-byte words,
// 64 dims' worth issued before any is used), the warp updates an online softmax per head, then
// accumulates V with each lane owning D/32 consecutive dims (one 4- or 8-byte load per key),
// eight keys' V loads in flight at a time. Templated on the head dim D (64 or 128) and the
// largest group G (4 or 8) so every loop unrolls and the accumulators stay in registers; the
// kernels are named `attention_gqa_<dtype>_d<D>_g<G>`. `sparse_attn_*` (sparse.cu) runs the same
// block over rows picked by an index.
#define GQA_MAX_GROUP 8

// N consecutive values (N = 1, 2 or 4; aligned to N elements) as floats, in one load.
template <int N, typename T> __device__ __forceinline__ void load_n(const T* p, float* o) {
    if constexpr (sizeof(T) == 4) {
        if constexpr (N == 4) { float4 a = *(const float4*)p; o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; }
        else if constexpr (N == 2) { float2 a = *(const float2*)p; o[0] = a.x; o[1] = a.y; }
        else { o[0] = to_f32(p[0]); }
    } else {
        if constexpr (N == 4) {
            uint2 w = *(const uint2*)p;
            uint4 q = make_uint4(w.x, w.y, 0u, 0u);
            float f[8];
            unpack_u4<T>(q, f);
            o[0] = f[0]; o[1] = f[1]; o[2] = f[2]; o[3] = f[3];
        } else if constexpr (N == 2) {
            u32 w = *(const u32*)p;
            T lo, hi;
            lo.x = (u16)(w & 0xffffu);
            hi.x = (u16)(w >> 16);
            o[0] = to_f32(lo);
            o[1] = to_f32(hi);
        } else {
            o[0] = to_f32(p[0]);
        }
    }
}

// 16-byte asynchronous copy global -> shared (sm_80+; a plain load and store before that).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
    *(uint4*)smem = *(const uint4*)gmem;
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Shared memory of gqa_block: per warp a tile of 32 K rows (16-bit K; rows padded by 16 bytes so
// a lane reading its own row hits distinct banks), reused for the warps' merge after the loop.
template <typename T, int D, int G> struct GqaSmem {
    static constexpr int RS = D * (int)sizeof(T) + 16;  // padded row bytes
    static constexpr int TILE = sizeof(T) == 2 ? ATTN_WARPS * 32 * RS : 0;
    static constexpr int MERGE = ATTN_WARPS * G * D * 4;
    static constexpr int BYTES = TILE > MERGE ? TILE : MERGE;
};

// The warp's 32 K rows (row of key jj in lane jj's `row`) into its tile: W = D * 2 / 16 lanes per
// row, so each instruction moves 32 / W whole rows (coalesced), W copies per lane in flight.
template <typename T, int D>
__device__ __forceinline__ void gqa_k_tile(unsigned char* tile, const T* kh, long row, long stride,
                                           int lane) {
    constexpr int W = D * (int)sizeof(T) / 16;  // 16-byte words per row
    constexpr int RPI = 32 / W;                 // rows per instruction
    constexpr int RS = D * (int)sizeof(T) + 16;
    int word = lane % W;
    #pragma unroll
    for (int i = 0; i < W; i++) {
        int key = i * RPI + lane / W;
        long r = __shfl_sync(0xffffffffu, row, key);
        cp_async16(tile + key * RS + word * 16, (const uint4*)(kh + r * stride) + word);
    }
}

// The block's work: the `group` queries at qp (group x D floats) over rows kb..ke of one KV
// head (row j at kh/vh + (ix ? ix[j] : j) * stride elements). With n_split == 1 writes query r's
// normalised output to out[r * D ..]; else its partial (acc[D], max, sum) to
// part[(r * n_split + split) * (D + 2) ..] for attention_combine.
//
// 16-bit K goes through shared memory: the warp copies the next 32 rows into its tile with
// cp.async (whole rows per instruction) while it works on V of the current ones, then each lane
// reads its own row from the tile. (Each lane reading its row straight from global memory made
// consecutive 16-byte loads of a lane depend on L1 keeping the other half of each 32-byte sector,
// which it stops doing beyond about 16 warps per SM.) f32 K is read per lane from global memory.
template <typename T, int D, int G>
__device__ __forceinline__ void gqa_block(const float* qp, const T* kh, const T* vh,
                                          const int* ix, long stride, int kb, int ke, int group,
                                          float scale, int n_split, int split, float* out,
                                          float* part) {
    constexpr int NT = D / 32;            // V dims per lane
    constexpr int VPU = 16 / sizeof(T);   // values per 16-byte word
    constexpr int U = 64 / VPU;           // words per 64 dims
    constexpr bool STAGED = sizeof(T) == 2;
    using SM = GqaSmem<T, D, G>;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    __shared__ __align__(16) float qs[G * D];
    __shared__ __align__(16) unsigned char sm_raw[SM::BYTES];
    __shared__ __align__(16) float ps[ATTN_WARPS][32][G];  // softmax weights of the warp's keys
    __shared__ long rs[ATTN_WARPS][32];                     // their rows
    unsigned char* tile = sm_raw + (STAGED ? warp * 32 * SM::RS : 0);
    for (int x = threadIdx.x; x < group * D; x += blockDim.x) qs[x] = qp[x];

    float m[G], l[G], acc[G][NT];
    #pragma unroll
    for (int r = 0; r < G; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
        #pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    }
    // Row of key j0 + lane (lanes past the end take the warp's first row: valid memory, weight 0).
    auto row_of = [&](int j0) -> long {
        int j = j0 + lane;
        int jr = j < ke ? j : j0;
        return ix ? (long)ix[jr] : (long)jr;
    };
    int j0 = kb + warp * 32;
    long row = j0 < ke ? row_of(j0) : 0;
    if constexpr (STAGED) {
        if (j0 < ke) gqa_k_tile<T, D>(tile, kh, row, stride, lane);
    }
    __syncthreads();  // qs
    for (; j0 < ke; j0 += ATTN_WARPS * 32) {
        bool valid = j0 + lane < ke;
        float s[G];
        #pragma unroll
        for (int r = 0; r < G; r++) s[r] = 0.0f;
        const uint4* kr;
        if constexpr (STAGED) {
            cp_async_wait_all();
            __syncwarp();
            kr = (const uint4*)(tile + lane * SM::RS);
        } else {
            kr = (const uint4*)(kh + row * stride);
        }
        #pragma unroll
        for (int c = 0; c < D / 64; c++) {
            uint4 raw[U];
            #pragma unroll
            for (int u = 0; u < U; u++) raw[u] = kr[c * U + u];
            #pragma unroll
            for (int u = 0; u < U; u++) {
                float kf[VPU];
                unpack_u4<T>(raw[u], kf);
                int d = c * 64 + u * VPU;
                #pragma unroll
                for (int r = 0; r < G; r++) {
                    if (r < group) {
                        const float* qr = qs + r * D + d;
                        float a = 0.0f;
                        #pragma unroll
                        for (int e = 0; e < VPU; e++) a += qr[e] * kf[e];
                        s[r] += a;
                    }
                }
            }
        }
        // The next 32 rows' K into the tile while this step's V is read.
        int jn = j0 + ATTN_WARPS * 32;
        long row_next = jn < ke ? row_of(jn) : 0;
        if constexpr (STAGED) {
            __syncwarp();  // every lane has read its row of the tile
            if (jn < ke) gqa_k_tile<T, D>(tile, kh, row_next, stride, lane);
        }
        float p[G];
        #pragma unroll
        for (int r = 0; r < G; r++) {
            p[r] = 0.0f;
            if (r < group) {
                float sc = valid ? s[r] * scale : NEG_INF;
                float m_new = fmaxf(m[r], warp_max(sc));  // finite: lane 0's key is valid
                float corr = expf(m[r] - m_new);
                p[r] = valid ? expf(sc - m_new) : 0.0f;
                l[r] = l[r] * corr + p[r];  // per-lane partial sums, reduced at the end
                #pragma unroll
                for (int t = 0; t < NT; t++) acc[r][t] *= corr;
                m[r] = m_new;
            }
        }
        // Every lane's weights and row to shared memory; the V loop reads them back as
        // broadcasts (one 16-byte load per key and 4 heads, instead of a shuffle per head).
        __syncwarp();  // the previous step's reads of ps / rs are done
        #pragma unroll
        for (int r = 0; r < G; r += 4)
            *(float4*)&ps[warp][lane][r] = make_float4(p[r], p[r + 1], p[r + 2], p[r + 3]);
        rs[warp][lane] = row;
        __syncwarp();
        int nk = min(32, ke - j0);
        const T* vb = vh + lane * NT;
        #pragma unroll
        for (int jj0 = 0; jj0 < 32; jj0 += 8) {
            if (jj0 < nk) {
                float vf[8][NT];
                #pragma unroll
                for (int u = 0; u < 8; u++) load_n<NT>(vb + rs[warp][jj0 + u] * stride, vf[u]);
                #pragma unroll
                for (int u = 0; u < 8; u++) {
                    #pragma unroll
                    for (int r = 0; r < G; r += 4) {
                        float4 pj = *(const float4*)&ps[warp][jj0 + u][r];
                        float pv[4] = {pj.x, pj.y, pj.z, pj.w};
                        #pragma unroll
                        for (int e = 0; e < 4; e++) {
                            #pragma unroll
                            for (int t = 0; t < NT; t++) acc[r + e][t] += pv[e] * vf[u][t];
                        }
                    }
                }
            }
        }
        row = row_next;
    }

    // Merge the warps through shared memory (the tiles' space: wait until every warp is done).
    __shared__ float sm_m[ATTN_WARPS][G], sm_l[ATTN_WARPS][G];
    float(*sm_acc)[G][D] = (float(*)[G][D])sm_raw;
    __syncthreads();
    #pragma unroll
    for (int r = 0; r < G; r++) {
        if (r < group) {
            float lr = warp_sum(l[r]);
            if (lane == 0) { sm_m[warp][r] = m[r]; sm_l[warp][r] = lr; }
            #pragma unroll
            for (int t = 0; t < NT; t++) sm_acc[warp][r][lane * NT + t] = acc[r][t];
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < group * D; x += blockDim.x) {
        int r = x / D, d = x - r * D;
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
        if (n_split > 1) {
            float* pp = part + ((long)r * n_split + split) * (D + 2);
            pp[d] = o;
            if (d == 0) { pp[D] = mm; pp[D + 1] = lt; }
        } else {
            out[(long)r * D + d] = o / lt;
        }
    }
}

template <typename T, int D, int G>
__device__ void attention_gqa(const float* q, int q_cols, int q_row0, int q_col0, const T* k,
                              const T* v, int kv_cols, float* out, int out_cols, int out_row0,
                              int n_past, int n_heads, int group, int head_dim, int window,
                              float scale, int n_split, int chunk, float* part) {
    int i = blockIdx.x, g = blockIdx.y, split = blockIdx.z;
    int end = n_past + i + 1;
    int start = (window > 0 && end > window) ? end - window : 0;
    int kb = start + split * chunk;
    int ke = min(end, kb + chunk);
    const float* qp = q + (size_t)(q_row0 + i) * q_cols + q_col0 + (size_t)g * group * D;
    float* op = out + (size_t)(out_row0 + i) * out_cols + (size_t)g * group * D;
    float* pp = part + (size_t)(i * n_heads + g * group) * n_split * (D + 2);
    gqa_block<T, D, G>(qp, k + (size_t)g * D, v + (size_t)g * D, nullptr, kv_cols, kb, ke, group,
                       scale, n_split, split, op, pp);
}

#define GQA_KERNEL(NAME, T, D, G)                                                            \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) NAME(ATTN_ARGS(T)) {      \
        attention_gqa<T, D, G>(q, q_cols, q_row0, q_col0, k, v, kv_cols, out, out_cols,     \
                               out_row0, n_past, n_heads, group, head_dim, window, scale,   \
                               n_split, chunk, part);                                       \
    }
GQA_KERNEL(attention_gqa_f32_d64_g4, float, 64, 4)
GQA_KERNEL(attention_gqa_f32_d64_g8, float, 64, 8)
GQA_KERNEL(attention_gqa_f32_d128_g4, float, 128, 4)
GQA_KERNEL(attention_gqa_f32_d128_g8, float, 128, 8)
GQA_KERNEL(attention_gqa_f16_d64_g4, f16_t, 64, 4)
GQA_KERNEL(attention_gqa_f16_d64_g8, f16_t, 64, 8)
GQA_KERNEL(attention_gqa_f16_d128_g4, f16_t, 128, 4)
GQA_KERNEL(attention_gqa_f16_d128_g8, f16_t, 128, 8)
GQA_KERNEL(attention_gqa_bf16_d64_g4, bf16_t, 64, 4)
GQA_KERNEL(attention_gqa_bf16_d64_g8, bf16_t, 64, 8)
GQA_KERNEL(attention_gqa_bf16_d128_g4, bf16_t, 128, 4)
GQA_KERNEL(attention_gqa_bf16_d128_g8, bf16_t, 128, 8)
