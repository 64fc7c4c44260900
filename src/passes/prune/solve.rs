//! The calibrated solves of one layer (see the module header of `prune`): the
//! reweighted-L1 mask by coordinate descent with lambda by bisection, the
//! least-squares refit of the survivors by conjugate gradients, and the relative
//! output error. Rows sharing a Gram are processed eight at a time in lockstep, so
//! each Gram row read from memory serves eight weight rows.

#![allow(clippy::needless_range_loop)] // lane loops over the B rows of a block read clearer with indices

use rayon::prelude::*;

use super::mask::Rows;

/// Rows per lockstep block.
const B: usize = 8;
/// Damping added to the (mean-diagonal-1) Gram: rho I.
pub const DAMP: f64 = 1e-2;
/// Reweighting epsilon, as a fraction of the layer's mean |w0| (nonzeros).
const EPS_FRACTION: f64 = 0.1;
/// Rows the bisection on lambda looks at (evenly spread).
const SAMPLE_ROWS: usize = 64;
/// Bisection steps at most.
const BISECTION_STEPS: usize = 16;
/// Coordinate-descent sweeps per round at most.
const SWEEPS: usize = 30;
/// Conjugate-gradient iterations at most, and the relative residual to stop at.
const CG_ITERS: usize = 500;
const CG_TOL: f64 = 1e-5;

/// One layer's weights, row layout and normalized Grams (one per group).
pub struct Problem<'a> {
    w0: &'a [f32],
    rows: &'a Rows,
    grams: &'a [Vec<f64>],
    d: usize,
    per_group: usize,
    eps: f64,
    tol: f64,
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

/// y = G x for x, y of d x B (interleaved); G is d x d row-major.
fn gemm_b(g: &[f64], d: usize, x: &[f64], y: &mut [f64]) {
    for (i, yi) in y.chunks_exact_mut(B).enumerate() {
        let row = &g[i * d..(i + 1) * d];
        let mut acc = [0.0f64; B];
        for (gij, xj) in row.iter().zip(x.chunks_exact(B)) {
            for b in 0..B {
                acc[b] += gij * xj[b];
            }
        }
        yi.copy_from_slice(&acc);
    }
}

impl<'a> Problem<'a> {
    pub fn new(w0: &'a [f32], rows: &'a Rows, grams: &'a [Vec<f64>], d: usize) -> Problem<'a> {
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
        Problem {
            w0,
            rows,
            grams,
            d,
            per_group: rows.count / grams.len().max(1),
            eps: EPS_FRACTION * mean,
            tol: 1e-4 * mean,
        }
    }

    fn blocks(&self, rows: &[usize]) -> Vec<Block> {
        let mut out: Vec<Block> = Vec::new();
        for &r in rows {
            let group = r / self.per_group.max(1);
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

    /// Interleaved d x B values of `w` for the block's rows (padding rows are 0).
    fn load(&self, blk: &Block, w: &[f32]) -> Vec<f64> {
        let mut x = vec![0.0; self.d * B];
        for (b, &r) in blk.rows.iter().enumerate() {
            for j in 0..self.d {
                x[j * B + b] = w[self.rows.index(r, j)] as f64;
            }
        }
        x
    }

    /// Reweighted-L1 coordinate descent on one block; returns the solution and the
    /// unpenalized value of each coordinate at the end (w0_i - q_i / c_i).
    fn cd(&self, blk: &Block, lambda: f64, rounds: usize) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let g = &self.grams[blk.group];
        let w0 = self.load(blk, self.w0);
        let mut w = w0.clone();
        let mut z = w0.clone();
        let mut u = vec![0.0; d * B]; // Gd (w - w0)
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
                    let c = g[i * d + i] + DAMP;
                    let mut delta = [0.0f64; B];
                    let mut any = false;
                    for b in 0..B {
                        let k = i * B + b;
                        let old = w[k];
                        let q = u[k] - c * (old - w0[k]);
                        let zz = w0[k] - q / c;
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
                        if change != 0.0 {
                            w[k] = new;
                            delta[b] = change;
                            any = true;
                            max_change = max_change.max(change.abs());
                        }
                    }
                    if any {
                        let row = &g[i * d..(i + 1) * d];
                        for (gij, uj) in row.iter().zip(u.chunks_exact_mut(B)) {
                            for b in 0..B {
                                uj[b] += gij * delta[b];
                            }
                        }
                        for b in 0..B {
                            u[i * B + b] += DAMP * delta[b];
                        }
                    }
                }
                if max_change <= self.tol {
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

        // First guess: where each weight alone would be cut at w = w0 (2 c |w0| (|w0| + eps)).
        let mut alone: Vec<f64> = Vec::new();
        let mut zero_s = 0usize;
        for &r in &sample {
            let g = &self.grams[r / self.per_group.max(1)];
            for j in 0..self.d {
                let w = self.w0[self.rows.index(r, j)].abs() as f64;
                if w == 0.0 {
                    zero_s += 1;
                } else {
                    alone.push(2.0 * (g[j * self.d + j] + DAMP) * w * (w + self.eps));
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
        // Bracket: lo gives at most k_s zeros, hi at least.
        let (mut lo, mut hi): (End, End) = (None, None);
        let mut best = (lambda, usize::MAX);
        let mut steps = 0;
        for _ in 0..BISECTION_STEPS + 40 {
            let z = eval(lambda);
            if best.1 == usize::MAX || z.abs_diff(k_s) < best.1.abs_diff(k_s) {
                best = (lambda, z);
            }
            if z == k_s {
                break;
            }
            if z < k_s {
                lo = Some((lambda, z));
            } else {
                hi = Some((lambda, z));
            }
            lambda = match (lo, hi) {
                (Some((a, _)), Some((b, _))) => {
                    steps += 1;
                    if steps > BISECTION_STEPS || b / a < 1.0 + 1e-6 {
                        break;
                    }
                    (a * b).sqrt()
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
        let all: Vec<usize> = (0..self.rows.count).collect();
        let d = self.d;
        let results: Vec<(Block, Vec<f64>)> = self
            .blocks(&all)
            .into_par_iter()
            .map(|blk| {
                let g = &self.grams[blk.group];
                let w0 = self.load(&blk, self.w0);
                // keep[j*B+b]: survivor; padding lanes keep nothing.
                let mut keep = vec![false; d * B];
                for (b, &r) in blk.rows.iter().enumerate() {
                    for j in 0..d {
                        keep[j * B + b] = !mask[self.rows.index(r, j)];
                    }
                }
                // rhs = (G v)_S with v = w0 on the pruned positions (damping adds nothing on S).
                let v: Vec<f64> = w0
                    .iter()
                    .zip(&keep)
                    .map(|(&x, &k)| if k { 0.0 } else { x })
                    .collect();
                let mut rhs = vec![0.0; d * B];
                gemm_b(g, d, &v, &mut rhs);
                for (r, &k) in rhs.iter_mut().zip(&keep) {
                    if !k {
                        *r = 0.0;
                    }
                }
                let x = cg(g, d, &keep, &rhs);
                let w: Vec<f64> = (0..d * B)
                    .map(|k| if keep[k] { w0[k] + x[k] } else { 0.0 })
                    .collect();
                (blk, w)
            })
            .collect();
        let mut out = vec![0.0f32; self.w0.len()];
        for (blk, w) in results {
            for (b, &r) in blk.rows.iter().enumerate() {
                for j in 0..d {
                    let idx = self.rows.index(r, j);
                    if mask[idx] {
                        continue;
                    }
                    let mut v = w[j * B + b] as f32;
                    if !v.is_finite() {
                        v = self.w0[idx];
                    }
                    if v == 0.0 {
                        v = f32::MIN_POSITIVE.copysign(self.w0[idx]);
                    }
                    out[idx] = v;
                }
            }
        }
        out
    }

    /// sum_rows (w - w0)^T G (w - w0) / sum_rows w0^T G w0, G undamped.
    pub fn output_error(&self, w: &[f32]) -> f64 {
        let all: Vec<usize> = (0..self.rows.count).collect();
        let d = self.d;
        let (num, den) = self
            .blocks(&all)
            .into_par_iter()
            .map(|blk| {
                let g = &self.grams[blk.group];
                let w0 = self.load(&blk, self.w0);
                let w1 = self.load(&blk, w);
                let delta: Vec<f64> = w1.iter().zip(&w0).map(|(a, b)| a - b).collect();
                let mut y = vec![0.0; d * B];
                gemm_b(g, d, &delta, &mut y);
                let num: f64 = y.iter().zip(&delta).map(|(a, b)| a * b).sum();
                gemm_b(g, d, &w0, &mut y);
                let den: f64 = y.iter().zip(&w0).map(|(a, b)| a * b).sum();
                (num, den)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    }
}

/// Jacobi-preconditioned CG, B independent systems in lockstep: (G + DAMP I)_SS x = rhs
/// on each lane's set S (`keep`), x = 0 outside S.
fn cg(g: &[f64], d: usize, keep: &[bool], rhs: &[f64]) -> Vec<f64> {
    let diag: Vec<f64> = (0..d * B)
        .map(|k| {
            if keep[k] {
                g[(k / B) * d + k / B] + DAMP
            } else {
                1.0
            }
        })
        .collect();
    let mut x = vec![0.0; d * B];
    let mut r = rhs.to_vec();
    let mut z: Vec<f64> = r.iter().zip(&diag).map(|(a, b)| a / b).collect();
    let mut p = z.clone();
    let mut q = vec![0.0; d * B];
    let lane = |v: &[f64], w: &[f64]| -> [f64; B] {
        let mut s = [0.0; B];
        for (a, b) in v.chunks_exact(B).zip(w.chunks_exact(B)) {
            for l in 0..B {
                s[l] += a[l] * b[l];
            }
        }
        s
    };
    let mut rz = lane(&r, &z);
    let bnorm = lane(rhs, rhs);
    let mut done = [false; B];
    for l in 0..B {
        done[l] = bnorm[l] == 0.0;
    }
    for _ in 0..CG_ITERS {
        if done.iter().all(|x| *x) {
            break;
        }
        gemm_b(g, d, &p, &mut q);
        for k in 0..d * B {
            q[k] = if keep[k] { q[k] + DAMP * p[k] } else { 0.0 };
        }
        let pq = lane(&p, &q);
        let mut alpha = [0.0; B];
        for l in 0..B {
            if !done[l] && pq[l] > 0.0 {
                alpha[l] = rz[l] / pq[l];
            }
        }
        for k in 0..d * B {
            let l = k % B;
            x[k] += alpha[l] * p[k];
            r[k] -= alpha[l] * q[k];
        }
        let rr = lane(&r, &r);
        for l in 0..B {
            if rr[l] <= CG_TOL * CG_TOL * bnorm[l] || pq[l] <= 0.0 {
                done[l] = true;
            }
        }
        for k in 0..d * B {
            z[k] = r[k] / diag[k];
        }
        let rz_new = lane(&r, &z);
        for k in 0..d * B {
            let l = k % B;
            let beta = if done[l] || rz[l] == 0.0 {
                0.0
            } else {
                rz_new[l] / rz[l]
            };
            p[k] = if done[l] { 0.0 } else { z[k] + beta * p[k] };
        }
        rz = rz_new;
    }
    x
}
