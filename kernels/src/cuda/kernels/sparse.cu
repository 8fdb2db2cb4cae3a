// Double Sparsity decode kernels (ALGORITHMS.md section 1): label scoring, exact top-k, sparse
// attention over rows chosen by index, and a row gather that reads device or pinned host memory
// (UVA zero-copy). Compiled together with ops.cu and attention.cu (to_f32, warp_sum, warp_max,
// unpack_u4, gqa_block, NEG_INF, ATTN_WARPS, GQA_*).
//
// Pointers to KV rows are passed as raw 64-bit addresses, so one kernel reads a device cache or a
// pinned host buffer (cuMemHostAlloc PORTABLE|DEVICEMAP, where the host pointer is the device
// pointer under UVA).

typedef unsigned long long u64;

// ---- labels ---------------------------------------------------------------------------------
// labels[g][t][c] = f16(K[t][g*D + chan[g][c]]) for t in [t0, t1): grid (ceil(n/256), n_kv).
template <typename T>
__device__ void ds_labels_from_cache(const T* k, long tok_stride, int head_dim, const int* chan,
                                     int r, long t0, long t1, long cap, f16_t* labels) {
    long t = t0 + (long)blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y;
    if (t >= t1) return;
    const T* row = k + t * tok_stride + (long)g * head_dim;
    f16_t* out = labels + ((long)g * cap + t) * r;
    for (int c = 0; c < r; c++) out[c] = from_f32<f16_t>(to_f32(row[chan[g * r + c]]));
}
extern "C" __global__ void ds_labels_from_cache_bf16(u64 k, long tok_stride, int head_dim,
                                                     const int* chan, int r, long t0, long t1,
                                                     long cap, f16_t* labels) {
    ds_labels_from_cache((const bf16_t*)k, tok_stride, head_dim, chan, r, t0, t1, cap, labels);
}
extern "C" __global__ void ds_labels_from_cache_f16(u64 k, long tok_stride, int head_dim,
                                                    const int* chan, int r, long t0, long t1,
                                                    long cap, f16_t* labels) {
    ds_labels_from_cache((const f16_t*)k, tok_stride, head_dim, chan, r, t0, t1, cap, labels);
}

// ---- label scores ---------------------------------------------------------------------------
// scores[g][t - t0] = sum_c qsum[g][c] * labels[g][t][c] over t in [t0, t1), where
// qsum[g][c] = sum over the group's query heads h (in order) of q[h*D + chan[g][c]].
// Grid (ceil(n / 256), n_kv), 256 threads, one token per thread; r <= 64.
#define DS_MAX_R 64
extern "C" __global__ void ds_label_scores(const float* q, const int* chan, int group,
                                           int head_dim, int r, const f16_t* labels, long cap,
                                           long t0, long t1, float* scores) {
    __shared__ float qs[DS_MAX_R];
    int g = blockIdx.y;
    if (threadIdx.x < r) {
        int c = chan[g * r + threadIdx.x];
        float s = 0.0f;
        for (int j = 0; j < group; j++) s += q[(long)(g * group + j) * head_dim + c];
        qs[threadIdx.x] = s;
    }
    __syncthreads();
    long n = t1 - t0;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const f16_t* lab = labels + ((long)g * cap + t0 + i) * r;
    float s = 0.0f;
    if ((r & 7) == 0) {
        for (int c = 0; c < r; c += 8) {
            float lf[8];
            unpack_u4<f16_t>(*(const uint4*)(lab + c), lf);
            #pragma unroll
            for (int e = 0; e < 8; e++) s += qs[c + e] * lf[e];
        }
    } else {
        for (int c = 0; c < r; c++) s += qs[c] * to_f32(lab[c]);
    }
    scores[(long)g * n + i] = s;
}

// ---- exact top-k ----------------------------------------------------------------------------
// Per head (row of `scores`, n values), the k largest by (score descending, index ascending),
// written in increasing index order. Radix select on order-preserving 32-bit keys (the order of
// f32::total_cmp) in three digit passes of 11, 11 and 10 bits, then an ordered compaction: every
// key above the threshold key, and the first `need` keys equal to it. Five launches: init, three
// histogram passes (the last block of each head to finish picks the digit), one compaction pass
// (blocks in ticket order, each finding its output offset by a decoupled look-back).
// State per head (TK_STATE words): [0] prefix, [1] need (how many still to take at or below the
// prefix), [2] compaction ticket, [3] histogram blocks done.
#define TK_BINS 2048
#define TK_THREADS 512
#define TK_STATE 4

// Initialises the state for k per head (prefix 0, need k, counters 0) and clears the look-back
// status words of the compaction.
extern "C" __global__ void ds_topk_init(unsigned* state, unsigned k, int heads,
                                       unsigned long long* status, long n_status) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < heads) {
        state[i * TK_STATE] = 0;
        state[i * TK_STATE + 1] = k;
        state[i * TK_STATE + 2] = 0;
        state[i * TK_STATE + 3] = 0;
    }
    if (i < n_status) status[i] = 0;
}

// One warp: picks the digit of the threshold from the head's histogram h (in shared memory),
// updates (prefix, need) in st and resets the done counter.
__device__ void tk_pick(unsigned* st, const unsigned* h, int pass, int lane) {
    int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    int bins = pass == 2 ? 1024 : 2048;
    int per = bins / 32;
    // Lane l owns bins [bins - (l+1)*per, bins - l*per): lane 0 the highest.
    int lo = bins - (lane + 1) * per;
    unsigned cnt = 0;
    for (int b = lo; b < lo + per; b++) cnt += h[b];
    // Inclusive scan from lane 0 (highest bins) upward.
    unsigned incl = cnt;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    unsigned need = st[1];
    unsigned excl = incl - cnt;
    bool mine = excl < need && incl >= need;
    unsigned ballot = __ballot_sync(0xffffffffu, mine);
    int owner = __ffs(ballot) - 1;
    if (lane == owner) {
        unsigned above = excl;
        for (int b = lo + per - 1; b >= lo; b--) {
            unsigned c = h[b];
            if (above + c >= need) {
                st[0] |= ((unsigned)b) << shift;
                st[1] = need - above;
                break;
            }
            above += c;
        }
    }
    if (lane == 0) st[3] = 0;
}

// Grid (blocks, heads): histogram of digit `pass` of the keys matching the prefix; the last
// block of a head to finish picks the digit (tk_pick).
extern "C" __global__ void ds_topk_hist(const float* scores, long n, unsigned* state,
                                        unsigned* hist, int pass) {
    __shared__ unsigned h[TK_BINS];
    __shared__ bool last;
    for (int b = threadIdx.x; b < TK_BINS; b += blockDim.x) h[b] = 0;
    __syncthreads();
    int head = blockIdx.y;
    unsigned* st = state + head * TK_STATE;
    int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    unsigned hi_mask = pass == 0 ? 0u : (pass == 1 ? 0xffe00000u : 0xfffffc00u);
    unsigned digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
    unsigned prefix = st[0];
    const float* s = scores + (long)head * n;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        unsigned key = f32_ord(s[i]);
        if ((key & hi_mask) == prefix) atomicAdd(&h[(key >> shift) & digit_mask], 1u);
    }
    __syncthreads();
    unsigned* gh = hist + (long)head * TK_BINS;
    for (int b = threadIdx.x; b < TK_BINS; b += blockDim.x)
        if (h[b]) atomicAdd(&gh[b], h[b]);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(st + 3, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    // The last block: the head's histogram into shared memory (read from L2, where the other
    // blocks' atomics went), cleared for the next pass; then one warp picks the digit.
    __threadfence();
    for (int b = threadIdx.x; b < TK_BINS; b += blockDim.x) {
        h[b] = __ldcg(gh + b);
        gh[b] = 0;
    }
    __syncthreads();
    if (threadIdx.x < 32) tk_pick(st, h, pass, threadIdx.x);
}

// Look-back status word: flag (2 bits: 0 none, 1 block aggregate, 2 inclusive prefix), then the
// counts of keys above (31 bits) and equal to (31 bits) the threshold.
__device__ __forceinline__ unsigned long long tk_pack(unsigned long long f, unsigned long long gt,
                                                      unsigned long long eq) {
    return (f << 62) | (gt << 31) | eq;
}

// Grid (blocks, heads), TK_THREADS threads: writes the selected indices (+ base) in increasing
// order to out[head*out_stride + out_off + j]. Blocks take chunks of `chunk` scores in ticket
// order; each counts its keys above / equal to the threshold, publishes them, and adds up its
// predecessors' (decoupled look-back: it only waits on blocks with earlier tickets, which are
// running). A thread takes `per` consecutive scores of its block's chunk.
extern "C" __global__ void ds_topk_write(const float* scores, long n, long chunk, int nblocks,
                                         unsigned* state, unsigned long long* status, int* out,
                                         long out_stride, long out_off, int base) {
    int head = blockIdx.y;
    unsigned* st = state + head * TK_STATE;
    __shared__ int sh_vid;
    __shared__ unsigned sh_gt, sh_eq;
    if (threadIdx.x == 0) sh_vid = (int)atomicAdd(st + 2, 1u);
    __syncthreads();
    int vid = sh_vid;
    unsigned thr = st[0];
    unsigned need_eq = st[1];
    const float* s = scores + (long)head * n;
    long b0 = (long)vid * chunk, b1 = min(n, b0 + chunk);
    long per = (chunk + blockDim.x - 1) / blockDim.x;
    long i0 = b0 + threadIdx.x * per, i1 = min(b1, i0 + per);
    // Thread-local counts of gt and eq, then block exclusive scans of both.
    unsigned tg = 0, te = 0;
    for (long i = i0; i < i1; i++) {
        unsigned key = f32_ord(s[i]);
        tg += key > thr;
        te += key == thr;
    }
    __shared__ unsigned wg[TK_THREADS / 32], we[TK_THREADS / 32];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned ig = tg, ie = te;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned a = __shfl_up_sync(0xffffffffu, ig, o), e = __shfl_up_sync(0xffffffffu, ie, o);
        if (lane >= o) { ig += a; ie += e; }
    }
    if (lane == 31) { wg[w] = ig; we[w] = ie; }
    __syncthreads();
    if (w == 0) {
        // Warp 0: the block's totals, then a look-back over up to 32 predecessors at a time
        // (lane l reads block vid-1-l), stopping at the nearest one with an inclusive prefix.
        unsigned long long tot_g = 0, tot_e = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) { tot_g += wg[i]; tot_e += we[i]; }
        unsigned long long* my = status + (long)head * nblocks;
        if (lane == 0 && vid > 0) atomicExch(my + vid, tk_pack(1, tot_g, tot_e));
        unsigned long long pg = 0, pe = 0;
        for (int top = vid - 1; top >= 0; top -= 32) {
            int p = top - lane;
            unsigned long long v = tk_pack(2, 0, 0);  // before block 0: an empty prefix
            if (p >= 0) {
                do {
                    v = *(volatile unsigned long long*)(my + p);
                } while ((v >> 62) == 0);
            }
            unsigned incl = __ballot_sync(0xffffffffu, (v >> 62) == 2);
            int stop = incl ? __ffs(incl) - 1 : 31;
            unsigned long long g = lane <= stop ? (v >> 31) & 0x7fffffffull : 0;
            unsigned long long e = lane <= stop ? v & 0x7fffffffull : 0;
            for (int o = 16; o > 0; o >>= 1) {
                g += __shfl_xor_sync(0xffffffffu, g, o);
                e += __shfl_xor_sync(0xffffffffu, e, o);
            }
            pg += g;
            pe += e;
            if (incl) break;
        }
        if (lane == 0) {
            atomicExch(my + vid, tk_pack(2, pg + tot_g, pe + tot_e));
            sh_gt = (unsigned)pg;
            sh_eq = (unsigned)pe;
        }
    }
    __syncthreads();
    unsigned pg = sh_gt, pe = sh_eq;
    for (int i = 0; i < w; i++) { pg += wg[i]; pe += we[i]; }
    pg += ig - tg;
    pe += ie - te;
    // pe = eq keys before this thread's first; position = gt before + min(eq before, need_eq).
    int* o = out + (long)head * out_stride + out_off;
    for (long i = i0; i < i1; i++) {
        unsigned key = f32_ord(s[i]);
        if (key > thr) {
            o[pg + min(pe, need_eq)] = base + (int)i;
            pg++;
        } else if (key == thr) {
            if (pe < need_eq) o[pg + pe] = base + (int)i;
            pe++;
        }
    }
}

// ---- top-k in one launch: one thread-block cluster per head (sm_90) --------------------------
// The same selection as ds_topk_init/hist/write (3 radix passes of 11, 11, 10 bits over the
// order-preserving keys, then an ordered compaction), but the TKC (8) blocks of a cluster share their
// histograms and counts through distributed shared memory and meet at cluster barriers instead
// of kernel boundaries and global atomics. Grid (TKC, heads), TKC_THREADS threads; block r of a
// cluster takes scores [r * per, (r + 1) * per) of its head.
#define TKC 8
#define TKC_THREADS 1024

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cl_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cl_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The u32 at `p` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ unsigned cl_load(const unsigned* p, unsigned rank) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p), d, v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(d) : "memory");
    return v;
}
#endif

__device__ __forceinline__ unsigned warp_sum_u(unsigned v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive and inclusive scan over the block (TKC_THREADS threads) of one value per thread.
__device__ __forceinline__ void tkc_scan(unsigned v, unsigned* warp_tot, unsigned& excl,
                                         unsigned& incl, unsigned& total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    unsigned x = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();  // warp_tot free
    if (lane == 31) warp_tot[w] = x;
    __syncthreads();
    unsigned before = 0, all = 0;
    for (int i = 0; i < TKC_THREADS / 32; i++) {
        unsigned t = warp_tot[i];
        before += i < w ? t : 0;
        all += t;
    }
    incl = before + x;
    excl = incl - v;
    total = all;
}

extern "C" __global__ void
#if __CUDA_ARCH__ >= 900
__cluster_dims__(TKC, 1, 1)
#endif
__launch_bounds__(TKC_THREADS) ds_topk_cluster(const float* scores, long n, unsigned k, int* out,
                                               long out_stride, long out_off, int base) {
#if __CUDA_ARCH__ >= 900
    __shared__ unsigned hist[2][TK_BINS];
    __shared__ unsigned tot[TK_BINS];
    __shared__ unsigned warp_tot[TKC_THREADS / 32];
    __shared__ unsigned sh_prefix, sh_need, sh_gt, sh_eq;
    int head = blockIdx.y, t = threadIdx.x;
    unsigned rank = cl_rank();
    const float* s = scores + (long)head * n;
    long per = (n + TKC - 1) / TKC;
    long b0 = min(n, (long)rank * per), b1 = min(n, b0 + per);
    unsigned prefix = 0, need = k;
    for (int pass = 0; pass < 3; pass++) {
        int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        unsigned hi_mask = pass == 0 ? 0u : (pass == 1 ? 0xffe00000u : 0xfffffc00u);
        unsigned digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
        int bins = pass == 2 ? 1024 : 2048;
        unsigned* h = hist[pass & 1];
        for (int b = t; b < TK_BINS; b += TKC_THREADS) h[b] = 0;
        __syncthreads();
        for (long i = b0 + t; i < b1; i += TKC_THREADS) {
            unsigned key = f32_ord(s[i]);
            if ((key & hi_mask) == prefix) atomicAdd(&h[(key >> shift) & digit_mask], 1u);
        }
        cl_sync();  // every block's histogram of this pass is complete
        for (int b = t; b < bins; b += TKC_THREADS) {
            unsigned c = 0;
            #pragma unroll
            for (int r = 0; r < TKC; r++) c += cl_load(&h[b], r);
            tot[b] = c;
        }
        __syncthreads();
        // Thread t owns bins [bins - (t+1)*pb, bins - t*pb), thread 0 the highest; the thread
        // whose range holds the need-th largest key picks the digit (every block does the same).
        int pb = bins / TKC_THREADS;
        int lo = bins - (t + 1) * pb;
        unsigned cnt = 0;
        for (int b = lo; b < lo + pb; b++) cnt += tot[b];
        unsigned excl, incl, all;
        tkc_scan(cnt, warp_tot, excl, incl, all);
        if (excl < need && incl >= need) {
            unsigned above = excl;
            for (int b = lo + pb - 1; b >= lo; b--) {
                unsigned c = tot[b];
                if (above + c >= need) {
                    sh_prefix = prefix | ((unsigned)b << shift);
                    sh_need = need - above;
                    break;
                }
                above += c;
            }
        }
        __syncthreads();
        prefix = sh_prefix;
        need = sh_need;
    }
    // Compaction: warp w takes `pw` consecutive scores of the block's range, 32 at a time
    // (coalesced; ballots give each lane its rank); positions from the counts of keys above /
    // equal to the threshold before it (earlier warps, then the blocks of lower rank, read from
    // their shared memory).
    unsigned thr = prefix;
    int lane = t & 31, w = t >> 5;
    unsigned lt_mask = (1u << lane) - 1;
    long pw = ((b1 - b0 + TKC_THREADS / 32 - 1) / (TKC_THREADS / 32) + 31) & ~31L;
    long i0 = min(b1, b0 + w * pw), i1 = min(b1, i0 + pw);
    unsigned tg = 0, te = 0;
    for (long i = i0 + lane; i < i1; i += 32) {
        unsigned key = f32_ord(s[i]);
        tg += key > thr;
        te += key == thr;
    }
    tg = warp_sum_u(tg);
    te = warp_sum_u(te);
    unsigned eg, ig, ag, ee, ie, ae;
    tkc_scan(lane == 0 ? tg : 0, warp_tot, eg, ig, ag);
    tkc_scan(lane == 0 ? te : 0, warp_tot, ee, ie, ae);
    eg = __shfl_sync(0xffffffffu, eg, 0);
    ee = __shfl_sync(0xffffffffu, ee, 0);
    if (t == 0) { sh_gt = ag; sh_eq = ae; }
    cl_sync();  // every block's totals are published
    unsigned pg = eg, pe = ee;
    for (unsigned r = 0; r < rank; r++) {
        pg += cl_load(&sh_gt, r);
        pe += cl_load(&sh_eq, r);
    }
    int* o = out + (long)head * out_stride + out_off;
    for (long c = i0; c < i1; c += 32) {
        long i = c + lane;
        unsigned key = i < i1 ? f32_ord(s[i]) : 0u;
        bool gt = i < i1 && key > thr, eq = i < i1 && key == thr;
        unsigned bg = __ballot_sync(0xffffffffu, gt), be = __ballot_sync(0xffffffffu, eq);
        unsigned g = pg + __popc(bg & lt_mask), e = pe + __popc(be & lt_mask);
        if (gt) o[g + min(e, need)] = base + (int)i;
        else if (eq && e < need) o[g + e] = base + (int)i;
        pg += __popc(bg);
        pe += __popc(be);
    }
    cl_sync();  // no block leaves while another may still read its shared memory
#endif
}

// Fixed rows of a selection: out[h*stride + j] = j for j < n_sink, and
// out[h*stride + n_sink + k + j] = recent0 + j for j < n_recent. Grid (.., heads).
extern "C" __global__ void ds_fixed_rows(int* out, long stride, int n_sink, int k,
                                         int recent0, int n_recent) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int* o = out + (long)blockIdx.y * stride;
    if (j < n_sink) o[j] = j;
    if (j < n_recent) o[n_sink + k + j] = recent0 + j;
}

// ---- sparse attention -----------------------------------------------------------------------
// One decode query, GQA: one block (ATTN_WARPS warps) per (KV head g, split) serving the group's
// query heads over rows idx[g*idx_stride + j], j in the split's range of [0, n_sel) (idx null:
// row j). Row t of head g: K at k + t*tok_stride + g*head_stride, V likewise from v (elements).
// The GQA key-per-lane block of attention.cu (gqa_block) over the selected rows of KV head
// blockIdx.x, split blockIdx.y; partials for attention_combine when n_split > 1.
template <typename T, int D, int G>
__device__ void sparse_attn(const float* q, const T* k, const T* v, long tok_stride,
                            long head_stride, const int* idx, long idx_stride, int n_sel,
                            float* out, int group, float scale, int n_split, int chunk,
                            float* part) {
    int g = blockIdx.x, split = blockIdx.y;
    int kb = split * chunk;
    int ke = min(n_sel, kb + chunk);
    gqa_block<T, D, G>(q + (long)g * group * D, k + (long)g * head_stride,
                       v + (long)g * head_stride, idx ? idx + (long)g * idx_stride : nullptr,
                       tok_stride, kb, ke, group, scale, n_split, split,
                       out + (long)g * group * D, part + (long)g * group * n_split * (D + 2));
}
#define SPARSE_ARGS                                                                            \
    const float *q, u64 k, u64 v, long tok_stride, long head_stride, const int *idx,          \
        long idx_stride, int n_sel, float *out, int n_heads, int group, int head_dim,          \
        float scale, int n_split, int chunk, float *part
#define SPARSE_KERNEL(NAME, T, D, G)                                                           \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) NAME(SPARSE_ARGS) {         \
        sparse_attn<T, D, G>(q, (const T*)k, (const T*)v, tok_stride, head_stride, idx,       \
                             idx_stride, n_sel, out, group, scale, n_split, chunk, part);     \
    }
SPARSE_KERNEL(sparse_attn_f16_d64_g4, f16_t, 64, 4)
SPARSE_KERNEL(sparse_attn_f16_d64_g8, f16_t, 64, 8)
SPARSE_KERNEL(sparse_attn_f16_d128_g4, f16_t, 128, 4)
SPARSE_KERNEL(sparse_attn_f16_d128_g8, f16_t, 128, 8)
SPARSE_KERNEL(sparse_attn_bf16_d64_g4, bf16_t, 64, 4)
SPARSE_KERNEL(sparse_attn_bf16_d64_g8, bf16_t, 64, 8)
SPARSE_KERNEL(sparse_attn_bf16_d128_g4, bf16_t, 128, 4)
SPARSE_KERNEL(sparse_attn_bf16_d128_g8, bf16_t, 128, 8)

// ---- row gather -----------------------------------------------------------------------------
// dst row (g, j) (row_bytes, contiguous, g-major) = src + idx[g*idx_stride + j]*tok_stride +
// g*head_stride (bytes; src may be pinned host memory). 16-byte units; each thread issues
// DS_INFLIGHT independent loads before its stores so that many requests are in flight.
#define DS_INFLIGHT 8
extern "C" __global__ void ds_gather_rows(u64 src, long tok_stride, long head_stride,
                                          const int* idx, long idx_stride, int n_sel, int heads,
                                          int row_u4, uint4* dst) {
    long units = (long)heads * n_sel * row_u4;
    long stride = (long)gridDim.x * blockDim.x;
    for (long base = (long)blockIdx.x * blockDim.x + threadIdx.x; base < units;
         base += stride * DS_INFLIGHT) {
        uint4 v[DS_INFLIGHT];
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++) {
            long e = base + u * stride;
            if (e < units) {
                long rr = e / row_u4;
                int c = (int)(e - rr * row_u4);
                int g = (int)(rr / n_sel), j = (int)(rr - (long)g * n_sel);
                long t = idx[(long)g * idx_stride + j];
                const uint4* p = (const uint4*)(src + t * tok_stride + (long)g * head_stride);
                v[u] = p[c];
            }
        }
        #pragma unroll
        for (int u = 0; u < DS_INFLIGHT; u++) {
            long e = base + u * stride;
            if (e < units) dst[e] = v[u];
        }
    }
}
