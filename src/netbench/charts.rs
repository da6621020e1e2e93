//! SVG charts with plotters (no system fonts: the SVG viewer renders the text): latency CDF
//! per path, the hop waterfall, and latency against the number of services.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Report;

const W: u32 = 1000;
const PANEL_H: u32 = 420;

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing the chart: {err:?}")
}

/// One panel of the SVG file.
type Panel<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Writes the three charts of `r` into one SVG file.
pub fn write_svg(r: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (W, PANEL_H * 3)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((3, 1));
    cdf_panel(&panels[0], r)?;
    waterfall_panel(&panels[1], r)?;
    services_panel(&panels[2], r)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Panel 1, the CDF of TCP request/response latency per path (flannel references dashed, in
/// the colour of their tartan counterpart).
fn cdf_panel(area: &Panel<'_>, r: &Report) -> Result<()> {
    // Up to the 99th percentile: the rare multi-millisecond tails (scheduler preemption on a
    // small VM) would squash everything else; they are in the JSON and the tables.
    let max_x = r
        .paths
        .iter()
        .flat_map(|p| p.tcp_rr_cdf.iter().filter(|x| x.0 <= 0.99).map(|x| x.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(area)
        .caption(
            "TCP request/response latency, cumulative (µs)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d((1.0f64..max_x).log_scale(), 0.0f64..1.0)
        .map_err(e)?;
    c.configure_mesh()
        .x_desc("µs")
        .y_desc("fraction")
        .draw()
        .map_err(e)?;
    for (i, p) in r.paths.iter().enumerate() {
        let pts: Vec<(f64, f64)> = p
            .tcp_rr_cdf
            .iter()
            .filter(|(q, v)| *q <= 0.99 && *v <= max_x)
            .map(|(q, v)| (v.max(1.0), *q))
            .collect();
        if p.dataplane == "flannel" {
            // The flannel reference: dashed, in the colour of its tartan counterpart.
            let twin = r
                .paths
                .iter()
                .position(|t| t.reference.as_deref() == Some(p.id.as_str()))
                .unwrap_or(i);
            let col = palette(twin);
            c.draw_series(DashedLineSeries::new(pts, 6, 4, col.stroke_width(2)))
                .map_err(e)?
                .label(p.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 6, y)], col.stroke_width(2))
                });
        } else {
            let col = palette(i);
            c.draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(e)?
                .label(p.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2))
                });
        }
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(e)?;
    Ok(())
}

/// Panel 2, the hop waterfall: each hop a bar from the running total to the next (nothing
/// without hops).
fn waterfall_panel(area: &Panel<'_>, r: &Report) -> Result<()> {
    if r.hops.is_empty() {
        return Ok(());
    }
    let total: f64 = r
        .hops
        .iter()
        .map(|h| h.added_us.max(0.0))
        .sum::<f64>()
        .max(1.0);
    let n = r.hops.len();
    let mut c = ChartBuilder::on(area)
        .caption(
            "Where a pod -> ClusterIP -> remote pod round trip goes (µs; solid = measured, light = derived)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0f64..total * 1.05, 0.0f64..n as f64)
        .map_err(e)?;
    c.configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("µs")
        .draw()
        .map_err(e)?;
    let mut acc = 0.0;
    for (i, h) in r.hops.iter().enumerate() {
        let w = h.added_us.max(0.0);
        let y0 = (n - 1 - i) as f64 + 0.05;
        let col = palette(i);
        let style = if h.measured {
            col.filled()
        } else {
            col.mix(0.55).filled()
        };
        c.draw_series(std::iter::once(Rectangle::new(
            [(acc, y0), (acc + w, y0 + 0.7)],
            style,
        )))
        .map_err(e)?;
        // The label sits above its bar, starting at the axis, so it never leaves the chart.
        c.draw_series(std::iter::once(Text::new(
            format!(
                "{} ({:+.1} µs, {:.1} µs in all)",
                h.hop,
                h.added_us,
                acc + w
            ),
            (total * 0.005, y0 + 0.95),
            ("sans-serif", 11),
        )))
        .map_err(e)?;
        acc += w;
    }
    Ok(())
}

/// Panel 3, new-connection latency against the number of services, tartan's map and the
/// linear chain (nothing without service measurements).
fn services_panel(area: &Panel<'_>, r: &Report) -> Result<()> {
    if r.services.is_empty() {
        return Ok(());
    }
    let max_n = r
        .services
        .iter()
        .map(|s| s.services)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let max_y = r
        .services
        .iter()
        .map(|s| s.new_conn.p50_us)
        .fold(1.0, f64::max)
        * 1.2;
    let mut c = ChartBuilder::on(area)
        .caption(
            "New connection through a ClusterIP vs number of services (p50, µs)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((1.0f64..max_n * 1.2).log_scale(), 0.0f64..max_y)
        .map_err(e)?;
    c.configure_mesh()
        .x_desc("services")
        .y_desc("µs")
        .draw()
        .map_err(e)?;
    for (i, table) in ["tartan", "linear"].iter().enumerate() {
        let pts: Vec<(f64, f64)> = r
            .services
            .iter()
            .filter(|s| s.table == *table)
            .map(|s| (f64::from(s.services).max(1.0), s.new_conn.p50_us))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let col = palette(i * 3);
        let label = if *table == "tartan" {
            "tartan (one map lookup)"
        } else {
            "iptables-style linear chain"
        };
        c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, col.filled())))
            .map_err(e)?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}
