//! PNG line charts of a run's metrics.jsonl, one chart per metric group
//! (losses, accuracies, learning rate, everything else), in `RUN_DIR/plots/`.
//!
//! Drawn pixel by pixel with the built-in font ([`super::font`]) and encoded
//! with the `png` crate: no system fonts or graphics libraries, so `trm plot`
//! works on a bare machine.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::font::{draw_text, text_width, GLYPH_H};
use super::metrics::{read_metrics, METRICS_FILE};
use super::{io_err, TelemetryError};

type Result<T> = std::result::Result<T, TelemetryError>;

pub const WIDTH: usize = 960;
pub const HEIGHT: usize = 540;
pub const PLOTS_DIR: &str = "plots";

/// Text scale (font pixels per glyph pixel) for all labels.
const TEXT_SCALE: usize = 2;
const TEXT_H: i64 = (GLYPH_H * TEXT_SCALE) as i64;

pub type Rgb = [u8; 3];
pub const BACKGROUND: Rgb = [255, 255, 255];
const INK: Rgb = [30, 30, 30];
const GRID: Rgb = [225, 225, 225];
const FRAME: Rgb = [120, 120, 120];

/// Line colours (matplotlib's tab10), cycled.
pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// One named line: (x, y) points in x order; non-finite y breaks the line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// An RGB image, row-major.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, fill: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            pixels: fill.repeat(width * height),
        }
    }

    /// Sets a pixel; anything outside the image is ignored.
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.pixels[i..i + 3].copy_from_slice(&c);
    }

    /// The pixel at (x, y), `None` outside the image.
    pub fn get(&self, x: usize, y: usize) -> Option<Rgb> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y * self.width + x) * 3;
        Some([self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]])
    }

    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, c);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: Rgb) {
        self.fill_rect(x0, y, x1 + 1, y + 1, c);
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: Rgb) {
        self.fill_rect(x, y0, x + 1, y1 + 1, c);
    }

    /// A 2-pixel-wide line (Bresenham, stamping 2x2 squares).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.fill_rect(x, y, x + 2, y + 2, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, s: &str, x: i64, y: i64, c: Rgb) {
        draw_text(s, x, y, TEXT_SCALE, |px, py| self.set(px, py, c));
    }
}

/// Maps data coordinates to pixels inside the plot area.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    pub left: i64,
    pub top: i64,
    pub right: i64,
    pub bottom: i64,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
}

impl Frame {
    /// The frame `render` uses for `chart`.
    pub fn for_chart(chart: &Chart) -> Frame {
        let finite = || {
            chart
                .series
                .iter()
                .flat_map(|s| &s.points)
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let x_range = padded(span(finite().map(|p| p.0)), 0.0);
        let y_range = padded(span(finite().map(|p| p.1)), 0.05);
        Frame {
            left: 130,
            top: 50,
            right: WIDTH as i64 - 30,
            bottom: HEIGHT as i64 - 60,
            x_range,
            y_range,
        }
    }

    pub fn to_px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        let px = self.left as f64 + fx * (self.right - self.left) as f64;
        let py = self.bottom as f64 - fy * (self.bottom - self.top) as f64;
        (px.round() as i64, py.round() as i64)
    }
}

fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Widens a range by `frac` on each side; a flat or empty one gets a unit
/// (or 10 %) width so the mapping stays finite.
fn padded(range: Option<(f64, f64)>, frac: f64) -> (f64, f64) {
    match range {
        None => (0.0, 1.0),
        Some((lo, hi)) if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) => {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - d, hi + d)
        }
        Some((lo, hi)) => {
            let d = (hi - lo) * frac;
            (lo - d, hi + d)
        }
    }
}

/// Tick label: scientific for very large/small magnitudes, else enough
/// decimals for the axis span.
pub fn format_tick(v: f64, span: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.2e}");
    }
    let decimals = (2.0 - span.abs().max(1e-12).log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

const N_TICKS: usize = 5;

/// Draws a chart: title, grid, axes with tick labels, one line per series and
/// a legend placed in the corner that hides the fewest points.
pub fn render(chart: &Chart) -> Canvas {
    let mut c = Canvas::new(WIDTH, HEIGHT, BACKGROUND);
    let f = Frame::for_chart(chart);

    let title_w = text_width(&chart.title, TEXT_SCALE) as i64;
    c.text(&chart.title, (WIDTH as i64 - title_w) / 2, 16, INK);

    // Grid and tick labels.
    let (x0, x1) = f.x_range;
    let (y0, y1) = f.y_range;
    for i in 0..N_TICKS {
        let t = i as f64 / (N_TICKS - 1) as f64;
        let yv = y0 + t * (y1 - y0);
        let (_, py) = f.to_px(x0, yv);
        c.hline(f.left, f.right, py, GRID);
        let label = format_tick(yv, y1 - y0);
        let w = text_width(&label, TEXT_SCALE) as i64;
        c.text(&label, f.left - 8 - w, py - TEXT_H / 2, INK);

        let xv = x0 + t * (x1 - x0);
        let (px, _) = f.to_px(xv, y0);
        c.vline(px, f.top, f.bottom, GRID);
        let label = format_tick(xv, x1 - x0);
        let w = text_width(&label, TEXT_SCALE) as i64;
        c.text(&label, px - w / 2, f.bottom + 8, INK);
    }
    let w = text_width(&chart.x_label, TEXT_SCALE) as i64;
    c.text(
        &chart.x_label,
        (f.left + f.right - w) / 2,
        f.bottom + 14 + TEXT_H,
        INK,
    );

    // Frame.
    c.hline(f.left, f.right, f.top, FRAME);
    c.hline(f.left, f.right, f.bottom, FRAME);
    c.vline(f.left, f.top, f.bottom, FRAME);
    c.vline(f.right, f.top, f.bottom, FRAME);

    for (i, s) in chart.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut prev: Option<(i64, i64)> = None;
        let mut lone = Vec::new();
        for (k, &(x, y)) in s.points.iter().enumerate() {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = f.to_px(x, y);
            match prev {
                Some(q) => c.line(q, p, colour),
                None => {
                    let next_ok = s
                        .points
                        .get(k + 1)
                        .is_some_and(|(a, b)| a.is_finite() && b.is_finite());
                    if !next_ok {
                        lone.push(p);
                    }
                }
            }
            prev = Some(p);
        }
        // Points with no neighbour would be invisible as lines: mark them.
        for (x, y) in lone {
            c.fill_rect(x - 3, y - 3, x + 4, y + 4, colour);
        }
    }

    draw_legend(&mut c, chart, &f);
    c
}

fn draw_legend(c: &mut Canvas, chart: &Chart, f: &Frame) {
    if chart.series.is_empty() {
        return;
    }
    let row_h = TEXT_H + 8;
    let swatch = 24;
    let text_w = chart
        .series
        .iter()
        .map(|s| text_width(&s.name, TEXT_SCALE) as i64)
        .max()
        .unwrap_or(0);
    let w = 10 + swatch + 8 + text_w + 10;
    let h = 8 + row_h * chart.series.len() as i64;
    let m = 10;
    let corners = [
        (f.right - m - w, f.top + m),
        (f.right - m - w, f.bottom - m - h),
        (f.left + m, f.top + m),
        (f.left + m, f.bottom - m - h),
    ];
    let hidden = |(lx, ly): (i64, i64)| {
        chart
            .series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| f.to_px(x, y))
            .filter(|&(px, py)| px >= lx && px < lx + w && py >= ly && py < ly + h)
            .count()
    };
    let (lx, ly) = corners
        .iter()
        .copied()
        .min_by_key(|&corner| hidden(corner))
        .unwrap_or(corners[0]);

    c.fill_rect(lx, ly, lx + w, ly + h, BACKGROUND);
    c.hline(lx, lx + w, ly, FRAME);
    c.hline(lx, lx + w, ly + h, FRAME);
    c.vline(lx, ly, ly + h, FRAME);
    c.vline(lx + w, ly, ly + h, FRAME);
    for (i, s) in chart.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let y = ly + 8 + row_h * i as i64;
        c.fill_rect(
            lx + 10,
            y + TEXT_H / 2 - 2,
            lx + 10 + swatch,
            y + TEXT_H / 2 + 2,
            colour,
        );
        c.text(&s.name, lx + 10 + swatch + 8, y, INK);
    }
}

/// Writes `canvas` as an 8-bit RGB PNG, via a temporary file and a rename.
pub fn write_png(path: &Path, canvas: &Canvas) -> Result<()> {
    let tmp = path.with_extension(format!("png.tmp-{}", std::process::id()));
    let png_err = |source| TelemetryError::Png {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut enc = png::Encoder::new(
            BufWriter::new(file),
            canvas.width as u32,
            canvas.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(&canvas.pixels).map_err(png_err)?;
        w.finish().map_err(png_err)?;
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Metric groups, in chart order: (file stem, title).
const GROUPS: [(&str, &str); 4] = [
    ("losses", "Losses"),
    ("accuracies", "Accuracies"),
    ("lr", "Learning rate"),
    ("other", "Other metrics"),
];

/// The chart a metric belongs to, judged by the last part of its name
/// (`train/lm_loss` -> losses).
pub fn group_of(name: &str) -> &'static str {
    let leaf = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
    if leaf.contains("loss") {
        "losses"
    } else if leaf.contains("acc") {
        "accuracies"
    } else if leaf == "lr"
        || leaf.starts_with("lr_")
        || leaf.ends_with("_lr")
        || leaf.contains("learning_rate")
    {
        "lr"
    } else {
        "other"
    }
}

/// Draws `RUN_DIR/metrics.jsonl` into `RUN_DIR/plots/<group>.png`, one chart
/// per group that has data. Returns the files written. When a step appears
/// twice (a resumed run re-logging steps), the later value wins.
pub fn plot_run(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let records = read_metrics(&run_dir.join(METRICS_FILE))?;
    let mut by_metric: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for r in &records {
        for (name, &v) in &r.values {
            by_metric.entry(name.clone()).or_default().insert(r.step, v);
        }
    }

    let out_dir = run_dir.join(PLOTS_DIR);
    let mut written = Vec::new();
    for (stem, title) in GROUPS {
        let series: Vec<Series> = by_metric
            .iter()
            .filter(|(name, _)| group_of(name) == stem)
            .map(|(name, points)| Series {
                name: name.clone(),
                points: points.iter().map(|(&s, &v)| (s as f64, v)).collect(),
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let chart = Chart {
            title: title.to_string(),
            x_label: "step".to_string(),
            series,
        };
        fs::create_dir_all(&out_dir).map_err(io_err(&out_dir))?;
        let path = out_dir.join(format!("{stem}.png"));
        write_png(&path, &render(&chart))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::MetricsWriter;

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let dec = png::Decoder::new(File::open(path).unwrap());
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn count(pixels: &[u8], c: Rgb) -> usize {
        pixels.chunks_exact(3).filter(|p| *p == c).count()
    }

    #[test]
    fn groups() {
        assert_eq!(group_of("train/lm_loss"), "losses");
        assert_eq!(group_of("train/q_halt_loss"), "losses");
        assert_eq!(group_of("eval/exact_accuracy"), "accuracies");
        assert_eq!(group_of("train/lr"), "lr");
        assert_eq!(group_of("train/puzzle_emb_lr"), "lr");
        assert_eq!(group_of("train/steps"), "other");
        assert_eq!(group_of("train/early"), "other");
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.0, 1.0), "0");
        assert_eq!(format_tick(0.25, 1.0), "0.25");
        assert_eq!(format_tick(2.5, 5.0), "2.50");
        assert_eq!(format_tick(1500.0, 3000.0), "1500");
        assert_eq!(format_tick(1e-4, 1e-4), "1.00e-4");
    }

    #[test]
    fn plot_run_writes_readable_charts() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path()).unwrap();
        for step in 1..=200u64 {
            let s = step as f64;
            let mut values = vec![
                ("train/lm_loss", 3.0 * (-s / 50.0).exp() + 0.2),
                ("train/q_halt_loss", 0.5 / s.sqrt()),
                ("train/accuracy", 1.0 - (-s / 40.0).exp()),
                ("train/lr", 1e-4 * (s / 20.0).min(1.0)),
                ("train/steps", 16.0 - s / 20.0),
            ];
            if step == 100 {
                values[0].1 = f64::NAN; // a gap, not a crash
            }
            w.log(step, &values).unwrap();
        }
        let files = plot_run(dir.path()).unwrap();
        let stems: Vec<_> = files
            .iter()
            .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(stems, ["losses", "accuracies", "lr", "other"]);

        let (info, px) = decode(&files[0]);
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(px.len(), WIDTH * HEIGHT * 3);
        // Both loss lines are drawn (plus a legend swatch each).
        assert!(count(&px, PALETTE[0]) > 300, "{}", count(&px, PALETTE[0]));
        assert!(count(&px, PALETTE[1]) > 300, "{}", count(&px, PALETTE[1]));
        // Non-background pixels are a minority but plentiful (text, grid, lines).
        let ink = px.len() / 3 - count(&px, BACKGROUND);
        assert!(ink > 5_000 && ink < WIDTH * HEIGHT / 2, "{ink}");

        // A point of the first series, mapped the same way, is its colour.
        let chart = Chart {
            title: String::new(),
            x_label: String::new(),
            series: vec![Series {
                name: "train/lm_loss".into(),
                points: (1..=200)
                    .filter(|&s| s != 100)
                    .map(|s| (s as f64, 3.0 * (-(s as f64) / 50.0).exp() + 0.2))
                    .chain([(1.0, 0.5 / 1f64.sqrt())]) // q_halt_loss's range too
                    .chain([(200.0, 0.5 / 200f64.sqrt())])
                    .collect(),
            }],
        };
        let f = Frame::for_chart(&chart);
        let (x, y) = f.to_px(60.0, 3.0 * (-60.0f64 / 50.0).exp() + 0.2);
        let i = (y as usize * WIDTH + x as usize) * 3;
        assert_eq!(&px[i..i + 3], &PALETTE[0]);
    }

    #[test]
    fn render_handles_flat_single_and_empty_series() {
        let chart = Chart {
            title: "Edge cases".into(),
            x_label: "step".into(),
            series: vec![
                Series {
                    name: "flat".into(),
                    points: vec![(0.0, 2.0), (10.0, 2.0)],
                },
                Series {
                    name: "single".into(),
                    points: vec![(5.0, 2.0)],
                },
                Series {
                    name: "empty".into(),
                    points: vec![(1.0, f64::NAN)],
                },
            ],
        };
        let c = render(&chart);
        assert!(count(&c.pixels, PALETTE[0]) > 100);
        assert_eq!(c.get(0, 0), Some(BACKGROUND));
        assert_eq!(c.get(WIDTH, 0), None);
        // The lone point is marked with a 7x7 square (minus the legend swatch).
        assert!(count(&c.pixels, PALETTE[1]) >= 49);
        let empty = render(&Chart {
            title: "t".into(),
            x_label: "x".into(),
            series: vec![],
        });
        assert_eq!(empty.pixels.len(), WIDTH * HEIGHT * 3);
    }

    #[test]
    fn no_metrics_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = plot_run(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl"), "{e}");
    }
}
