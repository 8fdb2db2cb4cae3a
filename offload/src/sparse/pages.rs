//! Page-granular selection (`--page-tokens P`): the top-k taken in aligned runs of P positions,
//! so that the rows to fetch come in units of P consecutive tokens of one KV head (what the
//! GPU's zero-copy gathers need to fill PCIe, and whole blocks for the disk tier).

/// Most tokens a page may have (`--page-tokens`).
pub const MAX_PAGE_TOKENS: usize = 64;

/// The recent window the page policy uses for `--recent recent`: a few more tokens, so that
/// sinks plus recent end on a page boundary (the GPU store's window then starts one). Both
/// stores take it, so the same flags select the same pages on either backend.
pub fn page_recent(sink: usize, recent: usize, page: usize) -> usize {
    if page <= 1 {
        return recent;
    }
    (sink + recent).next_multiple_of(page) - sink
}

/// The candidate pages of a query whose middle positions (neither sinks nor recent) are
/// `lo..hi`: the aligned pages of `page` positions wholly inside it, as page indices. The rule
/// both stores use (the CPU's [`select_pages`], the GPU store in `farsight-prefetch`).
pub fn whole_pages(lo: usize, hi: usize, page: usize) -> std::ops::Range<usize> {
    let page = page.max(1);
    let first = lo.div_ceil(page);
    first..(hi / page).max(first)
}

/// Page-granular top-k, the policy the GPU store (`farsight-prefetch`) runs too: the candidates
/// are the aligned pages of `page` positions (`p / page`) that lie wholly inside the middle
/// range `lo..hi` (neither sinks nor recent; the newest `< page` middle positions wait until
/// their page is complete); the `k / page` pages of the best page scores (a page's best label
/// score over its positions in `middle`; ties: the earlier page) are chosen whole. Returns the
/// chosen pages' positions that `middle` holds (all of them, unless some were evicted), in
/// increasing order. `middle` is increasing with label `scores`.
pub(crate) fn select_pages(
    middle: &[usize],
    scores: &[f32],
    k: usize,
    page: usize,
    (lo, hi): (usize, usize),
) -> Vec<usize> {
    let page = page.max(1);
    let candidates = whole_pages(lo, hi, page);
    // (first index into `middle`, end index, best score) per candidate page present.
    let mut pages: Vec<(usize, usize, f32)> = Vec::new();
    for (i, (&p, &s)) in middle.iter().zip(scores).enumerate() {
        let q = p / page;
        if !candidates.contains(&q) {
            continue;
        }
        match pages.last_mut() {
            Some(last) if middle[last.0] / page == q => {
                last.1 = i + 1;
                last.2 = last.2.max(s);
            }
            _ => pages.push((i, i + 1, s)),
        }
    }
    let n = (k / page).min(pages.len());
    if n == 0 {
        return Vec::new();
    }
    let by_score =
        |a: &(usize, usize, f32), b: &(usize, usize, f32)| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0));
    if n < pages.len() {
        pages.select_nth_unstable_by(n - 1, by_score);
        pages.truncate(n);
    }
    pages.sort_unstable_by_key(|p| p.0);
    pages
        .iter()
        .flat_map(|&(a, b, _)| middle[a..b].iter().copied())
        .collect()
}
