//! Masks from magnitudes: per layer, global, and N:M. A mask is `true` where the
//! weight becomes zero. Orders are total: |w| (`f32::total_cmp`, so NaN ranks as
//! the largest), then the flat index, lower first.

use std::cmp::Ordering;

pub use crate::passes::calib::Rows;

#[inline]
fn by_magnitude(w: &[f32], a: u32, b: u32) -> Ordering {
    w[a as usize]
        .abs()
        .total_cmp(&w[b as usize].abs())
        .then(a.cmp(&b))
}

/// Zeroes exactly `k` weights (the smallest |w|), or keeps the existing zeros
/// when there are more of them.
pub fn magnitude(w: &[f32], k: usize) -> Vec<bool> {
    let k = k.min(w.len());
    let mut mask: Vec<bool> = w.iter().map(|x| *x == 0.0).collect();
    if k == 0 {
        return mask;
    }
    let mut idx: Vec<u32> = (0..w.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| by_magnitude(w, a, b));
    }
    for &i in &idx[..k] {
        mask[i as usize] = true;
    }
    mask
}

/// One threshold over several layers: zeroes the `k` smallest |w| of the pool.
/// Returns the masks and the largest zeroed |w|.
pub fn global(layers: &[&[f32]], k: usize) -> (Vec<Vec<bool>>, f32) {
    let mut masks: Vec<Vec<bool>> = layers
        .iter()
        .map(|w| w.iter().map(|x| *x == 0.0).collect())
        .collect();
    let mut idx: Vec<(u32, u32)> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, w)| (0..w.len() as u32).map(move |i| (l as u32, i)))
        .collect();
    let k = k.min(idx.len());
    if k == 0 {
        return (masks, 0.0);
    }
    let value = |&(l, i): &(u32, u32)| layers[l as usize][i as usize].abs();
    let cmp = |a: &(u32, u32), b: &(u32, u32)| value(a).total_cmp(&value(b)).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    let mut threshold = 0.0f32;
    for e in &idx[..k] {
        masks[e.0 as usize][e.1 as usize] = true;
        threshold = threshold.max(value(e));
    }
    (masks, threshold)
}

/// N:M: in every row, each run of `m` consecutive weights keeps its `n` largest
/// |w| (a trailing run of length L keeps min(n, L)).
pub fn nm(w: &[f32], rows: &Rows, n: usize, m: usize) -> Vec<bool> {
    let mut mask: Vec<bool> = w.iter().map(|x| *x == 0.0).collect();
    let mut group: Vec<u32> = Vec::with_capacity(m);
    for r in 0..rows.count {
        let mut j0 = 0;
        while j0 < rows.len {
            let end = (j0 + m).min(rows.len);
            group.clear();
            group.extend((j0..end).map(|j| rows.index(r, j) as u32));
            let drop = group.len().saturating_sub(n);
            group.sort_unstable_by(|&a, &b| by_magnitude(w, a, b));
            for &i in &group[..drop] {
                mask[i as usize] = true;
            }
            j0 = end;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_counts_and_ties() {
        let w = [0.5, -0.1, 0.1, 0.0, 0.3, -0.5];
        let m = magnitude(&w, 3);
        assert_eq!(m, vec![false, true, true, true, false, false]);
        // Ties: 0.1 and -0.1 tie, the lower index goes first.
        let m = magnitude(&w, 2);
        assert_eq!(m, vec![false, true, false, true, false, false]);
        // More existing zeros than asked: they stay.
        assert_eq!(magnitude(&[0.0, 0.0, 1.0], 1), vec![true, true, false]);
    }

    #[test]
    fn rows_layouts() {
        let r = Rows::columns(3, 2, 2); // [2, 2, 3]
        assert_eq!(r.count, 6);
        assert_eq!(r.index(0, 1), 3);
        assert_eq!(r.index(4, 1), 6 + 3 + 1);
    }

    #[test]
    fn nm_groups() {
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, -6.0, 0.5, 0.1, 9.0];
        let m = nm(&w, &Rows::contiguous(1, 9), 2, 4);
        assert_eq!(
            m,
            vec![true, true, false, false, false, false, true, true, false]
        );
        let g = global(&[&[1.0, -3.0], &[2.0, 0.5]], 2);
        assert_eq!(g.0, vec![vec![true, false], vec![false, true]]);
        assert_eq!(g.1, 1.0);
    }
}
