//! The chart: one panel per job, a bar per device, ABUSE's in their own
//! colour, so that a reader sees at a glance where ABUSE stands; a job run
//! in several conditions (qcow2) gets a panel of ABUSE's ratio to its peer
//! in each, with a line at 1.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Row;
use crate::results::JOBS;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws `rows` into a PNG at `path`.
pub fn draw(rows: &[Row], path: &std::path::Path) -> Result<(), String> {
    let font =
        std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (make bench-deps installs it)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| format!("{FONT}: not a font"))?;
    let plain: Vec<&Row> = rows.iter().filter(|r| r.cond.is_empty()).collect();
    let jobs: Vec<(&str, &str)> = JOBS
        .iter()
        .copied()
        .filter(|(j, _)| plain.iter().any(|r| r.job == *j))
        .collect();
    // The conditioned jobs: ABUSE's rows with a ratio, per job.
    let ratios: Vec<(&str, Vec<&Row>)> = JOBS
        .iter()
        .map(|(j, _)| {
            let v: Vec<&Row> = rows
                .iter()
                .filter(|r| r.job == *j && !r.cond.is_empty())
                .filter(|r| r.vs.first().is_some_and(|v| v.median.is_some()))
                .collect();
            (*j, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let cols = 2;
    let panels = (jobs.len() + ratios.len()).div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (1600, 360 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((panels, cols));
    for ((job, title), area) in jobs.iter().zip(areas.iter()) {
        let mine: Vec<&Row> = plain.iter().copied().filter(|r| r.job == *job).collect();
        let value = |r: &Row| match *job {
            "qd1" => r.p50_us,
            "seqread" | "seqwrite" => r.mib_s,
            _ => r.iops,
        };
        let unit = match *job {
            "qd1" => "p50 latency, us (lower is better)",
            "seqread" | "seqwrite" => "MiB/s",
            _ => "IOPS",
        };
        let max = mine.iter().map(|r| value(r)).fold(1.0, f64::max) * 1.15;
        let n = mine.len();
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 22))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0.0..max, 0.0..n as f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc(unit)
            .disable_y_axis()
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(mine.iter().enumerate().map(|(i, r)| {
                let y = (n - 1 - i) as f64;
                let colour = if r.device.starts_with("abuse") {
                    RGBColor(214, 39, 40)
                } else {
                    RGBColor(120, 120, 120)
                };
                Rectangle::new([(0.0, y + 0.15), (value(r), y + 0.85)], colour.filled())
            }))
            .map_err(|e| e.to_string())?;
        // Each bar says what it is and how much, just past its end.
        let style =
            TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        chart
            .draw_series(mine.iter().enumerate().map(|(i, r)| {
                let y = (n - 1 - i) as f64 + 0.5;
                let v = value(r);
                let shown = if v >= 10_000.0 {
                    format!("{:.0}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                };
                Text::new(
                    format!("{}  {shown}", r.device),
                    (v + max * 0.01, y),
                    style.clone(),
                )
            }))
            .map_err(|e| e.to_string())?;
    }
    for ((job, mine), area) in ratios.iter().zip(areas.iter().skip(jobs.len())) {
        ratio_panel(job, mine, area)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// ABUSE's ratio to its first peer in each condition of `job`: a bar at the
/// median over boots, a line across the single pairs' spread, one at 1.
fn ratio_panel(
    job: &str,
    mine: &[&Row],
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<(), String> {
    let vs = |r: &Row| r.vs[0].clone();
    let max = mine
        .iter()
        .map(|r| vs(r).max.unwrap_or(0.0))
        .fold(1.0, f64::max)
        * 1.8;
    let n = mine.len();
    let peer = mine[0].vs[0].peer.clone();
    let title = format!(
        "{}: ratio to {peer} per condition",
        crate::report::title(job, "")
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("median ratio over boots, red if at least 1 (line: min-max of single pairs)")
        .disable_y_axis()
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let y = |i: usize| (n - 1 - i) as f64;
    chart
        .draw_series(mine.iter().enumerate().map(|(i, r)| {
            let m = vs(r).median.unwrap_or(0.0);
            let colour = if m >= 1.0 {
                RGBColor(214, 39, 40)
            } else {
                RGBColor(120, 120, 120)
            };
            Rectangle::new([(0.0, y(i) + 0.2), (m, y(i) + 0.8)], colour.filled())
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(mine.iter().enumerate().map(|(i, r)| {
            let v = vs(r);
            PathElement::new(
                vec![
                    (v.min.unwrap_or(0.0), y(i) + 0.5),
                    (v.max.unwrap_or(0.0), y(i) + 0.5),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, 0.0), (1.0, n as f64)],
            BLUE.stroke_width(1),
        )))
        .map_err(|e| e.to_string())?;
    let style =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    chart
        .draw_series(mine.iter().enumerate().map(|(i, r)| {
            let v = vs(r);
            let end = v.max.unwrap_or(0.0).max(v.median.unwrap_or(0.0));
            Text::new(
                format!("{}  {}", r.cond, v.paired.show()),
                (end + max * 0.01, y(i) + 0.5),
                style.clone(),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}
