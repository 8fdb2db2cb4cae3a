//! Plots of the report commands (`bench dense`, `eval sweep`, `report memory`), written with
//! plotters as `<out>.svg` and `<out>.png` beside their JSON and markdown.
//!
//! One function per chart kind takes plain data ([`BenchPlot`], [`SweepPlot`], [`MemoryPlot`])
//! and lays it out as a [`Figure`] (panels of line series with optional min/max error bars,
//! dashed reference lines), which one renderer draws on both backends. Text is laid out and
//! (for the PNG) rasterised with DejaVu Sans, embedded in the binary, so no system font is
//! needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu.txt).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Line colours (matplotlib's tab10).
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Pixel size of both images.
pub const SIZE: (u32, u32) = (1000, 600);

/// One measured point: `y` with an optional `[lo, hi]` range drawn as an error bar.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub range: Option<(f64, f64)>,
}

impl Point {
    pub fn new(x: f64, y: f64) -> Point {
        Point { x, y, range: None }
    }
    pub fn with_range(x: f64, y: f64, lo: f64, hi: f64) -> Point {
        Point {
            x,
            y,
            range: Some((lo, hi)),
        }
    }
}

/// A labelled line; `dashed` for bounds and references rather than measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
    pub dashed: bool,
}

/// How x values are placed and labelled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum XAxis {
    /// Token counts on a log2 axis, labelled `512`, `4k`, `128k`.
    Tokens,
    /// Fractions on a log2 axis, labelled `1/4`, `1/32`.
    Fraction,
}

/// One chart: series over a shared x axis, and horizontal reference lines.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    pub series: Vec<Series>,
    /// Horizontal dashed lines across the whole panel: (label, y).
    pub hlines: Vec<(String, f64)>,
}

/// Panels side by side under one title, and a footnote (what reproduces it).
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub title: String,
    pub footnote: String,
    pub panels: Vec<Panel>,
}

/// One context length of a bench: tokens/s or ms per step, median and [min, max].
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPoint {
    pub context: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// A measured quantity of a bench against context length, with an optional lower bound
/// (the memory-bandwidth floor of a decode step) per context.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchMetric {
    /// Panel title, e.g. "decode".
    pub name: String,
    /// Y axis, e.g. "tokens/s" or "ms per step".
    pub unit: String,
    pub points: Vec<BenchPoint>,
    /// (context, value) of the floor line.
    pub floor: Vec<(usize, f64)>,
}

/// `bench dense`: one panel per metric.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchPlot {
    pub title: String,
    pub footnote: String,
    pub metrics: Vec<BenchMetric>,
}

/// One sparse run of `eval sweep`.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    /// The budget as a fraction of the visible tokens (`1/N` -> 1/N; a fixed K -> K / tokens).
    pub budget: f64,
    pub channels: usize,
    /// "16" or "4".
    pub bits: String,
    pub ppl: f64,
}

/// `eval sweep`: perplexity against budget, a line per (channels, bits), dense as a reference.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPlot {
    pub title: String,
    pub footnote: String,
    pub dense_ppl: f64,
    pub points: Vec<SweepPoint>,
}

/// One context of `report memory`: bytes per footprint line ("rows (host)", ...) and the full
/// dense KV those positions stand for.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPoint {
    pub context: usize,
    pub lines: Vec<(String, usize)>,
    pub full_kv: usize,
}

/// `report memory`: footprint per item against context, the total, and the full dense KV.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlot {
    pub title: String,
    pub footnote: String,
    pub points: Vec<MemoryPoint>,
}

/// Error of a plot: which file, and why.
#[derive(Debug, thiserror::Error)]
#[error("plotting {}: {msg}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub msg: String,
}

/// `base.svg` and `base.png` (a `.svg` or `.png` already on `base` is dropped first; any
/// other dot in the name stays).
pub fn outputs(base: &Path) -> (PathBuf, PathBuf) {
    let base = match base.extension().and_then(|e| e.to_str()) {
        Some("svg" | "png") => base.with_extension(""),
        _ => base.to_path_buf(),
    };
    let with = |ext: &str| {
        let mut s = base.clone().into_os_string();
        s.push(".");
        s.push(ext);
        PathBuf::from(s)
    };
    (with("svg"), with("png"))
}

/// Writes the bench figure to `base.svg` and `base.png`; returns the two paths.
pub fn bench_chart(data: &BenchPlot, base: &Path) -> Result<Vec<PathBuf>, PlotError> {
    render(&bench_figure(data), base)
}

/// Writes the sweep figure to `base.svg` and `base.png`; returns the two paths.
pub fn sweep_chart(data: &SweepPlot, base: &Path) -> Result<Vec<PathBuf>, PlotError> {
    render(&sweep_figure(data), base)
}

/// Writes the memory figure to `base.svg` and `base.png`; returns the two paths.
pub fn memory_chart(data: &MemoryPlot, base: &Path) -> Result<Vec<PathBuf>, PlotError> {
    render(&memory_figure(data), base)
}

/// Prints the files a chart was written to (one line on stderr).
pub fn announce(files: &[PathBuf]) {
    eprintln!(
        "plot: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

pub fn bench_figure(data: &BenchPlot) -> Figure {
    let panels = data
        .metrics
        .iter()
        .map(|m| {
            let mut series = vec![Series {
                label: format!("{} (median, min-max)", m.name),
                points: m
                    .points
                    .iter()
                    .map(|p| Point::with_range(p.context as f64, p.median, p.min, p.max))
                    .collect(),
                dashed: false,
            }];
            if !m.floor.is_empty() {
                series.push(Series {
                    label: "memory-bandwidth floor".into(),
                    points: m
                        .floor
                        .iter()
                        .map(|&(c, v)| Point::new(c as f64, v))
                        .collect(),
                    dashed: true,
                });
            }
            Panel {
                title: m.name.clone(),
                x_label: "context (tokens)".into(),
                y_label: m.unit.clone(),
                x_axis: XAxis::Tokens,
                series,
                hlines: Vec::new(),
            }
        })
        .collect();
    Figure {
        title: data.title.clone(),
        footnote: data.footnote.clone(),
        panels,
    }
}

pub fn sweep_figure(data: &SweepPlot) -> Figure {
    let mut keys: Vec<(usize, String)> = Vec::new();
    for p in &data.points {
        let k = (p.channels, p.bits.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let series = keys
        .into_iter()
        .map(|(ch, bits)| {
            let mut points: Vec<Point> = data
                .points
                .iter()
                .filter(|p| p.channels == ch && p.bits == bits)
                .map(|p| Point::new(p.budget, p.ppl))
                .collect();
            points.sort_by(|a, b| a.x.total_cmp(&b.x));
            Series {
                label: format!("{ch} channels, {bits}-bit labels"),
                points,
                dashed: false,
            }
        })
        .collect();
    Figure {
        title: data.title.clone(),
        footnote: data.footnote.clone(),
        panels: vec![Panel {
            title: "perplexity vs token budget".into(),
            x_label: "token budget (fraction of the visible tokens)".into(),
            y_label: "perplexity".into(),
            x_axis: XAxis::Fraction,
            series,
            hlines: vec![(format!("dense {:.3}", data.dense_ppl), data.dense_ppl)],
        }],
    }
}

pub fn memory_figure(data: &MemoryPlot) -> Figure {
    let mut points = data.points.clone();
    points.sort_by_key(|p| p.context);
    let top = points
        .iter()
        .flat_map(|p| {
            p.lines
                .iter()
                .map(|l| l.1)
                .chain([p.full_kv, p.lines.iter().map(|l| l.1).sum()])
        })
        .max()
        .unwrap_or(0);
    let (unit, scale) = if top >= 1 << 30 {
        ("GiB", (1u64 << 30) as f64)
    } else {
        ("MiB", (1u64 << 20) as f64)
    };
    let line = |label: String, dashed: bool, value: &dyn Fn(&MemoryPoint) -> usize| Series {
        label,
        points: points
            .iter()
            .map(|p| Point::new(p.context as f64, value(p) as f64 / scale))
            .collect(),
        dashed,
    };
    let mut labels: Vec<&String> = Vec::new();
    for l in points.iter().flat_map(|p| &p.lines) {
        if !labels.contains(&&l.0) {
            labels.push(&l.0);
        }
    }
    let mut series: Vec<Series> = labels
        .into_iter()
        .map(|name| {
            line(name.clone(), false, &|p| {
                p.lines.iter().filter(|l| &l.0 == name).map(|l| l.1).sum()
            })
        })
        .collect();
    series.push(line("total".into(), false, &|p| {
        p.lines.iter().map(|l| l.1).sum()
    }));
    series.push(line("full dense KV".into(), true, &|p| p.full_kv));
    Figure {
        title: data.title.clone(),
        footnote: data.footnote.clone(),
        panels: vec![Panel {
            title: "memory footprint per tier".into(),
            x_label: "context (tokens)".into(),
            y_label: unit.into(),
            x_axis: XAxis::Tokens,
            series,
            hlines: Vec::new(),
        }],
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is valid; a failure would show as missing text, not a crash.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Draws `fig` into `base.svg` and `base.png`.
pub fn render(fig: &Figure, base: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let (svg, png) = outputs(base);
    if let Some(dir) = base.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PlotError {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        })?;
    }
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), fig).map_err(|msg| PlotError {
        path: svg.clone(),
        msg,
    })?;
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), fig).map_err(|msg| PlotError {
        path: png.clone(),
        msg,
    })?;
    Ok(vec![svg, png])
}

/// `4096` -> "4k", `1536` -> "1.5k", `512` -> "512".
fn tokens_label(n: f64) -> String {
    if n >= 1024.0 {
        let k = n / 1024.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round())
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{}", n.round())
    }
}

/// `0.25` -> "1/4"; otherwise two significant decimals.
fn fraction_label(f: f64) -> String {
    let n = 1.0 / f;
    if f > 0.0 && f < 1.0 && (n - n.round()).abs() < 1e-6 {
        format!("1/{}", n.round())
    } else {
        format!("{f:.2}")
    }
}

fn x_label(axis: XAxis, log2x: f64) -> String {
    let v = 2f64.powf(log2x);
    match axis {
        XAxis::Tokens => tokens_label(v),
        XAxis::Fraction => fraction_label(v),
    }
}

/// Tick positions (log2 of x): the measured x values when there are few, else the whole powers
/// of two in `[x0, x1]`, thinned to at most 12.
fn x_ticks(xs: &[f64], x0: f64, x1: f64) -> Vec<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    if !v.is_empty() && v.len() <= 12 {
        return v;
    }
    let (lo, hi) = (x0.ceil() as i64, x1.floor() as i64);
    let step = ((hi - lo + 1) as usize).div_ceil(12).max(1);
    (lo..=hi).step_by(step).map(|i| i as f64).collect()
}

/// `s` cut to `max` characters, with an ellipsis when cut (a footnote wider than the image).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars()
            .take(max - 1)
            .chain(std::iter::once('…'))
            .collect()
    }
}

/// A linear f64 axis with labels exactly at `ticks` (plotters' own choice of round values
/// would land between the powers of two of a log2 axis).
struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (t * (limit.1 - limit.0) as f64).round() as i32
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Finite (min, max) of `v`, widened by 5% of the span (or around a single value).
fn padded(v: impl Iterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return None;
    }
    let span = hi - lo;
    let d = if span > 0.0 {
        span * pad
    } else {
        (hi.abs() * 0.1).max(0.5)
    };
    Some((lo - d, hi + d))
}

/// Upper left when the lines rise to the right (the upper right then holds data), else upper
/// right.
fn legend_corner(p: &Panel) -> SeriesLabelPosition {
    let rise: f64 = p
        .series
        .iter()
        .filter_map(|s| {
            let first = s
                .points
                .iter()
                .filter(|q| q.y.is_finite())
                .min_by(|a, b| a.x.total_cmp(&b.x))?;
            let last = s
                .points
                .iter()
                .filter(|q| q.y.is_finite())
                .max_by(|a, b| a.x.total_cmp(&b.x))?;
            Some(last.y - first.y)
        })
        .sum();
    if rise > 0.0 {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let h = root.dim_in_pixel().1 as i32;
    root.draw(&Text::new(
        clip(&fig.footnote, 150),
        (10, h - 18),
        (FAMILY, 13).into_font().color(&BLACK.mix(0.6)),
    ))
    .map_err(e)?;
    let body = root.margin(0, 24, 0, 0);
    let body = body.titled(&fig.title, (FAMILY, 22)).map_err(e)?;
    let areas = body.split_evenly((1, fig.panels.len().max(1)));
    for (area, p) in areas.iter().zip(&fig.panels) {
        draw_panel(area, p)?;
    }
    root.present().map_err(e)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &Panel) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let lx = |x: f64| x.max(f64::MIN_POSITIVE).log2();
    let xs: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|q| lx(q.x)))
        .collect();
    let (x0, x1) = padded(xs.iter().copied(), 0.08).unwrap_or((0.0, 1.0));
    let ticks = x_ticks(&xs, x0, x1);
    let n_ticks = ticks.len();
    let ys = p
        .series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .flat_map(|q| [Some(q.y), q.range.map(|r| r.0), q.range.map(|r| r.1)])
        })
        .flatten()
        .chain(p.hlines.iter().map(|h| h.1));
    let (y0, y1) = padded(ys, 0.08).unwrap_or((0.0, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 17))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(
            TickedAxis {
                lo: x0,
                hi: x1,
                ticks,
            },
            y0..y1,
        )
        .map_err(e)?;
    let axis = p.x_axis;
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .x_labels(n_ticks.max(1))
        .x_label_formatter(&|x| x_label(axis, *x))
        .x_max_light_lines(0)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(e)?;
    let mut color_idx = 0;
    for s in &p.series {
        let color = if s.dashed {
            RGBColor(90, 90, 90)
        } else {
            color_idx += 1;
            let (r, g, b) = TAB10[(color_idx - 1) % TAB10.len()];
            RGBColor(r, g, b)
        };
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|q| q.y.is_finite())
            .map(|q| (lx(q.x), q.y))
            .collect();
        let style = color.stroke_width(2);
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))
                .map_err(e)?
        } else {
            chart
                .draw_series(LineSeries::new(pts.clone(), style))
                .map_err(e)?
        };
        anno.label(s.label.as_str()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
        });
        if !s.dashed {
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(e)?;
        }
        chart
            .draw_series(s.points.iter().filter_map(|q| {
                let (lo, hi) = q.range?;
                (lo.is_finite() && hi.is_finite())
                    .then(|| ErrorBar::new_vertical(lx(q.x), lo, q.y, hi, color.stroke_width(1), 8))
            }))
            .map_err(e)?;
    }
    for (label, y) in &p.hlines {
        let c = BLACK;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, *y), (x1, *y)],
                8,
                5,
                c.stroke_width(2),
            ))
            .map_err(e)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(legend_corner(p))
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_data() -> BenchPlot {
        let pts = |v: &[(usize, f64)]| {
            v.iter()
                .map(|&(c, m)| BenchPoint {
                    context: c,
                    median: m,
                    min: m * 0.9,
                    max: m * 1.15,
                })
                .collect()
        };
        BenchPlot {
            title: "bench dense: synthetic llama-3.1-8b on cuda:0".into(),
            footnote: "farsight bench dense --shape llama-3.1-8b --context 4k,32k,128k".into(),
            metrics: vec![
                BenchMetric {
                    name: "decode step".into(),
                    unit: "ms per step".into(),
                    points: pts(&[(4096, 6.1), (32768, 7.4), (131072, 11.9)]),
                    floor: vec![(4096, 5.5), (32768, 6.4), (131072, 9.7)],
                },
                BenchMetric {
                    name: "prefill".into(),
                    unit: "tokens/s".into(),
                    points: pts(&[(512, 900.0), (4096, 700.0)]),
                    floor: vec![],
                },
            ],
        }
    }

    fn sweep_data() -> SweepPlot {
        let mut points = Vec::new();
        for (ch, bits, base) in [(8, "16", 0.6), (16, "16", 0.3), (8, "4", 0.9)] {
            for n in [4usize, 8, 16, 32] {
                points.push(SweepPoint {
                    budget: 1.0 / n as f64,
                    channels: ch,
                    bits: bits.into(),
                    ppl: 12.0 + base * n as f64 / 4.0,
                });
            }
        }
        SweepPlot {
            title: "eval sweep: smollm2-135m".into(),
            footnote: "farsight eval sweep ...".into(),
            dense_ppl: 11.8,
            points,
        }
    }

    fn memory_data() -> MemoryPlot {
        let point = |context: usize| MemoryPoint {
            context,
            lines: vec![
                ("weights (host)".into(), 270 << 20),
                ("workspace (host)".into(), 20 << 20),
                ("windows (gpu)".into(), 0),
                ("labels (host)".into(), context * 1440),
                ("rows (host)".into(), context * 5760),
            ],
            full_kv: context * 46080,
        };
        MemoryPlot {
            title: "report memory".into(),
            footnote: "farsight report memory ...".into(),
            points: vec![point(65536), point(4096), point(16384)],
        }
    }

    #[test]
    fn memory_figure_has_a_line_per_item_the_total_and_the_full_kv() {
        let f = memory_figure(&memory_data());
        let p = &f.panels[0];
        let names: Vec<&str> = p.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            names,
            [
                "weights (host)",
                "workspace (host)",
                "windows (gpu)",
                "labels (host)",
                "rows (host)",
                "total",
                "full dense KV"
            ]
        );
        assert_eq!(p.y_label, "GiB");
        let full = &p.series[6];
        assert!(full.dashed && full.points.windows(2).all(|w| w[0].x < w[1].x));
        assert!((full.points[2].y - 65536.0 * 46080.0 / (1u64 << 30) as f64).abs() < 1e-9);
        let total = &p.series[5].points[0];
        assert!(
            (total.y - (290.0 * 1024.0 + 4096.0 * 7200.0 / 1024.0) / (1 << 20) as f64).abs() < 1e-9
        );
    }

    #[test]
    fn memory_chart_writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let files = memory_chart(&memory_data(), &dir.path().join("memory")).unwrap();
        let texts = svg_texts(&std::fs::read_to_string(&files[0]).unwrap());
        for label in ["rows (host)", "full dense KV", "total", "GiB", "4k", "64k"] {
            assert!(
                texts.iter().any(|t| t == label),
                "svg lacks {label:?}: {texts:?}"
            );
        }
        let png = std::fs::read(&files[1]).unwrap();
        assert_eq!(png_size(&png), SIZE);
        assert!(png.len() > 10_000, "png of {} bytes", png.len());
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG magic");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    /// Parses the SVG as XML; returns its text content (labels, ticks, captions).
    fn svg_texts(s: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(s).expect("the SVG is well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert_eq!(
            doc.root_element().attribute("width"),
            Some(SIZE.0.to_string().as_str())
        );
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    #[test]
    fn bench_chart_writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("sub/bench");
        let files = bench_chart(&bench_data(), &base).unwrap();
        assert_eq!(
            files,
            vec![
                dir.path().join("sub/bench.svg"),
                dir.path().join("sub/bench.png")
            ]
        );
        let texts = svg_texts(&std::fs::read_to_string(&files[0]).unwrap());
        for label in [
            "decode step (median, min-max)",
            "memory-bandwidth floor",
            "prefill (median, min-max)",
            "ms per step",
            "tokens/s",
            "128k",
            "4k",
        ] {
            assert!(
                texts.iter().any(|t| t == label),
                "svg lacks {label:?}: {texts:?}"
            );
        }
        let png = std::fs::read(&files[1]).unwrap();
        assert_eq!(png_size(&png), SIZE);
    }

    #[test]
    fn sweep_chart_writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("sweep");
        let files = sweep_chart(&sweep_data(), &base).unwrap();
        let texts = svg_texts(&std::fs::read_to_string(&files[0]).unwrap());
        for label in [
            "8 channels, 16-bit labels",
            "16 channels, 16-bit labels",
            "8 channels, 4-bit labels",
            "dense 11.800",
            "1/4",
            "1/32",
            "perplexity",
        ] {
            assert!(
                texts.iter().any(|t| t == label),
                "svg lacks {label:?}: {texts:?}"
            );
        }
        let png = std::fs::read(&files[1]).unwrap();
        assert_eq!(png_size(&png), SIZE);
        // Not a blank image: the PNG of a drawn chart compresses far worse than a white one.
        assert!(png.len() > 10_000, "png of {} bytes", png.len());
    }

    #[test]
    fn sweep_figure_groups_lines_by_channels_and_bits() {
        let f = sweep_figure(&sweep_data());
        let p = &f.panels[0];
        assert_eq!(p.series.len(), 3);
        assert!(p.series.iter().all(|s| s.points.len() == 4));
        // Sorted by budget.
        assert!(p.series[0].points.windows(2).all(|w| w[0].x < w[1].x));
        assert_eq!(p.hlines, vec![("dense 11.800".to_string(), 11.8)]);
    }

    #[test]
    fn axis_labels() {
        assert_eq!(x_label(XAxis::Tokens, 12.0), "4k");
        assert_eq!(x_label(XAxis::Tokens, 9.0), "512");
        assert_eq!(x_label(XAxis::Tokens, 17.0), "128k");
        assert_eq!(x_label(XAxis::Fraction, -5.0), "1/32");
        assert_eq!(x_label(XAxis::Fraction, (1.0f64 / 3.0).log2()), "1/3");
        assert_eq!(x_label(XAxis::Tokens, 1536f64.log2()), "1.5k");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        assert_eq!(x_ticks(&[12.0, 9.0, 12.0], 8.0, 13.0), vec![9.0, 12.0]);
        let many: Vec<f64> = (0..20).map(|i| 9.0 + i as f64 * 0.1).collect();
        assert_eq!(x_ticks(&many, 8.9, 11.1), vec![9.0, 10.0, 11.0]);
        assert_eq!(
            outputs(Path::new("out/plot")).1,
            PathBuf::from("out/plot.png")
        );
        assert_eq!(
            outputs(Path::new("out/plot.svg")).1,
            PathBuf::from("out/plot.png")
        );
        assert_eq!(
            outputs(Path::new("out/run.v2")).0,
            PathBuf::from("out/run.v2.svg")
        );
    }
}
