//! Results: every figure beside its same-run baseline and their ratio, the final
//! table on standard output, and the JSON results file.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::procfs::{Load, Machine};

/// One measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Value {
    /// What was measured, in words.
    pub what: String,
    /// The number.
    pub value: f64,
    /// Its unit.
    pub unit: String,
}

impl Value {
    /// A value.
    pub fn new(what: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Value {
            what: what.into(),
            value,
            unit: unit.into(),
        }
    }
}

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// A rate: more is better.
    Higher,
    /// A cost or a latency: less is better.
    Lower,
}

/// A figure of the system under test beside a baseline measured in the same run on
/// the same broker.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The figure.
    pub figure: Value,
    /// Its baseline.
    pub baseline: Value,
    /// `figure / baseline`.
    pub ratio: f64,
    /// Which way is better.
    pub better: Better,
    /// What limits the figure here (the broker, the kernel, our code), as measured.
    pub limit: String,
}

impl Figure {
    /// A figure and its baseline; the ratio is computed.
    pub fn new(figure: Value, baseline: Value, better: Better, limit: impl Into<String>) -> Self {
        let ratio = if baseline.value != 0.0 {
            figure.value / baseline.value
        } else {
            f64::NAN
        };
        Figure {
            figure,
            baseline,
            ratio,
            better,
            limit: limit.into(),
        }
    }
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// `idle`, `relay`, `request`, `broadcast` or `soak`.
    pub scenario: String,
    /// The settings it ran with.
    pub settings: serde_json::Value,
    /// How busy the machine was meanwhile.
    pub load: Load,
    /// The figures.
    pub figures: Vec<Figure>,
    /// Everything else measured (raw readings, series for the plots).
    pub details: serde_json::Value,
    /// PNG files written for it (names inside the plots directory).
    pub plots: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The tool and its version.
    pub tool: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// The machine.
    pub machine: Machine,
    /// RabbitMQ and Erlang versions.
    pub broker: serde_json::Value,
    /// The scenarios, in the order they ran.
    pub scenarios: Vec<ScenarioResult>,
}

impl Run {
    /// Writes the JSON results file, pretty, with series included.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }

    /// The final table: one line per figure, with its baseline and ratio.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "scenario".to_owned(),
            "figure".to_owned(),
            "value".to_owned(),
            "baseline".to_owned(),
            "value".to_owned(),
            "ratio".to_owned(),
        ]];
        for s in &self.scenarios {
            for f in &s.figures {
                rows.push([
                    s.scenario.clone(),
                    f.figure.what.clone(),
                    format!("{} {}", number(f.figure.value), f.figure.unit),
                    f.baseline.what.clone(),
                    format!("{} {}", number(f.baseline.value), f.baseline.unit),
                    format!("{:.2}", f.ratio),
                ]);
            }
        }
        let widths: Vec<usize> = (0..6)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            for (c, cell) in r.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if c == 2 || c == 4 || c == 5 {
                    let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
                }
            }
            out = out.trim_end().to_owned();
            out.push('\n');
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * 5;
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{}: {:.0} s; machine busy {:.2} of {} cores ({:.2} this run, {:.2} other work), load average {:.1} -> {:.1}",
                s.scenario,
                s.load.seconds,
                s.load.busy_cores,
                self.machine.cpus,
                s.load.ours_cores,
                s.load.others_cores,
                s.load.loadavg[0],
                s.load.loadavg[1]
            );
        }
        out
    }
}

/// A number with a precision that suits its size.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        group(v.round() as i64)
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn group(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Percentile `p` (0..=1) of sorted `values`; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(19000.0), "19,000");
        assert_eq!(number(1234567.4), "1,234,567");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(0.456), "0.46");
        assert_eq!(number(f64::NAN), "-");
    }

    #[test]
    fn percentiles_take_the_value_at_or_above() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&v, 1.0), 1000.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn ratio_is_figure_over_baseline() {
        let f = Figure::new(
            Value::new("a", 3.0, "x"),
            Value::new("b", 4.0, "x"),
            Better::Higher,
            "",
        );
        assert_eq!(f.ratio, 0.75);
    }
}
