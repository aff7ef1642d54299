//! PNG plots with `plotters`' bitmap backend. Text is drawn with `ab_glyph` from a
//! TrueType file read at run time (DejaVu Sans, Debian's `fonts-dejavu-core`), so no
//! font library is linked; without a font the plots are skipped with a warning.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

/// Where the font is looked for, first match wins (`MOSAIC_BENCH_FONT` before these).
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Registers the font once; the error says how to get one.
pub fn font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var("MOSAIC_BENCH_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|p| p.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // Registered fonts live as long as the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"));
            }
        }
        Err("no DejaVuSans.ttf found (apt-get install fonts-dejavu-core, or set MOSAIC_BENCH_FONT to a .ttf file)".into())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its legend.
    pub name: String,
    /// Its points.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A named series.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// A chart of lines (with a dot on each point when `dots`), axes from zero.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    dots: bool,
) -> anyhow::Result<()> {
    font()?;
    // Dots mark a few points at the right (sizes); lines peak at the left (rates
    // at the start, latency histograms): keep the legend off them.
    let legend = if dots {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    };
    let max = |f: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(f))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
    };
    let (x_max, y_max) = (max(|p| p.0), max(|p| p.1));
    let x_max = if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    // Room above the data for the legend.
    let y_max = if y_max > 0.0 { y_max * 1.3 } else { 1.0 };
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if dots {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(draw)?;
        }
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(draw)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// An axis label: whole numbers from 10 up, one decimal below.
fn tick(v: &f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Counts per bin of `values` over `0..=upper` in `bins` bins, as the share of all
/// values in each bin (so runs of different sizes compare), at the bins' centres.
pub fn histogram(values: &[f64], upper: f64, bins: usize) -> Vec<(f64, f64)> {
    let bins = bins.max(1);
    let width = upper / bins as f64;
    let mut counts = vec![0u64; bins];
    for v in values {
        let i = ((v / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let n = values.len().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| ((i as f64 + 0.5) * width, 100.0 * *c as f64 / n))
        .collect()
}

/// Events per second over time: `times` (seconds from the start) counted in
/// `bucket`-second buckets, at each bucket's end.
pub fn rate_over_time(times: &[f64], bucket: f64) -> Vec<(f64, f64)> {
    let Some(last) = times.iter().copied().reduce(f64::max) else {
        return Vec::new();
    };
    let n = (last / bucket).floor() as usize + 1;
    let mut counts = vec![0u64; n];
    for t in times {
        counts[((t / bucket) as usize).min(n - 1)] += 1;
    }
    let mut out = vec![(0.0, 0.0)];
    out.extend(
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| ((i + 1) as f64 * bucket, *c as f64 / bucket)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_shares_add_up() {
        let h = histogram(&[0.1, 0.2, 0.9, 5.0], 1.0, 2);
        assert_eq!(h, [(0.25, 50.0), (0.75, 50.0)]);
    }

    #[test]
    fn rates_are_per_second() {
        let r = rate_over_time(&[0.1, 0.2, 0.3, 0.6], 0.5);
        assert_eq!(r, [(0.0, 0.0), (0.5, 6.0), (1.0, 2.0)]);
    }

    #[test]
    fn a_chart_renders_when_a_font_is_there() {
        if font().is_err() {
            return; // no font on this machine: the tool skips plots too
        }
        let dir = tempfile_dir();
        let path = dir.join("t.png");
        lines(
            &path,
            "t",
            "x",
            "y",
            &[Series::new("a", vec![(0.0, 1.0), (1.0, 2.0)])],
            true,
        )
        .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mosaic-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
