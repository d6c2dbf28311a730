//! Line charts as SVG text, drawn by plotters (its SVG backend; labels stay SVG `<text>`, so no
//! font files are needed). Used by the training report.

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// `(x, y)` in x order.
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Draw a dot at each point (sparse series: checkpoints).
    pub dots: bool,
    /// Thin and pale (a noisy series under its smoothed line).
    pub faint: bool,
}

/// A chart: title, axis labels, lines, and an optional marked x (the chosen checkpoint).
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// `(x, label)`: a dashed vertical line.
    pub mark: Option<(f64, String)>,
    /// The x range to show (all charts of a report share it).
    pub x_range: (f64, f64),
}

pub const BLUE: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
pub const ORANGE: RGBColor = RGBColor(0xd9, 0x73, 0x1a);
pub const GREEN: RGBColor = RGBColor(0x2e, 0x9d, 0x57);
pub const RED: RGBColor = RGBColor(0xd3, 0x33, 0x33);
pub const GREY: RGBColor = RGBColor(0x9a, 0xa3, 0xb0);
const MARK: RGBColor = RGBColor(0x7b, 0x3f, 0xbf);

fn chart_error(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("drawing a chart: {e}"))
}

/// The y range of the points, padded by 8 % (a flat series gets a small span around its value).
fn y_range(series: &[Series]) -> (f64, f64) {
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-3) * 0.1 };
    (lo - span * 0.08, hi + span * 0.08)
}

/// Draws `chart` as an SVG document `width` × `height` pixels.
pub fn svg(chart: &Chart, width: u32, height: u32) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let (y0, y1) = y_range(&chart.series);
        let (x0, x1) = chart.x_range;
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        // Enough decimals that neighbouring tick labels differ (about five ticks over the span);
        // none for ticks a unit or more apart (counts).
        let tick_digits = (-((y1 - y0) / 5.0).log10()).ceil();
        let decimals = if tick_digits <= 0.0 { 0 } else { (tick_digits as usize + 1).min(8) };
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(chart_error)?;
        c.configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.decimals$}"))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(chart_error)?;
        if let Some((x, label)) = &chart.mark {
            let style = ShapeStyle::from(&MARK).stroke_width(2);
            c.draw_series(DashedLineSeries::new([(*x, y0), (*x, y1)], 6, 4, style))
                .map_err(chart_error)?
                .label(label.clone())
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], MARK));
        }
        for s in &chart.series {
            let color = if s.faint { s.color.mix(0.35) } else { s.color.to_rgba() };
            let style = ShapeStyle::from(&color).stroke_width(if s.faint { 1 } else { 2 });
            let legend_color = color;
            c.draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(chart_error)?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], legend_color));
            if s.dots {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, s.color.filled()))).map_err(chart_error)?;
            }
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_svg_with_its_lines_dots_and_mark() {
        let chart = Chart {
            title: "held-out loss".into(),
            x_label: "step".into(),
            y_label: "MSE".into(),
            series: vec![Series { name: "held-out".into(), points: vec![(0.0, 0.3), (100.0, 0.2), (200.0, 0.25)], color: BLUE, dots: true, faint: false }],
            mark: Some((100.0, "chosen".into())),
            x_range: (0.0, 200.0),
        };
        let s = svg(&chart, 400, 240).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"), "{}", &s[..80.min(s.len())]);
        assert!(s.contains("held-out loss") && s.contains("chosen"));
        assert_eq!(s.matches("<circle").count(), 3, "one dot per point");
        assert!(s.contains("<polyline"), "the line");
    }
}
