// Offloaded decode (ALGORITHMS.md section 2): new KV rows written to pinned host memory and to
// the GPU's sink/recent window, labels written as rows arrive, differential residency of the
// GPU row cache (only rows not already resident cross PCIe), prefill staging of a layer's past
// rows from host, and layer-ahead query labels. Compiled after sparse.cu (u64, DS_INFLIGHT) and
// labels.cu (ds_label4_warp).

// ---- new rows ---------------------------------------------------------------------------------
// Rows i in [0, n) of `src` (f32, `src_cols` wide; K at column k_col0 + g*D, V at v_col0 + g*D)
// are tokens t0 + i. Token t goes to slot(t) of `dst` as [K | V] of 2*D elements per (slot, g):
// dst + (slot * tok_stride + g * head_stride) elements. slot(t) = t when ring == 0 (the host
// slab), else t for sinks (t < n_sink) and n_sink + (t - n_sink) % ring for the rest (the GPU
// window); in ring mode tokens that a later token of the same call overwrites are skipped.
// `labels` (nullable): labels[g][t][c] = f16(K[chan[g*r + c]]), `cap` tokens per head; or
// `codes4`/`params4` (nullable): the tokens' 4-bit labels (labels.cu, `words4` code words per
// row), written by warp 0.
// Grid (n, n_kv), block 2*D threads (D <= 256; at least 32 with 4-bit labels).
template <typename T>
__device__ void ds_put_rows(const float* src, int src_cols, int k_col0, int v_col0, int n,
                            int head_dim, u64 dst, long tok_stride, long head_stride, long t0,
                            int n_sink, int ring, const int* chan, int r, f16_t* labels,
                            long cap, u32* codes4, u32* params4, int words4) {
    int i = blockIdx.x, g = blockIdx.y, c = threadIdx.x;
    long t = t0 + i;
    const float* row = src + (long)i * src_cols;
    if (labels && c < r) {
        labels[((long)g * cap + t) * r + c] =
            from_f32<f16_t>(row[k_col0 + g * head_dim + chan[g * r + c]]);
    }
    if (codes4 && c < 32) {
        ds_label4_warp(row + k_col0 + g * head_dim, chan + g * r, r, words4,
                       codes4 + ((long)g * cap + t) * words4, params4 + (long)g * cap + t);
    }
    long slot = t;
    if (ring > 0 && t >= n_sink) {
        if (t + ring < t0 + n) return;  // overwritten by a later token of this call
        slot = n_sink + (t - n_sink) % ring;
    }
    if (c >= 2 * head_dim) return;
    float x = c < head_dim ? row[k_col0 + g * head_dim + c] : row[v_col0 + g * head_dim + c - head_dim];
    T* out = (T*)dst + slot * tok_stride + (long)g * head_stride;
    out[c] = from_f32<T>(x);
}
#define PUT_ARGS                                                                                 \
    const float *src, int src_cols, int k_col0, int v_col0, int n, int head_dim, u64 dst,       \
        long tok_stride, long head_stride, long t0, int n_sink, int ring, const int *chan, int r, \
        f16_t *labels, long cap, u32 *codes4, u32 *params4, int words4
#define PUT_CALL(T)                                                                              \
    ds_put_rows<T>(src, src_cols, k_col0, v_col0, n, head_dim, dst, tok_stride, head_stride, t0, \
                   n_sink, ring, chan, r, labels, cap, codes4, params4, words4)
extern "C" __global__ void ds_put_rows_f16(PUT_ARGS) { PUT_CALL(f16_t); }
extern "C" __global__ void ds_put_rows_bf16(PUT_ARGS) { PUT_CALL(bf16_t); }

// ---- differential residency -------------------------------------------------------------------
// Per KV head g (one block): the new selection sel[g][0..k_new) (sorted ascending, as ds_topk
// writes it) against the resident tokens res_tok[g][0..k_prev) (sorted: the previous
// selection) and their cache slots res_slot[g][..]. A selected token already resident keeps its
// slot; the others (misses) take the slots of residents no longer selected, then the never-used
// slots k_prev..k_new (k_new >= k_prev). Writes the misses (token, slot) for the gather, their
// count n_miss[g], adds it to stats[0] and the hits to stats[1], and leaves res_tok = sel,
// res_slot = the slots of sel (new_slot: scratch of the same shape). Block of DS_RES_THREADS threads, k up to any size.
#define DS_RES_THREADS 1024
__device__ __forceinline__ bool ds_find(const int* a, int n, int x, int* at) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (a[mid] < x) lo = mid + 1; else hi = mid;
    }
    *at = lo;
    return lo < n && a[lo] == x;
}
// Exclusive block scan of one flag per thread; returns the prefix, *total the block's sum.
__device__ int ds_block_scan(int flag, int* total) {
    __shared__ int warp_tot[DS_RES_THREADS / 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned ballot = __ballot_sync(0xffffffffu, flag);
    int pre = __popc(ballot & ((1u << lane) - 1));
    if (lane == 0) warp_tot[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        int v = warp_tot[w];
        if (w < warp) before += v;
        all += v;
    }
    __syncthreads();
    *total = all;
    return before + pre;
}
extern "C" __global__ void __launch_bounds__(DS_RES_THREADS)
ds_residency(const int* sel, long sel_stride, int k_new, int* res_tok, int* res_slot,
             int* new_slot, long res_stride, int k_prev, int* miss_tok, int* miss_slot,
             int* n_miss, unsigned long long* stats, int use_smem) {
    int g = blockIdx.x;
    const int* s_g = sel + g * sel_stride;
    int* rt = res_tok + g * res_stride;
    int* rs = res_slot + g * res_stride;
    int* ns = new_slot + g * res_stride;
    int* mt = miss_tok + g * res_stride;
    int* ms = miss_slot + g * res_stride;
    // The binary searches read the selection and the residents from shared memory when they fit
    // (use_smem: k_new + k_prev ints of dynamic shared memory), else from global memory.
    extern __shared__ int ds_res_smem[];
    const int* s = s_g;
    const int* rtf = rt;
    if (use_smem) {
        for (int i = threadIdx.x; i < k_new; i += blockDim.x) ds_res_smem[i] = s_g[i];
        for (int i = threadIdx.x; i < k_prev; i += blockDim.x) ds_res_smem[k_new + i] = rt[i];
        __syncthreads();
        s = ds_res_smem;
        rtf = ds_res_smem + k_new;
    }
    // Pass 1: free slots = slots of residents not selected (in resident order), then k_prev..
    int n_free = 0;
    for (int j0 = 0; j0 < k_prev; j0 += blockDim.x) {
        int j = j0 + threadIdx.x, at;
        int dropped = j < k_prev && !ds_find(s, k_new, rtf[j], &at);
        int total, pre = ds_block_scan(dropped, &total);
        if (dropped) ms[n_free + pre] = rs[j];  // staged in miss_slot, consumed in pass 2
        n_free += total;
    }
    // Pass 2: hits keep their slot, misses take free slots in order.
    int n_m = 0;
    for (int i0 = 0; i0 < k_new; i0 += blockDim.x) {
        int i = i0 + threadIdx.x, at = 0;
        int miss = 0;
        if (i < k_new) {
            int tok = s[i];
            if (ds_find(rtf, k_prev, tok, &at)) ns[i] = rs[at];
            else miss = 1;
        }
        int total, pre = ds_block_scan(miss, &total);
        if (miss) {
            int m = n_m + pre;
            int slot = m < n_free ? ms[m] : k_prev + (m - n_free);
            ns[i] = slot;
            mt[m] = s[i];
            ms[m] = slot;  // the same value where a free slot was staged
        }
        n_m += total;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < k_new; i += blockDim.x) {
        rt[i] = s[i];
        rs[i] = ns[i];
    }
    if (threadIdx.x == 0) {
        n_miss[g] = n_m;
        atomicAdd(stats, (unsigned long long)n_m);
        atomicAdd(stats + 1, (unsigned long long)(k_new - n_m));
    }
}

// Copies the misses' rows: for head g and m < n_miss[g], the row of token miss_tok[g][m]
// (src + tok*tok_stride + g*head_stride bytes; pinned host memory or device) to the cache slot
// dst + (g*dst_head_rows + slot0 + miss_slot[g][m]) * row_bytes. The lists have `res_stride`
// entries per head; at most `walk` misses per head are looked at. 16-byte units, several
// independent loads in flight per thread (as ds_gather_rows).
extern "C" __global__ void ds_gather_misses(u64 src, long tok_stride, long head_stride,
                                            const int* miss_tok, const int* miss_slot,
                                            const int* n_miss, long res_stride, int walk,
                                            int heads, int row_u4, uint4* dst,
                                            long dst_head_rows, int slot0) {
    long units = (long)heads * walk * row_u4;
    long stride = (long)gridDim.x * blockDim.x;
    for (long base = (long)blockIdx.x * blockDim.x + threadIdx.x; base < units;
         base += stride * DS_INFLIGHT) {
        uint4 v[DS_INFLIGHT];
        long to[DS_INFLIGHT];
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++) {
            long e = base + u * stride;
            to[u] = -1;
            if (e < units) {
                long rr = e / row_u4;
                int c = (int)(e - rr * row_u4);
                int g = (int)(rr / walk), m = (int)(rr - (long)g * walk);
                if (m < n_miss[g]) {
                    long t = miss_tok[g * res_stride + m];
                    const uint4* p = (const uint4*)(src + t * tok_stride + (long)g * head_stride);
                    v[u] = p[c];
                    long slot = slot0 + miss_slot[g * res_stride + m];
                    to[u] = ((long)g * dst_head_rows + slot) * row_u4 + c;
                }
            }
        }
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++)
            if (to[u] >= 0) dst[to[u]] = v[u];
    }
}

// ---- prefill staging --------------------------------------------------------------------------
// Tokens [t0, t1) of a slab of [K | V] rows (16-bit elements; pinned host or device; token t of
// head g at (t * tok_u4 + g * head_u4) 16-byte units: [token][g] or, for page-granular
// selection, [g][token]) into dense K and V caches of n_kv*D columns (rows t). One thread per
// 16 bytes.
extern "C" __global__ void ds_unpack_rows(u64 src, int n_kv, int head_dim, long t0, long t1,
                                          long tok_u4, long head_u4, uint4* k, uint4* v) {
    int per_half = head_dim / 8;          // 16-byte units in one head's K (or V)
    long per_tok = (long)n_kv * 2 * per_half;
    long units = (t1 - t0) * per_tok;
    long stride = (long)gridDim.x * blockDim.x;
    const uint4* s = (const uint4*)src;
    for (long base = (long)blockIdx.x * blockDim.x + threadIdx.x; base < units;
         base += stride * DS_INFLIGHT) {
        uint4 x[DS_INFLIGHT];
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++) {
            long e = base + u * stride;
            if (e < units) {
                long t = t0 + e / per_tok;
                int w = (int)(e % per_tok);
                int g = w / (2 * per_half), c = w % (2 * per_half);
                x[u] = s[t * tok_u4 + (long)g * head_u4 + c];
            }
        }
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++) {
            long e = base + u * stride;
            if (e >= units) continue;
            long t = t0 + e / per_tok;
            int w = (int)(e % per_tok);
            int g = w / (2 * per_half), c = w % (2 * per_half);
            long at = t * n_kv * per_half + (long)g * per_half + (c % per_half);
            if (c < per_half) k[at] = x[u]; else v[at] = x[u];
        }
    }
}

// ---- page-granular selection ------------------------------------------------------------------
// A page's score is the best label score of its `page` tokens: out[i] = max of
// scores[i * page .. (i + 1) * page) for i < n (the scores of whole pages, [g][page][token]
// flattened, so the pages of every head in one pass). fmaxf: a NaN score loses to any number.
extern "C" __global__ void ds_page_max(const float* scores, long n, int page, float* out) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* s = scores + i * page;
    float m = s[0];
    for (int j = 1; j < page; j++) m = fmaxf(m, s[j]);
    out[i] = m;
}

// ---- layer-ahead query labels -----------------------------------------------------------------
// raw: one token's label-row matmul output, per query head h: r values then their r RoPE
// partners (engine/src/ahead.rs). Writes q_hat[h*D + chan[g][j]] = the rotated value (the other
// columns are never read by ds_label_scores). inv_freq: D/2 values. One thread per (h, j).
extern "C" __global__ void ds_ahead_labels(const float* raw, const int* chan, int n_heads,
                                           int group, int head_dim, int r,
                                           const float* inv_freq, float att_scale, long pos,
                                           float* q_hat) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n_heads * r) return;
    int h = x / r, j = x - h * r;
    int c = chan[(h / group) * r + j];
    float a = raw[h * 2 * r + j], p = raw[h * 2 * r + r + j];
    float angle = (float)pos * inv_freq[c % (head_dim / 2)];
    float sn, cs;
    sincosf(angle, &sn, &cs);
    sn *= att_scale;
    cs *= att_scale;
    q_hat[(long)h * head_dim + c] = c < head_dim / 2 ? a * cs - p * sn : a * cs + p * sn;
}

// ---- prediction recall ------------------------------------------------------------------------
// stats[0] += |a[g] & b[g]| over heads, stats[1] += k per head (a, b sorted, k each).
extern "C" __global__ void ds_overlap(const int* a, const int* b, long stride, int k,
                                      unsigned long long* stats) {
    int g = blockIdx.x;
    int hits = 0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        int at;
        hits += ds_find(b + g * stride, k, a[g * stride + i], &at);
    }
    if (hits) atomicAdd(stats, (unsigned long long)hits);
    if (threadIdx.x == 0) atomicAdd(stats + 1, (unsigned long long)k);
}
