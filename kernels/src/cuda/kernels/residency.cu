// Differential residency with a row cache larger than one selection (ALGORITHMS.md section 2;
// `--row-cache F`): per KV head the cache holds up to `cap` rows, the current top-k and, in the
// remaining slots, rows selected by earlier steps, evicted least recently selected first. A
// selected token already resident keeps its slot; the misses take the never-used slots, then
// the slots of the least recently selected residents that this step did not select. Compiled
// after offload.cu (ds_find, ds_block_scan, DS_RES_THREADS).
//
// Per head g (one block of DS_RES_THREADS threads), with lists of stride `stride` (= cap):
//   in:  sel[g][0..k_new) sorted ascending (ds_topk), k_new <= cap;
//        the residents res_tok/res_slot/res_age[g][0..n) (in no particular order; age: the
//        step each was last selected), n = res_n[g]; `now` > every age;
//   out: miss_tok/miss_slot[g][0..n_miss[g]) for ds_gather_misses (tokens ascending);
//        idx[g * idx_stride + idx0 + i * unit + j] = idx0 + slot of sel[i] * unit + j for
//        j < unit (attention's window rows: a slot holds `unit` rows, a page of them with
//        page-granular selection, else 1);
//        sel_out[g * sel_stride + i] = sel[i] (the selection kept past the caller's buffer);
//        the new residents (the kept ones in their order, then the misses), res_n[g];
//        stats[0] += misses, stats[1] += hits.
//   scratch (stride each): new_slot, kept_tok, kept_slot, kept_age.
// Eviction order: `now - age` descending, bucketed up to DS_LRU_AGES - 1 (older rows share the
// last bucket), ties in resident order. Only the selection is searched (binary search; in
// dynamic shared memory when use_smem: k_new ints).
#define DS_LRU_AGES 1024
extern "C" __global__ void __launch_bounds__(DS_RES_THREADS)
ds_residency_lru(const int* sel, long sel_stride, int k_new, int* res_tok, int* res_slot,
                 u32* res_age, int* res_n, long stride, int cap, u32 now, int* new_slot,
                 int* kept_tok, int* kept_slot, u32* kept_age, int* miss_tok, int* miss_slot,
                 int* n_miss, int* idx, long idx_stride, int idx0, int unit, int* sel_out,
                 unsigned long long* stats, int use_smem) {
    __shared__ int hist[DS_LRU_AGES];
    __shared__ int cut[2];  // the bucket where eviction stops, and how many it takes from it
    extern __shared__ int ds_lru_sel[];
    int g = blockIdx.x;
    const int* s = sel + g * sel_stride;
    int* rt = res_tok + g * stride;
    int* rs = res_slot + g * stride;
    u32* ra = res_age + g * stride;
    int* ns = new_slot + g * stride;
    int* kt = kept_tok + g * stride;
    int* ks = kept_slot + g * stride;
    u32* ka = kept_age + g * stride;
    int* mt = miss_tok + g * stride;
    int* ms = miss_slot + g * stride;
    int n = res_n[g];
    for (int i = threadIdx.x; i < DS_LRU_AGES; i += blockDim.x) hist[i] = 0;
    if (use_smem) {
        for (int i = threadIdx.x; i < k_new; i += blockDim.x) ds_lru_sel[i] = s[i];
        s = ds_lru_sel;
    }
    for (int i = threadIdx.x; i < k_new; i += blockDim.x) ns[i] = -1;
    __syncthreads();
    // Residents: selected ones give their slot to the selection's entry; the others' ages.
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        int at;
        if (ds_find(s, k_new, rt[j], &at)) {
            ns[at] = rs[j];
        } else {
            u32 d = now - ra[j];
            atomicAdd(&hist[d < DS_LRU_AGES ? d : DS_LRU_AGES - 1], 1);
        }
    }
    __syncthreads();
    // The selection's entries without a slot are the misses, listed in selection order.
    int n_m = 0;
    for (int i0 = 0; i0 < k_new; i0 += blockDim.x) {
        int i = i0 + threadIdx.x;
        int miss = i < k_new && ns[i] < 0;
        int total, pre = ds_block_scan(miss, &total);
        if (miss) mt[n_m + pre] = s[i];
        n_m += total;
    }
    // Slots n.. were never used; past the cap, `evict` residents make room, oldest first.
    int fresh = min(n_m, cap - n);
    int evict = n_m - fresh;
    if (threadIdx.x == 0) {
        int b = DS_LRU_AGES, take = 0, seen = 0;
        if (evict > 0) {
            for (b = DS_LRU_AGES - 1; b > 0; b--) {
                if (seen + hist[b] >= evict) break;
                seen += hist[b];
            }
            take = evict - seen;
        }
        cut[0] = b;
        cut[1] = take;
    }
    __syncthreads();
    int b_cut = cut[0], take = cut[1];
    // Residents in order: evicted ones give their slots (staged in miss_slot), the rest are
    // compacted into kept_*, selected ones aged `now`.
    int n_free = 0, n_kept = 0, at_cut = 0;
    for (int j0 = 0; j0 < n; j0 += blockDim.x) {
        int j = j0 + threadIdx.x, at;
        int selected = 0, bucket = -1;
        if (j < n) {
            selected = ds_find(s, k_new, rt[j], &at);
            if (!selected) {
                u32 d = now - ra[j];
                bucket = d < DS_LRU_AGES ? (int)d : DS_LRU_AGES - 1;
            }
        }
        int in_cut = bucket == b_cut;
        int cut_total, cut_pre = ds_block_scan(in_cut, &cut_total);
        int gone = bucket > b_cut || (in_cut && at_cut + cut_pre < take);
        at_cut += cut_total;
        int free_total, free_pre = ds_block_scan(gone, &free_total);
        // Every earlier thread of the chunk holds a resident: the kept ones before this one are
        // the others.
        int keep = j < n && !gone;
        int kept_pre = (int)threadIdx.x - free_pre;
        int kept_total = min((int)blockDim.x, n - j0) - free_total;
        if (gone) ms[n_free + free_pre] = rs[j];
        if (keep) {
            kt[n_kept + kept_pre] = rt[j];
            ks[n_kept + kept_pre] = rs[j];
            ka[n_kept + kept_pre] = selected ? now : ra[j];
        }
        n_free += free_total;
        n_kept += kept_total;
    }
    __syncthreads();
    // Misses take the freed slots, then the never-used ones; the selection's slots are complete.
    for (int m = threadIdx.x; m < n_m; m += blockDim.x) {
        int slot = m < n_free ? ms[m] : n + (m - n_free);
        ms[m] = slot;
        int at;
        ds_find(s, k_new, mt[m], &at);
        ns[at] = slot;
    }
    // The new residents: the kept ones, then the misses.
    for (int a = threadIdx.x; a < n_kept; a += blockDim.x) {
        rt[a] = kt[a];
        rs[a] = ks[a];
        ra[a] = ka[a];
    }
    for (int m = threadIdx.x; m < n_m; m += blockDim.x) {
        rt[n_kept + m] = mt[m];
        rs[n_kept + m] = ms[m];
        ra[n_kept + m] = now;
    }
    __syncthreads();
    int* ix = idx + g * idx_stride + idx0;
    int* so = sel_out + g * sel_stride;
    for (int i = threadIdx.x; i < k_new; i += blockDim.x) {
        for (int j = 0; j < unit; j++) ix[i * unit + j] = idx0 + ns[i] * unit + j;
        so[i] = s[i];
    }
    if (threadIdx.x == 0) {
        res_n[g] = n_kept + n_m;
        n_miss[g] = n_m;
        atomicAdd(stats, (unsigned long long)n_m);
        atomicAdd(stats + 1, (unsigned long long)(k_new - n_m));
    }
}
