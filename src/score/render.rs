//! Renderings of a [`Report`]: the terminal table, JSON, and Markdown for a
//! submission README.

use std::fmt::Write as _;

use super::{Layer, Report};

/// A shape as text tables print it: "32x3x3x3".
pub fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    parts.join("x")
}

/// The width of a table's name column: the longest name, within [4, max].
pub fn name_width<'a>(names: impl Iterator<Item = &'a str>, max: usize) -> usize {
    names.map(str::len).max().unwrap_or(4).clamp(4, max)
}

/// Compact number: 1234567 -> "1.235M".
pub fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.3}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.3}M", x / 1e6)
    } else if a >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else if a == a.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn opt_bits(b: Option<u32>) -> String {
    b.map(|b| b.to_string()).unwrap_or_else(|| "-".into())
}

fn sparsity(l: &Layer) -> String {
    l.sparsity
        .map(|s| format!("{:.1}%", 100.0 * s))
        .unwrap_or_else(|| "-".into())
}

/// A layer's descriptive cells, as both renderings print them: op, output shape,
/// weight shape, sparsity, weight bits, activation bits.
fn describe(l: &Layer) -> [String; 6] {
    [
        l.op_type.clone(),
        fmt_shape(&l.output_shape),
        l.weight_shape
            .as_deref()
            .map(fmt_shape)
            .unwrap_or_else(|| "-".into()),
        sparsity(l),
        opt_bits(l.weight_bits),
        l.act_bits.to_string(),
    ]
}

impl Report {
    /// The terminal table: one row per counted node, then totals and the score.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        if let Some(m) = &self.model {
            let _ = writeln!(w, "{m}");
        }
        let shapes: Vec<String> = self
            .input_shapes
            .iter()
            .map(|(n, s)| format!("{n} {}", fmt_shape(s)))
            .collect();
        let _ = writeln!(
            w,
            "track {:?} (baseline {} params, {} ops), input {}",
            self.track,
            si(self.baseline.params),
            si(self.baseline.ops),
            shapes.join(", ")
        );
        if let Some(why) = &self.options.track_inferred {
            let _ = writeln!(w, "      inferred from the model: {why}; --track to choose");
        }
        let _ = writeln!(
            w,
            "precision: {}",
            if self.freebie_applied {
                "unquantized; 16-bit freebie applied (params and multiplies at 16 bits, adds at 32)"
            } else if self.quantized {
                "quantized (no freebie): each value counts the bits the file stores"
            } else {
                "unquantized, freebie off: 32-bit"
            }
        );
        let name_w = name_width(self.layers.iter().map(|l| l.name.as_str()), 36);
        let _ = writeln!(
            w,
            "\n{:<name_w$} {:<18} {:<14} {:<14} {:>6} {:>4} {:>4} {:>10} {:>10} {:>10}",
            "layer", "op", "output", "weight", "sparse", "wb", "ab", "params", "mults", "adds"
        );
        for l in &self.layers {
            // Long exporter names keep their distinctive tail.
            let chars: Vec<char> = l.name.chars().collect();
            let name = if chars.len() > name_w {
                format!(
                    "…{}",
                    chars[chars.len() - (name_w - 1)..]
                        .iter()
                        .collect::<String>()
                )
            } else {
                l.name.clone()
            };
            let [op, out, wshape, sp, wb, ab] = describe(l);
            let _ = writeln!(
                w,
                "{name:<name_w$} {op:<18} {out:<14} {wshape:<14} {sp:>6} {wb:>4} {ab:>4} {:>10} {:>10} {:>10}",
                si(l.params),
                si(l.mults),
                si(l.adds)
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            w,
            "\ntotal: params {} (32-bit units), mults {} + adds {} = ops {} (32-bit units)",
            si(t.params),
            si(t.mults),
            si(t.adds),
            si(t.ops)
        );
        let _ = writeln!(
            w,
            "       raw: {} multiplies, {} adds",
            si(t.raw_mults),
            si(t.raw_adds)
        );
        let _ = writeln!(
            w,
            "score = {} / {} + {} / {} = {:.4} + {:.4} = {:.4}",
            si(t.params),
            si(self.baseline.params),
            si(t.ops),
            si(self.baseline.ops),
            self.score_params,
            self.score_ops,
            self.score
        );
        w.push_str(&self.disk.to_text());
        if !self.uncounted.is_empty() {
            let _ = writeln!(
                w,
                "\nnot counted (unknown to the table; --strict makes this an error):"
            );
            for u in &self.uncounted {
                let _ = writeln!(
                    w,
                    "  {} ({}), {} output elements",
                    u.name, u.op_type, u.output_elements
                );
            }
        }
        s
    }

    /// Markdown for a submission README.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let t = &self.totals;
        let _ = writeln!(
            w,
            "| | count (32-bit units) | baseline | ratio |\n|---|---:|---:|---:|"
        );
        let _ = writeln!(
            w,
            "| parameter storage | {:.0} | {:.0} | {:.4} |",
            t.params, self.baseline.params, self.score_params
        );
        let _ = writeln!(
            w,
            "| math operations | {:.0} | {:.0} | {:.4} |",
            t.ops, self.baseline.ops, self.score_ops
        );
        let _ = writeln!(w, "| **score** | | | **{:.4}** |\n", self.score);
        let _ = writeln!(
            w,
            "| layer | op | output | weight | sparsity | w bits | a bits | params | mults | adds |"
        );
        let _ = writeln!(w, "|---|---|---|---|---:|---:|---:|---:|---:|---:|");
        for l in &self.layers {
            let [op, out, wshape, sp, wb, ab] = describe(l);
            let _ = writeln!(
                w,
                "| {} | {op} | {out} | {wshape} | {sp} | {wb} | {ab} | {:.1} | {:.0} | {:.0} |",
                l.name, l.params, l.mults, l.adds
            );
        }
        s
    }
}
