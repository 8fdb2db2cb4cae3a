// Harness: the page-granular selection's plain kernels (kernels/offload.cu) emulated on the CPU:
// ds_page_max (page scores), ds_gather_misses moving pages of P rows out of a `[g][token]` slab
// into page-sized cache slots, and ds_unpack_rows reading that slab back into dense K and V.
// Appended after emulate.h, host_check.h and the kernel source; exits 1 on the first failure.
unsigned char fa_smem[16];
int ds_res_smem[1 << 16];
int ds_lru_sel[1 << 16];

#define FAIL(...)                                \
    do {                                         \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
        return 1;                                \
    } while (0)

int main() {
    // Page scores: 3 heads x 37 pages of 4, NaN-free random scores, one block of 64 threads
    // per 64 pages.
    {
        const int n = 3 * 37, page = 4;
        std::vector<float> sc(n * page), out(n, -1.0f);
        unsigned x = 12345;
        for (auto& v : sc) {
            x = x * 1664525u + 1013904223u;
            v = (float)(int)(x >> 8) / (float)(1 << 20) - 8.0f;
        }
        emu_launch((n + 63) / 64, 64, [&] { ds_page_max(sc.data(), n, page, out.data()); });
        for (int i = 0; i < n; i++) {
            float m = sc[i * page];
            for (int j = 1; j < page; j++) m = std::max(m, sc[i * page + j]);
            if (out[i] != m) FAIL("page %d: max %f, want %f", i, out[i], m);
        }
    }
    // A slab of 3 heads x 64 tokens of 16-bit rows [K | V] with D = 16 (64 bytes a row),
    // `[g][token]`; element (g, t, c) = g * 10000 + t * 40 + c.
    const int heads = 3, toks = 64, D = 16, row = 2 * D, P = 4;
    std::vector<unsigned short> slab(heads * toks * row);
    for (int g = 0; g < heads; g++)
        for (int t = 0; t < toks; t++)
            for (int c = 0; c < row; c++) slab[(g * toks + t) * row + c] = g * 10000 + t * 40 + c;
    u64 src = (u64)(uintptr_t)slab.data();
    // Gather: per head some page misses into slots of a window of 8 fixed rows + 6 page slots.
    {
        const int cap = 6, fixed = 8, wrows = fixed + cap * P, k = 5;
        std::vector<int> miss_tok = {3, 0, 15, 7, -1, -1, /* g1 */ 1, 2, -1, -1, -1, -1,
                                     /* g2 */ 9, 10, 11, 12, 13, -1};
        std::vector<int> miss_slot = {5, 0, 2, 1, -1, -1, 4, 3, -1, -1, -1, -1, 0, 1, 2, 3, 4, -1};
        std::vector<int> n_miss = {4, 2, 5};
        std::vector<unsigned short> win(heads * wrows * row, 0xffff);
        const int row_u4 = P * row * 2 / 16;
        for (unsigned blocks : {1u, 3u}) {
            std::fill(win.begin(), win.end(), 0xffff);
            emu_launch(blocks, 32, [&] {
                ds_gather_misses(src, (long)P * row * 2, (long)toks * row * 2, miss_tok.data(),
                                 miss_slot.data(), n_miss.data(), cap, k, heads, row_u4,
                                 (uint4*)win.data(), wrows / P, fixed / P);
            });
            for (int g = 0; g < heads; g++) {
                std::vector<int> filled(cap, -1);
                for (int m = 0; m < n_miss[g]; m++) filled[miss_slot[g * cap + m]] = miss_tok[g * cap + m];
                for (int r = 0; r < wrows; r++)
                    for (int c = 0; c < row; c++) {
                        unsigned short got = win[(g * wrows + r) * row + c];
                        int pg = r >= fixed ? filled[(r - fixed) / P] : -1;
                        unsigned short want =
                            pg < 0 ? 0xffff : g * 10000 + (pg * P + (r - fixed) % P) * 40 + c;
                        if (got != want)
                            FAIL("gather (%u blocks) head %d window row %d col %d: %u, want %u", blocks, g,
                                 r, c, got, want);
                    }
            }
        }
    }
    // Unpack tokens [5, 41) of the `[g][token]` slab into dense K and V (`[t][g * D + c]`).
    {
        const long t0 = 5, t1 = 41;
        std::vector<unsigned short> k(toks * heads * D, 0), v(toks * heads * D, 0);
        emu_launch(2, 64, [&] {
            ds_unpack_rows(src, heads, D, t0, t1, row * 2 / 16, (long)toks * row * 2 / 16,
                           (uint4*)k.data(), (uint4*)v.data());
        });
        for (long t = 0; t < toks; t++)
            for (int g = 0; g < heads; g++)
                for (int c = 0; c < D; c++) {
                    bool in = t >= t0 && t < t1;
                    unsigned short wk = in ? g * 10000 + t * 40 + c : 0;
                    unsigned short wv = in ? g * 10000 + t * 40 + D + c : 0;
                    if (k[(t * heads + g) * D + c] != wk || v[(t * heads + g) * D + c] != wv)
                        FAIL("unpack token %ld head %d col %d: K %u V %u, want %u %u", t, g, c,
                             k[(t * heads + g) * D + c], v[(t * heads + g) * D + c], wk, wv);
                }
    }
    std::printf("emulated page kernels: page max, page gather, [g][token] unpack agree\n");
    return 0;
}
