// Harness: ds_residency_lru (kernels/residency.cu) emulated on the CPU over random selections
// that drift and alternate, checked against the invariants the offloaded store relies on.
// Appended after emulate.h, host_check.h and the kernel source; exits 1 on the first failure.
unsigned char fa_smem[16];
int ds_res_smem[1 << 16];
int ds_lru_sel[1 << 16];

static unsigned long long rng_state = 0x9e3779b97f4a7c15ull;
static unsigned long long rnd() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

#define CHECK(c, ...)                                                                     \
    do {                                                                                  \
        if (!(c)) {                                                                       \
            std::printf("round %d head %d: ", round, g);                                  \
            std::printf(__VA_ARGS__);                                                     \
            std::printf("\n");                                                            \
            return 1;                                                                     \
        }                                                                                 \
    } while (0)

// One run of 160 rounds; a cache entry (a row, or a page of `unit` rows) fills `unit` window rows.
static int run(int unit) {
    const int heads = 3, k_max = 40, cap = 100, idx0 = 5, stride = idx0 + k_max * unit;
    const int tokens = 2000;
    std::vector<int> sel(heads * k_max), rt(heads * cap), rs(heads * cap), ns(heads * cap),
        kt(heads * cap), ks(heads * cap), mt(heads * cap), ms(heads * cap), nmiss(heads),
        rn(heads, 0), idx(heads * stride);
    std::vector<u32> ra(heads * cap), ka(heads * cap);
    std::vector<int> sel_out(heads * k_max, -1);
    for (int g = 0; g < heads; g++)
        for (int j = 0; j < stride; j++) idx[g * stride + j] = j;
    unsigned long long stats[2] = {0, 0};
    // What the harness tracks: the window row each slot holds (filled as the gather would),
    // the resident set, and the round each token was last selected.
    std::vector<std::vector<int>> window(heads, std::vector<int>(cap, -1));
    std::vector<std::set<int>> prev(heads);
    std::vector<std::vector<int>> last(heads, std::vector<int>(tokens, 0));
    unsigned long long want_miss = 0, want_hit = 0, evictions = 0;
    const int rounds = 160;
    for (int round = 1; round <= rounds; round++) {
        int g = -1;
        int k = 20 + (int)(rnd() % (k_max - 19));
        int lo = (round / 3) * 11 + (round % 2 ? 500 : 0);
        std::vector<std::vector<int>> sels(heads);
        for (g = 0; g < heads; g++) {
            std::set<int> s;
            while ((int)s.size() < k) s.insert(lo + (int)(rnd() % 90));
            sels[g].assign(s.begin(), s.end());
            std::copy(sels[g].begin(), sels[g].end(), sel.begin() + g * k_max);
        }
        g = -1;
        unsigned threads = round > rounds - 4 ? 1024u : 32u * (1 + round % 3);
        int use_smem = round % 2;
        emu_launch(heads, threads, [&] {
            ds_residency_lru(sel.data(), k_max, k, rt.data(), rs.data(), ra.data(), rn.data(), cap,
                             cap, (u32)round, ns.data(), kt.data(), ks.data(), ka.data(),
                             mt.data(), ms.data(), nmiss.data(), idx.data(), stride, idx0, unit, sel_out.data(), stats,
                             use_smem);
        });
        for (g = 0; g < heads; g++) {
            const std::vector<int>& s = sels[g];
            int n = rn[g], nm = nmiss[g];
            CHECK(n <= cap, "%d residents in %d slots", n, cap);
            // The misses: exactly the selected tokens not resident before, in order.
            std::vector<int> want;
            for (int t : s)
                if (!prev[g].count(t)) want.push_back(t);
            CHECK(nm == (int)want.size(), "%d misses, want %zu", nm, want.size());
            for (int m = 0; m < nm; m++) {
                CHECK(mt[g * cap + m] == want[m], "miss %d is %d, want %d", m, mt[g * cap + m], want[m]);
                int slot = ms[g * cap + m];
                CHECK(slot >= 0 && slot < cap, "miss slot %d", slot);
                window[g][slot] = mt[g * cap + m];  // the gather
            }
            want_miss += nm;
            want_hit += k - nm;
            // Residents: distinct tokens and slots, each slot holding its token.
            std::set<int> toks, slots;
            for (int j = 0; j < n; j++) {
                int t = rt[g * cap + j], sl = rs[g * cap + j];
                CHECK(toks.insert(t).second, "token %d resident twice", t);
                CHECK(sl >= 0 && sl < cap && slots.insert(sl).second, "slot %d bad or reused", sl);
                CHECK(window[g][sl] == t, "slot %d holds %d, resident list says %d", sl, window[g][sl], t);
            }
            // Attention's rows: every selected token, through the index list.
            for (int i = 0; i < k; i++) {
                for (int j = 0; j < unit; j++) {
                    int row = idx[g * stride + idx0 + i * unit + j] - idx0;
                    int slot = row / unit;
                    CHECK(row >= 0 && row % unit == j && slot < cap && window[g][slot] == s[i],
                          "index %d.%d -> row %d holds %d, want %d", i, j, row,
                          row >= 0 && slot < cap ? window[g][slot] : -1, s[i]);
                }
                CHECK(toks.count(s[i]), "selected %d not resident", s[i]);
            }
            for (int j = 0; j < idx0; j++) CHECK(idx[g * stride + j] == j, "fixed row %d", j);
            for (int i = 0; i < k; i++)
                CHECK(sel_out[g * k_max + i] == s[i], "kept selection %d is %d, want %d", i,
                      sel_out[g * k_max + i], s[i]);
            // Evictions: only when full, only unselected rows, the least recently selected.
            std::vector<int> gone;
            for (int t : prev[g])
                if (!toks.count(t)) gone.push_back(t);
            if (!gone.empty()) {
                evictions += gone.size();
                CHECK(n == cap, "evicted %zu with %d of %d slots used", gone.size(), n, cap);
                int newest_gone = 0;
                for (int t : gone) newest_gone = std::max(newest_gone, last[g][t]);
                for (int t : toks) {
                    bool selected = std::binary_search(s.begin(), s.end(), t);
                    if (prev[g].count(t) && !selected)
                        CHECK(last[g][t] >= newest_gone, "kept %d (round %d) over an evicted row of round %d",
                              t, last[g][t], newest_gone);
                }
            }
            prev[g] = toks;
            for (int t : s) last[g][t] = round;
        }
    }
    int g = -1, round = rounds;
    CHECK(stats[0] == want_miss && stats[1] == want_hit, "stats %llu/%llu, want %llu/%llu", stats[0],
          stats[1], want_miss, want_hit);
    CHECK(evictions > 0, "no eviction exercised");
    std::printf("emulated ds_residency_lru (%d rows a slot): %d rounds, %llu misses, %llu hits, %llu evictions\n",
                unit, rounds, want_miss, want_hit, evictions);
    return 0;
}

int main() { return run(1) || run(3); }
