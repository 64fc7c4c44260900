//! The calibrated solves of one layer (see the module header of `prune`): the
//! reweighted-L1 mask by coordinate descent with lambda by bisection, the
//! least-squares refit of the survivors, and the relative output error.
//!
//! The layer's quadratic form comes as G (d x d) or, for layers that see no more
//! calibration rows than inputs, as the rows X themselves (G = X^T X). Coordinate
//! descent keeps, per weight row, either U = Gd (w - w0) (cost d per changed
//! weight) or the residual e = X (w - w0) (cost n per weight). Rows sharing a
//! quadratic form are solved eight at a time in lockstep, so every column of G or
//! X read from memory serves eight weight rows.

#![allow(clippy::needless_range_loop)] // lane loops over the B rows of a block read clearer with indices

use std::sync::OnceLock;

use ndarray::{Array1, Array2};
use rayon::prelude::*;

use crate::passes::calib::{Rows, Stats};

/// Rows per lockstep block.
const B: usize = 8;
/// Damping added to the (mean-diagonal-1) Gram: rho I.
pub const DAMP: f64 = 1e-2;
/// Reweighting epsilon, as a fraction of the layer's mean |w0| (nonzeros).
const EPS_FRACTION: f64 = 0.1;
/// Weight changes below this fraction of the layer's mean |w0| are not applied
/// (unless they reach or leave zero): they cost a full update and move nothing
/// that matters for the mask, which the refit then fixes.
const TAU_FRACTION: f64 = 1e-3;
/// Rows the bisection on lambda looks at (evenly spread).
const SAMPLE_ROWS: usize = 64;
/// Bisection steps at most once lambda is bracketed, and the zero-count
/// tolerance on the sample that ends it early (the final ranking is exact).
const BISECTION_STEPS: usize = 12;
const BISECTION_TOL: f64 = 0.005;
/// Coordinate-descent sweeps per round at most (rounds warm-start each other; more
/// sweeps changed the refit output error by under 0.01 points on MobileNetV2).
const SWEEPS: usize = 4;
/// Direct (Cholesky) refit up to this many unknowns, conjugate gradients above.
const CHOLESKY_MAX: usize = 256;
/// Conjugate-gradient iterations at most, and the relative residual to stop at.
const CG_ITERS: usize = 300;
const CG_TOL: f64 = 1e-3;

/// One layer's weights, row layout and normalized quadratic forms (one per group).
pub struct Problem<'a> {
    w0: &'a [f32],
    rows: &'a Rows,
    stats: &'a [Stats],
    d: usize,
    per_group: usize,
    /// Diagonal of G (undamped) per group.
    diag: Vec<Vec<f64>>,
    eps: f64,
    tau: f64,
    /// sum_rows w0^T G w0, computed once.
    energy: OnceLock<f64>,
}

/// Solved blocks: rows, solution, unpenalized values.
type Solved = Vec<(Block, Vec<f64>, Vec<f64>)>;
/// A bisection end: lambda and its zero count.
type End = Option<(f64, usize)>;

/// A block: up to B rows of one group, values interleaved (d x B).
struct Block {
    group: usize,
    rows: Vec<usize>,
}

impl<'a> Problem<'a> {
    pub fn new(w0: &'a [f32], rows: &'a Rows, stats: &'a [Stats], d: usize) -> Problem<'a> {
        let nz: Vec<f64> = w0
            .iter()
            .filter(|x| **x != 0.0)
            .map(|x| x.abs() as f64)
            .collect();
        let mean = if nz.is_empty() {
            1.0
        } else {
            nz.iter().sum::<f64>() / nz.len() as f64
        };
        let mean = if mean > 0.0 && mean.is_finite() {
            mean
        } else {
            1.0
        };
        let diag = stats
            .iter()
            .map(|s| match s {
                Stats::Gram(g) => (0..d).map(|i| g[i * d + i]).collect(),
                Stats::Rows { x, n } => (0..d)
                    .map(|i| x[i * n..(i + 1) * n].iter().map(|v| v * v).sum())
                    .collect(),
            })
            .collect();
        Problem {
            w0,
            rows,
            stats,
            d,
            per_group: rows.count / stats.len().max(1),
            diag,
            eps: EPS_FRACTION * mean,
            tau: TAU_FRACTION * mean,
            energy: OnceLock::new(),
        }
    }

    fn group_of(&self, r: usize) -> usize {
        r / self.per_group.max(1)
    }

    fn blocks(&self, rows: &[usize]) -> Vec<Block> {
        let mut out: Vec<Block> = Vec::new();
        for &r in rows {
            let group = self.group_of(r);
            match out.last_mut() {
                Some(b) if b.group == group && b.rows.len() < B => b.rows.push(r),
                _ => out.push(Block {
                    group,
                    rows: vec![r],
                }),
            }
        }
        out
    }

    /// Interleaved d x B values of `w0` for the block's rows (padding lanes are 0).
    fn load(&self, blk: &Block) -> Vec<f64> {
        let mut x = vec![0.0; self.d * B];
        for (b, &r) in blk.rows.iter().enumerate() {
            for j in 0..self.d {
                x[j * B + b] = self.w0[self.rows.index(r, j)] as f64;
            }
        }
        x
    }

    fn row(&self, r: usize, w: &[f32]) -> Vec<f64> {
        (0..self.d)
            .map(|j| w[self.rows.index(r, j)] as f64)
            .collect()
    }

    /// Reweighted-L1 coordinate descent on one block; returns the solution and the
    /// unpenalized value of each coordinate at the end (w0_i - q_i / c_i).
    fn cd(&self, blk: &Block, lambda: f64, rounds: usize) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let stats = &self.stats[blk.group];
        let diag = &self.diag[blk.group];
        let w0 = self.load(blk);
        let mut w = w0.clone();
        let mut z = w0.clone();
        // Gram: U = Gd (w - w0), d x B.  Rows: e = X (w - w0), n x B.
        let mut acc = match stats {
            Stats::Gram(_) => vec![0.0; d * B],
            Stats::Rows { n, .. } => vec![0.0; n * B],
        };
        let mut pen = vec![0.0; d * B];
        for _ in 0..rounds {
            for k in 0..d * B {
                pen[k] = if w0[k] == 0.0 {
                    f64::INFINITY
                } else {
                    lambda / (w[k].abs() + self.eps)
                };
            }
            for _ in 0..SWEEPS {
                let mut max_change = 0.0f64;
                for i in 0..d {
                    let gi = diag[i];
                    let c = gi + DAMP;
                    // q = (Gd (w - w0))_i without the i-th term.
                    let mut q = [0.0f64; B];
                    match stats {
                        Stats::Gram(_) => {
                            for b in 0..B {
                                let k = i * B + b;
                                q[b] = acc[k] - c * (w[k] - w0[k]);
                            }
                        }
                        Stats::Rows { x, n } => {
                            let col = &x[i * n..(i + 1) * n];
                            let mut dot = [0.0f64; B];
                            for (xs, es) in col.iter().zip(acc.chunks_exact(B)) {
                                for b in 0..B {
                                    dot[b] += xs * es[b];
                                }
                            }
                            for b in 0..B {
                                let k = i * B + b;
                                q[b] = dot[b] - gi * (w[k] - w0[k]);
                            }
                        }
                    }
                    let mut delta = [0.0f64; B];
                    let mut any = false;
                    for b in 0..B {
                        let k = i * B + b;
                        let old = w[k];
                        let zz = w0[k] - q[b] / c;
                        z[k] = zz;
                        let t = pen[k] / (2.0 * c);
                        let new = if zz > t {
                            zz - t
                        } else if zz < -t {
                            zz + t
                        } else {
                            0.0
                        };
                        let change = new - old;
                        if change != 0.0 && (change.abs() > self.tau || new == 0.0 || old == 0.0) {
                            w[k] = new;
                            delta[b] = change;
                            any = true;
                            max_change = max_change.max(change.abs());
                        }
                    }
                    if !any {
                        continue;
                    }
                    match stats {
                        Stats::Gram(g) => {
                            let row = &g[i * d..(i + 1) * d];
                            for (gij, uj) in row.iter().zip(acc.chunks_exact_mut(B)) {
                                for b in 0..B {
                                    uj[b] += gij * delta[b];
                                }
                            }
                            for b in 0..B {
                                acc[i * B + b] += DAMP * delta[b];
                            }
                        }
                        Stats::Rows { x, n } => {
                            let col = &x[i * n..(i + 1) * n];
                            for (xs, es) in col.iter().zip(acc.chunks_exact_mut(B)) {
                                for b in 0..B {
                                    es[b] += xs * delta[b];
                                }
                            }
                        }
                    }
                }
                if max_change <= self.tau {
                    break;
                }
            }
        }
        (w, z)
    }

    /// Solves the rows at `lambda`: per block, (rows, w, z).
    fn solve(&self, rows: &[usize], lambda: f64, rounds: usize) -> Solved {
        self.blocks(rows)
            .into_par_iter()
            .map(|blk| {
                let (w, z) = self.cd(&blk, lambda, rounds);
                (blk, w, z)
            })
            .collect()
    }

    fn zeros(&self, solved: &Solved) -> usize {
        solved
            .iter()
            .map(|(blk, w, _)| {
                (0..self.d)
                    .map(|j| (0..blk.rows.len()).filter(|&b| w[j * B + b] == 0.0).count())
                    .sum::<usize>()
            })
            .sum()
    }

    /// The reweighted-L1 mask with exactly max(k, existing zeros) zeros, and the lambda used.
    pub fn reweighted_mask(&self, k: usize, rounds: usize) -> (Vec<bool>, f64) {
        let n = self.w0.len();
        let existing = self.w0.iter().filter(|x| **x == 0.0).count();
        let k = k.clamp(existing, n);
        if k == existing || k == n {
            let all = k == n;
            return (self.w0.iter().map(|x| all || *x == 0.0).collect(), 0.0);
        }
        let all: Vec<usize> = (0..self.rows.count).collect();
        let sample: Vec<usize> = if self.rows.count <= SAMPLE_ROWS {
            all.clone()
        } else {
            (0..SAMPLE_ROWS)
                .map(|i| i * self.rows.count / SAMPLE_ROWS)
                .collect()
        };
        let n_s = sample.len() * self.d;
        let k_s = ((k as f64 / n as f64) * n_s as f64).round() as usize;
        let tol = ((BISECTION_TOL * n_s as f64) as usize).max(1);

        // First guess: where each weight alone would be cut at w = w0 (2 c |w0| (|w0| + eps)).
        let mut alone: Vec<f64> = Vec::new();
        let mut zero_s = 0usize;
        for &r in &sample {
            let diag = &self.diag[self.group_of(r)];
            for j in 0..self.d {
                let w = self.w0[self.rows.index(r, j)].abs() as f64;
                if w == 0.0 {
                    zero_s += 1;
                } else {
                    alone.push(2.0 * (diag[j] + DAMP) * w * (w + self.eps));
                }
            }
        }
        alone.sort_by(f64::total_cmp);
        let pick = k_s.saturating_sub(zero_s).clamp(1, alone.len().max(1)) - 1;
        let mut lambda = alone
            .get(pick)
            .copied()
            .filter(|l| *l > 0.0 && l.is_finite())
            .unwrap_or(1.0);

        let mut last: Option<(f64, Solved)> = None;
        let mut eval = |lambda: f64| -> usize {
            let solved = self.solve(&sample, lambda, rounds);
            let z = self.zeros(&solved);
            last = Some((lambda, solved));
            z
        };
        // Bracket: lo gives fewer than k_s zeros, hi more; then bisection in log lambda,
        // at the point the zero counts interpolate to (kept inside the middle 80%).
        let (mut lo, mut hi): (End, End) = (None, None);
        let mut best = (lambda, usize::MAX);
        let mut steps = 0;
        for _ in 0..BISECTION_STEPS + 40 {
            let z = eval(lambda);
            if best.1 == usize::MAX || z.abs_diff(k_s) < best.1.abs_diff(k_s) {
                best = (lambda, z);
            }
            if z.abs_diff(k_s) <= tol {
                break;
            }
            if z < k_s {
                lo = Some((lambda, z));
            } else {
                hi = Some((lambda, z));
            }
            lambda = match (lo, hi) {
                (Some((a, za)), Some((b, zb))) => {
                    steps += 1;
                    if steps > BISECTION_STEPS || b / a < 1.0 + 1e-6 {
                        break;
                    }
                    let t = (k_s - za) as f64 / (zb - za).max(1) as f64;
                    let t = t.clamp(0.1, 0.9);
                    (a.ln() + t * (b.ln() - a.ln())).exp()
                }
                (Some((a, _)), None) => a * 4.0,
                (None, Some((b, _))) => b / 4.0,
                (None, None) => unreachable!("one side is set"),
            };
        }
        let lambda = best.0;
        let solved = match last {
            Some((l, s)) if l == lambda && sample.len() == all.len() => s,
            _ => self.solve(&all, lambda, rounds),
        };

        // Rank: existing zeros, then zeros of the solution by |unpenalized value|, then
        // nonzeros by |w|; ties by flat index. The k lowest are zeroed.
        let mut keys: Vec<(u8, f64, usize)> = Vec::with_capacity(n);
        for (blk, w, z) in &solved {
            for (b, &r) in blk.rows.iter().enumerate() {
                for j in 0..self.d {
                    let idx = self.rows.index(r, j);
                    let key = if self.w0[idx] == 0.0 {
                        (0, 0.0, idx)
                    } else if w[j * B + b] == 0.0 {
                        (1, z[j * B + b].abs(), idx)
                    } else {
                        (2, w[j * B + b].abs(), idx)
                    };
                    keys.push(key);
                }
            }
        }
        let cmp = |a: &(u8, f64, usize), b: &(u8, f64, usize)| {
            a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        keys.select_nth_unstable_by(k - 1, cmp);
        let mut mask = vec![false; n];
        for key in &keys[..k] {
            mask[key.2] = true;
        }
        (mask, lambda)
    }

    /// Least-squares refit of the survivors: w_S = w0_S + Gd_SS^{-1} Gd_{S,~S} w0_{~S},
    /// w_~S = 0. Survivors never come out exactly 0 (a survivor that would is set to
    /// the smallest normal float with the sign of w0), so the mask stays exact.
    pub fn refit(&self, mask: &[bool]) -> Vec<f32> {
        let solved: Vec<Vec<f64>> = (0..self.rows.count)
            .into_par_iter()
            .map(|r| self.refit_row(r, mask))
            .collect();
        let mut out = vec![0.0f32; self.w0.len()];
        for (r, w) in solved.iter().enumerate() {
            for j in 0..self.d {
                let idx = self.rows.index(r, j);
                if mask[idx] {
                    continue;
                }
                let mut v = w[j] as f32;
                if !v.is_finite() {
                    v = self.w0[idx];
                }
                if v == 0.0 {
                    v = f32::MIN_POSITIVE.copysign(self.w0[idx]);
                }
                out[idx] = v;
            }
        }
        out
    }

    /// One row's refit values (only the survivors' entries are meaningful).
    fn refit_row(&self, r: usize, mask: &[bool]) -> Vec<f64> {
        let d = self.d;
        let w0 = self.row(r, self.w0);
        let keep: Vec<usize> = (0..d).filter(|&j| !mask[self.rows.index(r, j)]).collect();
        let cut: Vec<usize> = (0..d)
            .filter(|&j| mask[self.rows.index(r, j)] && w0[j] != 0.0)
            .collect();
        if keep.is_empty() || cut.is_empty() {
            return w0;
        }
        let m = keep.len();
        let delta: Vec<f64> = match &self.stats[self.group_of(r)] {
            Stats::Gram(g) => {
                // (G_SS + rho I) delta = G_{S,cut} w0_cut
                let mut a = Array2::<f64>::zeros((m, m));
                let mut rhs = Array1::<f64>::zeros(m);
                for (p, &i) in keep.iter().enumerate() {
                    let gi = &g[i * d..(i + 1) * d];
                    for (q, &j) in keep.iter().enumerate() {
                        a[[p, q]] = gi[j];
                    }
                    a[[p, p]] += DAMP;
                    rhs[p] = cut.iter().map(|&j| gi[j] * w0[j]).sum();
                }
                solve_spd(a, rhs)
            }
            Stats::Rows { x, n } => {
                let n = *n;
                // t = X_cut w0_cut; At = X_S^T (m x n).
                let mut t = Array1::<f64>::zeros(n);
                for &j in &cut {
                    let col = &x[j * n..(j + 1) * n];
                    for (ts, xs) in t.iter_mut().zip(col) {
                        *ts += xs * w0[j];
                    }
                }
                let mut at = Array2::<f64>::zeros((m, n));
                for (p, &i) in keep.iter().enumerate() {
                    at.row_mut(p)
                        .iter_mut()
                        .zip(&x[i * n..(i + 1) * n])
                        .for_each(|(a, v)| *a = *v);
                }
                if m <= n {
                    // Primal: (At At^T + rho I) delta = At t.
                    let mut a = at.dot(&at.t());
                    for p in 0..m {
                        a[[p, p]] += DAMP;
                    }
                    solve_spd(a, at.dot(&t))
                } else {
                    // Dual: delta = At (At^T At + rho I)^{-1} t.
                    let mut k = at.t().dot(&at);
                    for s in 0..n {
                        k[[s, s]] += DAMP;
                    }
                    let u = solve_spd(k, t);
                    at.dot(&Array1::from(u)).to_vec()
                }
            }
        };
        let mut w = w0;
        for (p, &i) in keep.iter().enumerate() {
            w[i] += delta[p];
        }
        w
    }

    /// sum_rows w^T G w over the rows, with w a d-vector per row given sparsely.
    fn quad(&self, r: usize, v: &[f64]) -> f64 {
        let d = self.d;
        let nz: Vec<usize> = (0..d).filter(|&j| v[j] != 0.0).collect();
        match &self.stats[self.group_of(r)] {
            Stats::Gram(g) => nz
                .iter()
                .map(|&i| {
                    let gi = &g[i * d..(i + 1) * d];
                    v[i] * nz.iter().map(|&j| gi[j] * v[j]).sum::<f64>()
                })
                .sum(),
            Stats::Rows { x, n } => {
                let mut e = vec![0.0; *n];
                for &j in &nz {
                    for (es, xs) in e.iter_mut().zip(&x[j * n..(j + 1) * n]) {
                        *es += xs * v[j];
                    }
                }
                e.iter().map(|v| v * v).sum()
            }
        }
    }

    /// sum_rows (w - w0)^T G (w - w0) / sum_rows w0^T G w0, G undamped.
    pub fn output_error(&self, w: &[f32]) -> f64 {
        // Per-row terms in parallel, summed in row order: the same bits with any
        // thread count.
        let den = *self.energy.get_or_init(|| {
            (0..self.rows.count)
                .into_par_iter()
                .map(|r| self.quad(r, &self.row(r, self.w0)))
                .collect::<Vec<f64>>()
                .iter()
                .sum()
        });
        let num: f64 = (0..self.rows.count)
            .into_par_iter()
            .map(|r| {
                let a = self.row(r, w);
                let b = self.row(r, self.w0);
                let delta: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                self.quad(r, &delta)
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        // X^T X is positive semi-definite: a quadratic form at or below zero is
        // an unchanged row or rounding (and 0 * a negative entry is -0.0, which
        // would print as "-0.00%").
        if den > 0.0 && num > 0.0 {
            num / den
        } else {
            0.0
        }
    }
}

/// Solves the symmetric positive definite system a x = b: Cholesky up to
/// [`CHOLESKY_MAX`] unknowns, Jacobi-preconditioned conjugate gradients above.
fn solve_spd(a: Array2<f64>, b: Array1<f64>) -> Vec<f64> {
    let m = b.len();
    if m <= CHOLESKY_MAX {
        if let Some(x) = cholesky_solve(a.clone(), &b) {
            return x;
        }
    }
    cg(&a, &b)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four partial sums so the loop vectorizes.
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Cholesky factorization (lower, row-major) and the two triangular solves.
fn cholesky_solve(a: Array2<f64>, b: &Array1<f64>) -> Option<Vec<f64>> {
    let m = b.len();
    let mut l = a.into_raw_vec_and_offset().0;
    for j in 0..m {
        let (done, rest) = l.split_at_mut(j * m);
        let row_j = &mut rest[..m];
        let s = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let _ = done;
        row_j[j] = s.sqrt();
        let (upto, after) = l.split_at_mut((j + 1) * m);
        let row_j = &upto[j * m..j * m + m];
        let ljj = row_j[j];
        for i in j + 1..m {
            let row_i = &mut after[(i - j - 1) * m..(i - j) * m];
            row_i[j] = (row_i[j] - dot(&row_i[..j], &row_j[..j])) / ljj;
        }
    }
    let mut y = b.to_vec();
    for i in 0..m {
        let row = &l[i * m..i * m + m];
        y[i] = (y[i] - dot(&row[..i], &y[..i])) / row[i];
    }
    for i in (0..m).rev() {
        let mut s = y[i];
        for k in i + 1..m {
            s -= l[k * m + i] * y[k];
        }
        y[i] = s / l[i * m + i];
    }
    Some(y)
}

fn cg(a: &Array2<f64>, b: &Array1<f64>) -> Vec<f64> {
    let m = b.len();
    let diag: Vec<f64> = (0..m)
        .map(|i| if a[[i, i]] > 0.0 { a[[i, i]] } else { 1.0 })
        .collect();
    let bnorm = b.dot(b);
    let mut x = Array1::<f64>::zeros(m);
    if bnorm == 0.0 {
        return x.to_vec();
    }
    let mut r = b.clone();
    let mut z: Array1<f64> = r.iter().zip(&diag).map(|(r, d)| r / d).collect();
    let mut p = z.clone();
    let mut rz = r.dot(&z);
    for _ in 0..CG_ITERS {
        let q = a.dot(&p);
        let pq = p.dot(&q);
        if pq <= 0.0 || !pq.is_finite() {
            break;
        }
        let alpha = rz / pq;
        x.scaled_add(alpha, &p);
        r.scaled_add(-alpha, &q);
        if r.dot(&r) <= CG_TOL * CG_TOL * bnorm {
            break;
        }
        z = r.iter().zip(&diag).map(|(r, d)| r / d).collect();
        let rz_new = r.dot(&z);
        p = &z + &(rz_new / rz * &p);
        rz = rz_new;
    }
    x.to_vec()
}
