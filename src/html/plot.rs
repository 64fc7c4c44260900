//! The report's plots, drawn by `plotters` into SVG strings (no fonts, no
//! JavaScript: the text is SVG `<text>` in the browser's sans-serif).
//!
//! Every function returns one `<svg>` element; its inputs are plain rows so the
//! plots do not depend on where the figures came from.

use std::error::Error as StdError;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Colours (matplotlib's tab10, which readers of ML papers know).
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREY: RGBColor = RGBColor(160, 160, 160);

type Drawn = std::result::Result<(), Box<dyn StdError>>;

/// Runs `draw` on an SVG canvas of `size` pixels and returns the SVG text.
fn svg(name: &str, draw: impl FnOnce(&mut String) -> Drawn) -> Result<String> {
    let mut s = String::new();
    draw(&mut s).map_err(|e| Error::Usage(format!("html report: plot '{name}': {e}")))?;
    // Named for the page's readers and its render test.
    Ok(s.replacen(
        "<svg ",
        &format!("<svg role=\"img\" data-plot=\"{name}\" "),
        1,
    ))
}

/// The legend every chart draws: at `pos`, on a translucent white box with a
/// grey border; `small` for the histograms' small multiples.
fn legend<'a, 'b: 'a, CT: plotters::coord::CoordTranslate>(
    c: &mut ChartContext<'a, SVGBackend<'b>, CT>,
    pos: SeriesLabelPosition,
    small: bool,
) -> Drawn {
    let mut l = c.configure_series_labels();
    l.position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(GREY);
    if small {
        l.label_font(("sans-serif", 10));
    }
    l.draw()?;
    Ok(())
}

/// Shortens a layer name for an axis or caption: the last `max` characters.
pub fn short(name: &str, max: usize) -> String {
    let n = name.chars().count();
    if n <= max {
        name.to_string()
    } else {
        let tail: String = name.chars().skip(n - max + 1).collect();
        format!("…{tail}")
    }
}

/// One bar of [`score_split`]: a layer's share of the score.
#[derive(Debug, Clone)]
pub struct ScoreBar {
    pub label: String,
    /// params / baseline params (score units).
    pub params: f64,
    /// ops / baseline ops (score units).
    pub ops: f64,
    /// The same layer's total share before compression, when it existed.
    pub before: Option<f64>,
}

/// The score's split per layer: stacked bars, parameter share (blue) under
/// operation share (orange), in score units (the bars sum to the score); the
/// share before compression as a black outline. x: the layer's index in the
/// table below the plot.
pub fn score_split(bars: &[ScoreBar]) -> Result<String> {
    let n = bars.len().max(1);
    let width = (110 + 9 * n as u32).clamp(640, 1400);
    let size = (width, 340);
    let top = bars
        .iter()
        .map(|b| (b.params + b.ops).max(b.before.unwrap_or(0.0)))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.08;
    svg("score-split", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(
                "score per layer (parameters + operations)",
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_desc("layer (index in the table)")
            .y_desc("score units")
            .x_label_formatter(&|x| format!("{}", *x as usize))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()?;
        let x = |i: usize| (i as f64 + 0.12, i as f64 + 0.88);
        c.draw_series(bars.iter().enumerate().map(|(i, b)| {
            let (x0, x1) = x(i);
            Rectangle::new([(x0, 0.0), (x1, b.params)], BLUE.filled())
        }))?
        .label("parameters")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        c.draw_series(bars.iter().enumerate().map(|(i, b)| {
            let (x0, x1) = x(i);
            Rectangle::new([(x0, b.params), (x1, b.params + b.ops)], ORANGE.filled())
        }))?
        .label("operations")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], ORANGE.filled()));
        if bars.iter().any(|b| b.before.is_some()) {
            c.draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
                let (x0, x1) = x(i);
                b.before
                    .map(|t| Rectangle::new([(x0, 0.0), (x1, t)], BLACK.stroke_width(1)))
            }))?
            .label("before")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLACK.stroke_width(1)));
        }
        legend(&mut c, SeriesLabelPosition::UpperRight, false)?;
        root.present()?;
        Ok(())
    })
}

/// One layer of [`bits_sparsity`].
#[derive(Debug, Clone)]
pub struct LayerBits {
    pub weight_bits: Option<u32>,
    pub act_bits: u32,
    /// Exact zeros / elements, in [0, 1].
    pub sparsity: Option<f64>,
}

/// Each weighted layer's weight bits (bars) and input-activation bits (red
/// dots) above, its weight sparsity in percent below. x: the layer's index in
/// the table.
pub fn bits_sparsity(layers: &[LayerBits]) -> Result<String> {
    let n = layers.len().max(1);
    let width = (110 + 9 * n as u32).clamp(640, 1400);
    let size = (width, 420);
    svg("bits-sparsity", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let (upper, lower) = root.split_vertically(230);
        let mut c = ChartBuilder::on(&upper)
            .caption("bits per layer", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(20)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..34f64)?;
        c.configure_mesh()
            .disable_x_mesh()
            .y_desc("bits")
            .x_label_formatter(&|x| format!("{}", *x as usize))
            .draw()?;
        c.draw_series(layers.iter().enumerate().filter_map(|(i, l)| {
            l.weight_bits.map(|b| {
                Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, b as f64)],
                    BLUE.filled(),
                )
            })
        }))?
        .label("weight bits")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        c.draw_series(
            layers
                .iter()
                .enumerate()
                .map(|(i, l)| Circle::new((i as f64 + 0.5, l.act_bits as f64), 3, RED.filled())),
        )?
        .label("input activation bits")
        .legend(|(x, y)| Circle::new((x + 6, y), 3, RED.filled()));
        legend(&mut c, SeriesLabelPosition::UpperRight, false)?;
        let mut c = ChartBuilder::on(&lower)
            .caption("weight sparsity", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..100f64)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_desc("layer (index in the table)")
            .y_desc("% zeros")
            .x_label_formatter(&|x| format!("{}", *x as usize))
            .draw()?;
        c.draw_series(layers.iter().enumerate().filter_map(|(i, l)| {
            l.sparsity.map(|sp| {
                Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, 100.0 * sp)],
                    GREEN.filled(),
                )
            })
        }))?;
        root.present()?;
        Ok(())
    })
}

/// Counts of `values` in `bins` equal bins over [lo, hi] (the top edge inclusive).
pub fn histogram(values: &[f32], lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    let mut h = vec![0u64; bins];
    let w = (hi - lo) / bins as f64;
    for &v in values {
        let v = v as f64;
        if !(lo..=hi).contains(&v) || w <= 0.0 {
            continue;
        }
        let i = (((v - lo) / w) as usize).min(bins - 1);
        h[i] += 1;
    }
    h
}

/// One layer's weights for [`weight_histogram`].
#[derive(Debug, Clone)]
pub struct WeightHist<'a> {
    pub title: String,
    /// The float weights the compression started from, if known.
    pub before: Option<&'a [f32]>,
    /// The values the runtime multiplies with.
    pub after: &'a [f32],
    /// Representable values to overlay (seed 004's quant-plot): the grid of one
    /// channel, or of the tensor.
    pub grid: &'a [f32],
}

/// Bins of the weight histograms.
pub const HIST_BINS: usize = 80;
/// Above this many levels in view the grid is drawn as ticks under the axis
/// instead of lines through the plot.
const GRID_LINES: usize = 64;

/// Histogram of a layer's weights before (grey bars) and after (blue outline)
/// compression, counts on a log scale, with the quantization grid overlaid
/// (orange lines, or ticks at the bottom when the grid is dense).
pub fn weight_histogram(h: &WeightHist) -> Result<String> {
    let size = (400, 230);
    let all = h.before.unwrap_or(&[]).iter().chain(h.after);
    let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
        (a.min(v as f64), b.max(v as f64))
    });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (-1.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let before = h.before.map(|b| histogram(b, lo, hi, HIST_BINS));
    let after = histogram(h.after, lo, hi, HIST_BINS);
    let top = before
        .iter()
        .flatten()
        .chain(&after)
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 2.0;
    let w = (hi - lo) / HIST_BINS as f64;
    let grid: Vec<f64> = h
        .grid
        .iter()
        .map(|&g| g as f64)
        .filter(|g| (lo..=hi).contains(g))
        .collect();
    svg("weight-histogram", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(&h.title, ("sans-serif", 12))
            .margin(6)
            .x_label_area_size(26)
            .y_label_area_size(46)
            .build_cartesian_2d(lo..hi, (0.8f64..top).log_scale())?;
        c.configure_mesh()
            .disable_x_mesh()
            .y_desc("count")
            .x_labels(5)
            .y_labels(4)
            .x_label_formatter(&|x| format!("{x:.2}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        if let Some(b) = &before {
            c.draw_series(b.iter().enumerate().filter(|(_, &k)| k > 0).map(|(i, &k)| {
                let x0 = lo + i as f64 * w;
                Rectangle::new([(x0, 0.8), (x0 + w, k as f64)], GREY.mix(0.6).filled())
            }))?
            .label("before")
            .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 10, y + 4)], GREY.filled()));
        }
        if grid.len() <= GRID_LINES {
            c.draw_series(grid.iter().map(|&g| {
                PathElement::new(vec![(g, 0.8), (g, top)], ORANGE.mix(0.7).stroke_width(1))
            }))?
            .label("grid")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], ORANGE));
        } else {
            c.draw_series(
                grid.iter()
                    .map(|&g| PathElement::new(vec![(g, 0.8), (g, 1.3)], ORANGE.stroke_width(1))),
            )?
            .label(format!("grid ({} levels)", grid.len()))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], ORANGE));
        }
        c.draw_series(
            after
                .iter()
                .enumerate()
                .filter(|(_, &k)| k > 0)
                .map(|(i, &k)| {
                    let x0 = lo + i as f64 * w;
                    Rectangle::new([(x0, 0.8), (x0 + w, k as f64)], BLUE.stroke_width(1))
                }),
        )?
        .label("after")
        .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 10, y + 4)], BLUE.stroke_width(1)));
        legend(&mut c, SeriesLabelPosition::UpperRight, true)?;
        root.present()?;
        Ok(())
    })
}

/// One activation quantizer for [`activation_ranges`].
#[derive(Debug, Clone)]
pub struct ActRow {
    /// Smallest and largest value seen on the calibration images.
    pub seen: (f64, f64),
    /// The grid's representable range [lowest level, highest level] x scale.
    pub grid: (f64, f64),
}

/// Each quantized activation (one row, index as in the table): the range the
/// calibration images produced (grey line) and the range the grid represents
/// (blue bar); values outside the bar are clipped.
pub fn activation_ranges(rows: &[ActRow]) -> Result<String> {
    let n = rows.len().max(1);
    let size = (760, (70 + 11 * n as u32).clamp(200, 2400));
    let (mut lo, mut hi) = rows.iter().fold((0.0f64, 0.0f64), |(a, b), r| {
        (a.min(r.seen.0).min(r.grid.0), b.max(r.seen.1).max(r.grid.1))
    });
    if hi - lo < 1e-12 {
        (lo, hi) = (-1.0, 1.0);
    }
    let pad = 0.03 * (hi - lo);
    svg("activation-ranges", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption("activation ranges: calibration vs grid", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(40)
            .build_cartesian_2d(lo - pad..hi + pad, (n as f64)..0f64)?;
        c.configure_mesh()
            .disable_y_mesh()
            .x_desc("value")
            .y_desc("activation (index in the table)")
            .y_label_formatter(&|y| format!("{}", *y as usize))
            .draw()?;
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = i as f64 + 0.5;
            Rectangle::new(
                [(r.grid.0, y - 0.4), (r.grid.1, y + 0.4)],
                BLUE.mix(0.55).filled(),
            )
        }))?
        .label("grid range")
        .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], BLUE.mix(0.55).filled()));
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = i as f64 + 0.5;
            PathElement::new(vec![(r.seen.0, y), (r.seen.1, y)], BLACK.stroke_width(1))
        }))?
        .label("seen on calibration")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK));
        legend(&mut c, SeriesLabelPosition::LowerRight, false)?;
        root.present()?;
        Ok(())
    })
}

/// One layer of [`layer_errors`]: relative output errors on the calibration rows.
#[derive(Debug, Clone)]
pub struct ErrRow {
    pub nearest: f64,
    pub after: f64,
}

/// Per-layer relative output error ||X(W' - W)||² / ||XW||² on the calibration
/// rows, in percent on a log scale: the plain method (grey) beside the method
/// the pass used (blue). x: the row's index in the table.
pub fn layer_errors(title: &str, method: &str, rows: &[ErrRow]) -> Result<String> {
    let n = rows.len().max(1);
    let width = (110 + 12 * n as u32).clamp(640, 1400);
    let size = (width, 320);
    let vals = || rows.iter().flat_map(|r| [r.nearest, r.after]);
    let min = vals().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let max = vals().fold(0.0f64, f64::max);
    let (lo, hi) = if min.is_finite() && max > 0.0 {
        (100.0 * min / 2.0, 100.0 * max * 2.0)
    } else {
        (1e-6, 1.0)
    };
    svg("layer-errors", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_desc("layer (index in the table)")
            .y_desc("relative output error, %")
            .y_labels(6)
            .x_label_formatter(&|x| format!("{}", *x as usize))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()?;
        let bar = |i: usize, left: bool, v: f64| {
            let x0 = i as f64 + if left { 0.1 } else { 0.5 };
            (x0, x0 + 0.4, (100.0 * v).max(lo))
        };
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let (x0, x1, y) = bar(i, true, r.nearest);
            Rectangle::new([(x0, lo), (x1, y)], GREY.filled())
        }))?
        .label("round to nearest / plain cut")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], GREY.filled()));
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let (x0, x1, y) = bar(i, false, r.after);
            Rectangle::new([(x0, lo), (x1, y)], BLUE.filled())
        }))?
        .label(method.to_string())
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        legend(&mut c, SeriesLabelPosition::UpperRight, false)?;
        root.present()?;
        Ok(())
    })
}

/// One figure of [`intervals`]: a proportion with its 95% interval.
#[derive(Debug, Clone)]
pub struct Interval {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Proportions (top-1, agreement) as horizontal bars in percent, each with its
/// Wilson 95% interval as a whisker.
pub fn intervals(rows: &[Interval]) -> Result<String> {
    let n = rows.len().max(1);
    let size = (760, 90 + 46 * n as u32);
    svg("accuracy", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption("accuracy with Wilson 95% intervals", ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..100f64, (n as f64)..0f64)?;
        c.configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("%")
            .draw()?;
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = i as f64 + 0.5;
            Rectangle::new(
                [(0.0, y - 0.15), (100.0 * r.value, y + 0.35)],
                BLUE.mix(0.6).filled(),
            )
        }))?;
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = i as f64 + 0.5;
            PathElement::new(
                vec![(100.0 * r.lo, y + 0.1), (100.0 * r.hi, y + 0.1)],
                BLACK.stroke_width(2),
            )
        }))?;
        c.draw_series(rows.iter().enumerate().map(|(i, r)| {
            Text::new(
                format!(
                    "{}: {:.1}% [{:.1}, {:.1}]",
                    r.label,
                    100.0 * r.value,
                    100.0 * r.lo,
                    100.0 * r.hi
                ),
                (1.0, i as f64 + 0.02),
                ("sans-serif", 13),
            )
        }))?;
        root.present()?;
        Ok(())
    })
}

/// One plan of [`pareto`].
#[derive(Debug, Clone)]
pub struct PlanPoint {
    pub score: f64,
    /// Top-1 agreement with the original, in [0, 1].
    pub agreement: f64,
    pub passed: bool,
    pub chosen: bool,
}

/// The search's plans: MicroNet score against top-1 agreement, the plans that
/// passed the gate in blue, those that failed in grey, the chosen one as a red
/// ring; the Pareto front (no other plan both smaller and more accurate) joined.
pub fn pareto(points: &[PlanPoint]) -> Result<String> {
    let size = (640, 360);
    let (mut x0, mut x1) = points.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.score), b.max(p.score))
    });
    if !x0.is_finite() || x1 - x0 < 1e-9 {
        (x0, x1) = (x0.min(x1) * 0.9, x1 * 1.1 + 1e-9);
    }
    let pad = 0.08 * (x1 - x0);
    // Enough decimals to tell the ticks apart: two below the span's magnitude.
    let digits = ((-(x1 - x0 + 2.0 * pad).log10()).ceil() as i64 + 1).clamp(2, 8) as usize;
    let y0 = points.iter().map(|p| p.agreement).fold(1.0f64, f64::min);
    let y0 = (100.0 * y0 - 5.0).max(0.0);
    let mut front: Vec<&PlanPoint> = points
        .iter()
        .filter(|p| {
            !points.iter().any(|q| {
                q.score <= p.score && q.agreement > p.agreement
                    || q.score < p.score && q.agreement >= p.agreement
            })
        })
        .collect();
    front.sort_by(|a, b| a.score.total_cmp(&b.score));
    svg("pareto", |s| {
        let root = SVGBackend::with_string(s, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption(
                "plans searched: score against agreement",
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(50)
            .build_cartesian_2d(x0 - pad..x1 + pad, y0..100.0)?;
        c.configure_mesh()
            .x_desc("MicroNet score")
            .y_desc("top-1 agreement, %")
            .x_labels(6)
            .x_label_formatter(&|x| format!("{x:.digits$}"))
            .draw()?;
        c.draw_series(LineSeries::new(
            front.iter().map(|p| (p.score, 100.0 * p.agreement)),
            BLUE.mix(0.5),
        ))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLUE.mix(0.5)));
        c.draw_series(points.iter().map(|p| {
            let colour = if p.passed { BLUE } else { GREY };
            Circle::new((p.score, 100.0 * p.agreement), 5, colour.filled())
        }))?
        .label("plan (grey: failed the gate)")
        .legend(|(x, y)| Circle::new((x + 6, y), 4, BLUE.filled()));
        c.draw_series(
            points
                .iter()
                .filter(|p| p.chosen)
                .map(|p| Circle::new((p.score, 100.0 * p.agreement), 9, RED.stroke_width(2))),
        )?
        .label("chosen")
        .legend(|(x, y)| Circle::new((x + 6, y), 5, RED.stroke_width(2)));
        legend(&mut c, SeriesLabelPosition::LowerRight, false)?;
        root.present()?;
        Ok(())
    })
}
