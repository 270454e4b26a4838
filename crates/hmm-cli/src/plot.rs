//! The SVG of `hmm bench plot`: throughput against migration size.

use std::path::Path;

use hmm_tools::bench::series::Series;
use plotters::prelude::*;

/// Colours of the series, in order; memcpy (the reference) is black.
const COLOURS: [RGBColor; 6] = [
    RGBColor(0xD6, 0x27, 0x28),
    RGBColor(0x1F, 0x77, 0xB4),
    RGBColor(0x2C, 0xA0, 0x2C),
    RGBColor(0xFF, 0x7F, 0x0E),
    RGBColor(0x94, 0x67, 0xBD),
    RGBColor(0x8C, 0x56, 0x4B),
];

/// The size `2^log2` bytes, in binary units.
fn size_label(log2: i32) -> String {
    let b = 1u64 << log2.clamp(0, 62);
    match b {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Draws the sweep (top) and the self-test benchmark (bottom) into `path`.
pub fn draw(path: &Path, series: &[Series], title: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 1100)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(550);
    for (area, group, caption) in [
        (
            &top,
            "sweep",
            format!("{title}: migration and fault-back against size (memcpy for reference)"),
        ),
        (&bottom, "selftest", "the kernel HMM self-test migration benchmark, restated".to_string()),
    ] {
        let of: Vec<&Series> = series.iter().filter(|s| s.group == group).collect();
        let pts = of.iter().flat_map(|s| s.points.iter());
        // Sizes are powers of two: the x axis is their logarithm, labelled
        // at every size measured.
        let log2 = |x: usize| x.max(1).ilog2() as i32;
        let (mut x0, mut x1, mut y0, mut y1) = (i32::MAX, 0i32, f64::MAX, 0f64);
        for &(x, y) in pts {
            x0 = x0.min(log2(x));
            x1 = x1.max(log2(x));
            if y > 0.0 {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if of.is_empty() || x1 <= x0 || y1 <= 0.0 {
            return Err(format!("no {group} figures to draw"));
        }
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(16)
            .margin_right(40)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, (y0 / 1.5..y1 * 1.5).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("migration size")
            .y_desc("GB/s")
            .x_labels((x1 - x0 + 1) as usize)
            .x_label_formatter(&|x| size_label(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (k, s) in of.iter().enumerate() {
            let colour = if s.name == "memcpy" { BLACK } else { COLOURS[k % COLOURS.len()] };
            let style = ShapeStyle { color: colour.to_rgba(), filled: true, stroke_width: 2 };
            let line: Vec<(i32, f64)> = s.points.iter().map(|(x, y)| (log2(*x), *y)).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), style))
                .map_err(|e| err(&e))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(line.into_iter().map(|p| Circle::new(p, 3, style)))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
