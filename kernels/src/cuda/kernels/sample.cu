// farsight CUDA kernels: token sampling on the device, one block per row of logits.
//
// The reference is the CPU's farsight_kernels::sample::sample_row; this computes the same pick
// without sorting. Every element has a distinct 64-bit key, (order-preserving bits of its value)
// << 32 | ~id, so descending key order is the CPU's candidate order (value descending in IEEE
// total order, then id ascending).
// - greedy: the largest key over the raw logits (NaN lowest, -0 as +0: the CPU's argmax).
// - otherwise keys over y = x / T. Top-k: a radix select (8-bit digits from the top) of the k-th
//   largest key by counts. Masses m = expf(y - ymax) in fixed point (2^40 = 1) as integers, so
//   sums do not depend on the order of the atomics. Top-p: the element at which the descending
//   cumulative mass of the kept set first reaches ceil(top_p * total); the draw: the same select
//   with ceil(u * total of the kept set), or the last kept element if rounding leaves none.
// A select stops once its chosen bucket holds one element: that key prefix is unique in the set,
// so a bound compares prefixes only, and a drawn element's id is found by one more pass.
// Histograms live in shared memory; the adds are aggregated per warp (lanes with equal digits).

typedef unsigned long long u64;

// Matches `DevSpec` in kernels/src/cuda/sample.rs.
struct SampleSpecDev {
    float temperature;
    u32 top_k;
    float top_p;
    u32 pad;
    double u;
};

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_ONE_F 1099511627776.0f  // 2^40: the fixed-point mass of exp(0)
#define SAMPLE_ONE (1ull << 40)
#define SAMPLE_FULL 0xffffffffu

__device__ __forceinline__ u64 sample_key(u32 ord, int i) { return ((u64)ord << 32) | (u64)(~(u32)i); }

__device__ __forceinline__ u64 sample_mass(float y, float ymax) {
    float e = expf(y - ymax);
    if (!(e > 0.0f)) return 0;  // underflow, NaN
    if (!(e < 1.0f)) return SAMPLE_ONE;
    return __float2ull_rn(e * SAMPLE_ONE_F);
}

// The kept set: keys whose top len[j] bits are >= pre[j] for each of the n bounds (top-k, top-p).
struct SampleBounds {
    int n;
    int len[2];
    u64 pre[2];
};
__device__ __forceinline__ bool sample_kept(u64 key, const SampleBounds& b) {
    #pragma unroll
    for (int j = 0; j < 2; j++)
        if (j < b.n && (key >> (64 - b.len[j])) < b.pre[j]) return false;
    return true;
}

struct SampleRow {
    const float* x;
    int n;
    float t;
    float ymax;
    SampleBounds b;
};

struct SampleShared {
    u32 cnt[256];
    u64 mass[256];
    u64 red[SAMPLE_WARPS];
    u64 key;
    // The last sample_choose: found, the bucket, the count and mass before it, the target.
    int found;
    int bucket;
    u64 before_c;
    u64 before_m;
    u64 target;
};

// Calls f(i, x[i]) for every index of the row, warp-uniformly (lanes past the end get i >= n):
// each warp takes 128 contiguous elements per step and issues its 4 loads before using them.
template <typename F>
__device__ __forceinline__ void sample_for_each(const float* x, int n, F f) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c0 = warp * 128; c0 < n; c0 += SAMPLE_WARPS * 128) {
        float v[4];
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            int i = c0 + 32 * j + lane;
            v[j] = i < n ? x[i] : 0.0f;
        }
        #pragma unroll
        for (int j = 0; j < 4; j++) f(c0 + 32 * j + lane, v[j]);
    }
}

// Block-wide max (or min) of a u64; every thread gets it.
__device__ u64 sample_block_ext(SampleShared& s, u64 v, bool is_max) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(SAMPLE_FULL, v, o);
        v = (is_max ? w > v : w < v) ? w : v;
    }
    if (lane == 0) s.red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = s.red[lane];
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            u64 w = __shfl_xor_sync(SAMPLE_FULL, v, o);
            v = (is_max ? w > v : w < v) ? w : v;
        }
        if (lane == 0) s.key = v;
    }
    __syncthreads();
    u64 r = s.key;
    __syncthreads();
    return r;
}

// The largest key of the row: over x (greedy: NaN lowest, -0 as +0) or over y = x / t.
__device__ u64 sample_max_key(SampleShared& s, const float* x, int n, float t, bool greedy) {
    u64 best = 0;
    sample_for_each(x, n, [&](int i, float v) {
        if (i >= n) return;
        u32 o;
        if (greedy) o = (v != v) ? 0u : f32_ord(v == 0.0f ? 0.0f : v);
        else o = f32_ord(__fdiv_rn(v, t));
        u64 k = sample_key(o, i);
        best = k > best ? k : best;
    });
    return sample_block_ext(s, best, true);
}

// The smallest key of the kept set.
__device__ u64 sample_min_kept(SampleShared& s, const SampleRow& r) {
    u64 low = ~0ull;
    sample_for_each(r.x, r.n, [&](int i, float v) {
        if (i >= r.n) return;
        u64 k = sample_key(f32_ord(__fdiv_rn(v, r.t)), i);
        if (sample_kept(k, r.b) && k < low) low = k;
    });
    return sample_block_ext(s, low, false);
}

// Histogram of the next digit (bits 56 - len .. 63 - len) of the kept keys whose top `len` bits
// are `prefix`: counts, and masses when `with_mass`.
__device__ void sample_hist(SampleShared& s, const SampleRow& r, int len, u64 prefix, bool with_mass) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        s.cnt[b] = 0;
        s.mass[b] = 0;
    }
    __syncthreads();
    int lane = threadIdx.x & 31, shift = 56 - len;
    sample_for_each(r.x, r.n, [&](int i, float v) {
        bool hit = false;
        u32 d = 0;
        u64 m = 0;
        if (i < r.n) {
            float y = __fdiv_rn(v, r.t);
            u64 key = sample_key(f32_ord(y), i);
            if (sample_kept(key, r.b) && (len == 0 || (key >> (64 - len)) == prefix)) {
                hit = true;
                d = (u32)(key >> shift) & 0xffu;
                if (with_mass) m = sample_mass(y, r.ymax);
            }
        }
        u32 act = __ballot_sync(SAMPLE_FULL, hit);
        if (hit) {
            // One add per distinct digit in the warp; masses (<= 2^40) summed as 20-bit halves.
            u32 peers = __match_any_sync(act, d);
            bool leader = lane == __ffs(peers) - 1;
            if (with_mass) {
                u32 lo = __reduce_add_sync(peers, (u32)(m & 0xfffffu));
                u32 hi = __reduce_add_sync(peers, (u32)(m >> 20));
                if (leader) atomicAdd(&s.mass[d], ((u64)hi << 20) + lo);
            }
            if (leader) atomicAdd(&s.cnt[d], (u32)__popc(peers));
        }
    });
    __syncthreads();
}

// One warp walks the 256 buckets in descending order and picks the first at which the running
// count reaches `target` (by_mass false), or the running mass reaches `target` with at least one
// element (by_mass true; with frac >= 0 the target is first set to ceil(frac * total mass)).
// Results in s.found / bucket / before_c / before_m / target.
__device__ void sample_choose(SampleShared& s, bool by_mass, u64 target, double frac) {
    if (threadIdx.x < 32) {
        int lane = threadIdx.x;
        u64 c = 0, m = 0;
        #pragma unroll
        for (int t = 0; t < 8; t++) {
            int b = 255 - 8 * lane - t;
            c += s.cnt[b];
            m += s.mass[b];
        }
        u64 ic = c, im = m;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u64 pc = __shfl_up_sync(SAMPLE_FULL, ic, o), pm = __shfl_up_sync(SAMPLE_FULL, im, o);
            if (lane >= o) {
                ic += pc;
                im += pm;
            }
        }
        if (frac >= 0.0) {
            double total = (double)__shfl_sync(SAMPLE_FULL, im, 31);
            target = (u64)ceil(frac * total);
        }
        bool ok = by_mass ? (im >= target && ic >= 1) : (ic >= target);
        u32 ball = __ballot_sync(SAMPLE_FULL, ok);
        if (lane == 0) {
            s.found = ball != 0;
            s.bucket = 0;
            s.target = target;
        }
        __syncwarp();
        if (ball != 0 && lane == __ffs(ball) - 1) {
            u64 cc = ic - c, mm = im - m;
            for (int t = 0; t < 8; t++) {
                int b = 255 - 8 * lane - t;
                u64 nc = cc + s.cnt[b], nm = mm + s.mass[b];
                if (by_mass ? (nm >= target && nc >= 1) : (nc >= target)) {
                    s.bucket = b;
                    s.before_c = cc;
                    s.before_m = mm;
                    break;
                }
                cc = nc;
                mm = nm;
            }
        }
    }
    __syncthreads();
}

// Top-k: adds the bound that keeps the k largest keys (0 < k < n; no bound yet).
__device__ void sample_topk(SampleShared& s, SampleRow& r, u32 k) {
    int len = 0;
    u64 prefix = 0, need = k;
    for (;;) {
        sample_hist(s, r, len, prefix, false);
        sample_choose(s, false, need, -1.0);
        bool found = s.found;
        int b = s.bucket;
        u64 before = s.before_c, cb = found ? s.cnt[b] : 0;
        __syncthreads();
        if (!found) return;  // cannot happen for k < n; keeps everything
        need -= before;
        prefix = (prefix << 8) | (u64)b;
        len += 8;
        // The whole bucket is kept: the bound is its prefix (also the case at 64 bits).
        if (cb == need || len == 64) break;
    }
    r.b.len[0] = len;
    r.b.pre[0] = prefix;
    r.b.n = 1;
}

// The kept element at which the descending cumulative mass first reaches ceil(frac * total):
// false when rounding leaves none; else its key prefix (len, prefix), unique in the kept set.
__device__ bool sample_mass_select(SampleShared& s, const SampleRow& r, double frac, int& len_out,
                                   u64& prefix_out) {
    int len = 0;
    u64 prefix = 0, target = 0;
    for (;;) {
        sample_hist(s, r, len, prefix, true);
        sample_choose(s, true, target, len == 0 ? frac : -1.0);
        bool found = s.found;
        int b = s.bucket;
        u64 before = s.before_m, t = s.target, cb = found ? s.cnt[b] : 0;
        __syncthreads();
        if (!found) return false;
        target = t - before;
        prefix = (prefix << 8) | (u64)b;
        len += 8;
        if (cb == 1 || len == 64) break;
    }
    len_out = len;
    prefix_out = prefix;
    return true;
}

// The key of the kept element whose top `len` bits are `prefix` (unique in the kept set).
__device__ u64 sample_find(SampleShared& s, const SampleRow& r, int len, u64 prefix) {
    if (len == 64) return prefix;
    if (threadIdx.x == 0) s.key = 0;
    __syncthreads();
    sample_for_each(r.x, r.n, [&](int i, float v) {
        if (i >= r.n) return;
        u64 k = sample_key(f32_ord(__fdiv_rn(v, r.t)), i);
        if ((k >> (64 - len)) == prefix && sample_kept(k, r.b)) s.key = k;
    });
    __syncthreads();
    u64 k = s.key;
    __syncthreads();
    return k;
}

// out[r] = the token picked from row r of `logits` (rows of n) with specs[r]; one block per row.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* logits, int n, const SampleSpecDev* specs, u32* out) {
    __shared__ SampleShared s;
    int row = blockIdx.x;
    SampleSpecDev sp = specs[row];
    const float* x = logits + (size_t)row * n;
    bool greedy = !(sp.temperature > 0.0f);
    u64 kmax = sample_max_key(s, x, n, sp.temperature, greedy);
    u32 id = ~(u32)kmax;
    if (greedy) {
        if (x[0] != x[0]) id = 0;  // the CPU's argmax keeps a NaN at index 0
    } else if (sp.top_k != 1 && n > 1) {
        SampleRow r;
        r.x = x;
        r.n = n;
        r.t = sp.temperature;
        r.ymax = f32_unord((u32)(kmax >> 32));
        r.b.n = 0;
        if (sp.top_k > 0 && sp.top_k < (u32)n) sample_topk(s, r, sp.top_k);
        int len;
        u64 prefix;
        if (sp.top_p < 1.0f && sample_mass_select(s, r, (double)sp.top_p, len, prefix)) {
            // Constant indices keep the bounds in registers.
            if (r.b.n == 0) {
                r.b.len[0] = len;
                r.b.pre[0] = prefix;
            } else {
                r.b.len[1] = len;
                r.b.pre[1] = prefix;
            }
            r.b.n++;
        }
        if (sample_mass_select(s, r, sp.u, len, prefix)) id = ~(u32)sample_find(s, r, len, prefix);
        else id = ~(u32)sample_min_kept(s, r);
    }
    if (threadIdx.x == 0) out[row] = id;
}
