//! Metrics as JSONL (one object per line) and a loss-curve PNG.

use std::io::Write;
use std::path::Path;

use plotters::prelude::*;

use colossal_core::{Error, Result};

/// What rank 0 shows and keeps of a run from step `start` to `end`: `OUT/metrics.jsonl`
/// (records after `start` dropped, so a resumed run rewrites what follows) and a progress bar;
/// other ranks get no writer and a hidden bar.
pub fn run_outputs(
    out_dir: &Path,
    main: bool,
    start: u64,
    end: u64,
) -> Result<(Option<MetricsWriter>, indicatif::ProgressBar)> {
    let metrics = if main {
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        Some(MetricsWriter::open(
            &out_dir.join("metrics.jsonl"),
            Some(start),
        )?)
    } else {
        None
    };
    let bar = if main {
        indicatif::ProgressBar::new(end)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    bar.set_position(start);
    Ok((metrics, bar))
}

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
            colossal_core::checkpoint::atomic::write_file(path, kept.as_bytes())?;
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
    plot_curves(metrics, png, "loss", &["loss", "val_loss"])
}

/// Draws each of `keys` of `metrics.jsonl` against step (records without the key are skipped).
pub fn plot_curves(metrics: &Path, png: &Path, title: &str, keys: &[&str]) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); keys.len()];
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        for (k, s) in keys.iter().zip(series.iter_mut()) {
            if let Some(x) = v.get(*k).and_then(|l| l.as_f64()).filter(|x| x.is_finite()) {
                s.push((step, x));
            }
        }
    }
    if series.iter().all(Vec::is_empty) {
        return Err(Error::file(metrics, format!("none of {keys:?} to plot")));
    }
    let all = || series.iter().flatten();
    let ymax = all().map(|p| p.1).fold(f64::MIN, f64::max);
    let ymin = all().map(|p| p.1).fold(f64::MAX, f64::min);
    let pad = ((ymax - ymin) * 0.05).max(1e-6);
    let xmax = all().map(|p| p.0).fold(1.0, f64::max);
    let tmp = png.with_extension("png.tmp.png");
    {
        register_font();
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        let draw =
            |e: &dyn std::fmt::Display| colossal_core::msg!("plotting {}: {e}", png.display());
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..xmax, (ymin - pad)..(ymax + pad))
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| draw(&e))?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (k, s)) in keys.iter().zip(series).enumerate() {
            if s.is_empty() {
                continue;
            }
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(s.clone(), &c))
                .map_err(|e| draw(&e))?
                .label(k.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
            if s.len() < 50 {
                chart
                    .draw_series(s.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(|e| draw(&e))?;
            }
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
