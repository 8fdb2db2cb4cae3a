//! Page-granular selection (`--page-tokens P`): the top-k taken in aligned runs of P positions,
//! so that the rows to fetch come in units of P consecutive tokens of one KV head (what the
//! GPU's zero-copy gathers need to fill PCIe, and whole blocks for the disk tier).

/// Page-granular top-k: `k` of the positions `middle` (increasing, with label `scores`), taken a
/// page at a time (aligned runs of `page` positions, `p / page`) in order of the page's best
/// score (ties: the earlier page), whole pages while they fit, then the best-scoring positions
/// of the next page to make exactly `k`.
pub(crate) fn select_pages(middle: &[usize], scores: &[f32], k: usize, page: usize) -> Vec<usize> {
    // (first index into `middle`, end index, best score) per page present.
    let mut pages: Vec<(usize, usize, f32)> = Vec::new();
    for (i, (&p, &s)) in middle.iter().zip(scores).enumerate() {
        match pages.last_mut() {
            Some(last) if middle[last.0] / page == p / page => {
                last.1 = i + 1;
                last.2 = last.2.max(s);
            }
            _ => pages.push((i, i + 1, s)),
        }
    }
    pages.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
    let mut out = Vec::with_capacity(k);
    for &(lo, hi, _) in &pages {
        let room = k - out.len();
        if room == 0 {
            break;
        }
        if hi - lo <= room {
            out.extend_from_slice(&middle[lo..hi]);
        } else {
            let mut part: Vec<usize> = (lo..hi).collect();
            part.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            out.extend(part[..room].iter().map(|&i| middle[i]));
        }
    }
    out
}
