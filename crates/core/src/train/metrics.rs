//! Metrics as JSONL (one object per line) and a loss-curve PNG.

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

pub struct MetricsWriter {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsWriter {
    /// Opens `path` for appending; with `truncate_after_step`, first drops lines of later steps
    /// (a resumed run rewrites the steps it repeats).
    pub fn open(path: &Path, truncate_after_step: Option<u64>) -> Result<Self> {
        if let (Some(step), true) = (truncate_after_step, path.exists()) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_none_or(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::checkpoint::atomic::write_file(path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads `metrics.jsonl` and draws train loss (and validation loss where present) against step.
pub fn plot_loss_curve(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            train.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            val.push((step, l));
        }
    }
    if train.is_empty() {
        return Err(Error::file(metrics, "no training loss to plot"));
    }
    let ymax = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .fold(f64::MIN, f64::max);
    let ymin = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .fold(f64::MAX, f64::min);
    let xmax = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let tmp = png.with_extension("png.tmp.png");
    {
        register_font();
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| crate::msg!("plotting {}: {e}", png.display());
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..xmax, (ymin * 0.95)..(ymax * 1.05))
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|e| draw(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.clone(), &RED))
                .map_err(|e| draw(&e))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            chart
                .draw_series(val.iter().map(|p| Circle::new(*p, 3, RED.filled())))
                .map_err(|e| draw(&e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
    }
    std::fs::rename(&tmp, png).map_err(|e| Error::io(png, e))
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Embedded font: no system font libraries needed.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}
