//! Small self-contained SVG charts for the HTML report (scatter and line plots with labelled axes).
//!
//! Written by hand rather than with `plotters`: plotters' SVG backend needs a font file at run time to
//! measure text, and the report must open anywhere without one. These charts only place markers, lines and
//! `<text>` elements whose layout the browser does.

use std::fmt::Write;

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// The points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

/// How the points of a chart are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartKind {
    /// Markers only.
    Scatter,
    /// Markers joined by lines, in x order.
    Lines,
}

/// A chart: title, axis labels, series, and whether x is on a log10 scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Log10 x axis (for byte counts spanning orders of magnitude).
    pub log_x: bool,
    /// Markers or lines.
    pub kind: ChartKind,
    /// The data.
    pub series: Vec<Series>,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * magnitude);
    let mut ticks = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        ticks.push(t);
        t += step;
    }
    ticks
}

fn format_tick(value: f64, log: bool) -> String {
    if log {
        let v = 10f64.powf(value);
        match v {
            v if v >= 1e9 => format!("{:.0} GB", v / 1e9),
            v if v >= 1e6 => format!("{:.0} MB", v / 1e6),
            v if v >= 1e3 => format!("{:.0} kB", v / 1e3),
            v => format!("{v:.0} B"),
        }
    } else if value.abs() >= 100.0 || value == value.round() {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

impl Chart {
    /// Renders the chart as an inline `<svg>` element (640 x 360).
    pub fn to_svg(&self) -> String {
        let (width, height) = (640.0, 360.0);
        let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
        let tx = |x: f64| {
            if self.log_x && x > 0.0 {
                x.log10()
            } else if self.log_x {
                f64::NAN
            } else {
                x
            }
        };
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|&(x, y)| (tx(x), y)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{}"><style>text{{font-family:sans-serif;font-size:12px}}</style>"#,
            escape(&self.title)
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="20" text-anchor="middle" font-weight="bold">{}</text>"#,
            left + (width - left - right) / 2.0,
            escape(&self.title)
        );
        if points.is_empty() {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
                width / 2.0,
                height / 2.0
            );
            return svg;
        }
        let (mut x0, mut x1, mut y0, mut y1) = points.iter().fold(
            (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        let pad = |lo: &mut f64, hi: &mut f64| {
            let span = (*hi - *lo)
                .abs()
                .max(if *hi == 0.0 { 1.0 } else { hi.abs() * 0.1 });
            *lo -= span * 0.08;
            *hi += span * 0.08;
        };
        pad(&mut x0, &mut x1);
        pad(&mut y0, &mut y1);
        let plot_w = width - left - right;
        let plot_h = height - top - bottom;
        let px = |x: f64| left + (x - x0) / (x1 - x0) * plot_w;
        let py = |y: f64| top + plot_h - (y - y0) / (y1 - y0) * plot_h;
        let _ = write!(
            svg,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#444\"/>"
        );
        for t in nice_ticks(x0, x1) {
            let _ = write!(
                svg,
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>",
                px(t),
                top,
                top + plot_h,
                top + plot_h + 16.0,
                escape(&format_tick(t, self.log_x))
            );
        }
        for t in nice_ticks(y0, y1) {
            let _ = write!(
                svg,
                "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"#ddd\"/><text x=\"{3}\" y=\"{4:.1}\" text-anchor=\"end\">{5}</text>",
                left,
                left + plot_w,
                py(t),
                left - 6.0,
                py(t) + 4.0,
                escape(&format_tick(t, false))
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            height - 10.0,
            escape(&self.x_label)
        );
        let _ = write!(
            svg,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let mut pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .map(|&(x, y)| (tx(x), y))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if self.kind == ChartKind::Lines && pts.len() > 1 {
                let path: Vec<String> = pts
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                    .collect();
                let _ = write!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                    path.join(" ")
                );
            }
            for &(x, y) in &pts {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{}: ({}, {:.3})</title></circle>"#,
                    px(x),
                    py(y),
                    escape(&series.label),
                    escape(&format_tick(x, self.log_x)),
                    y
                );
            }
            let ly = top + 14.0 + i as f64 * 18.0;
            let _ = write!(
                svg,
                r#"<circle cx="{}" cy="{ly}" r="5" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
                width - right + 16.0,
                width - right + 26.0,
                ly + 4.0,
                escape(&series.label)
            );
        }
        svg.push_str("</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_places_every_point_and_escapes_labels() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "bytes".into(),
            y_label: "PSNR".into(),
            log_x: true,
            kind: ChartKind::Scatter,
            series: vec![
                Series {
                    label: "none".into(),
                    points: vec![(1e3, 20.0), (1e6, 30.0)],
                },
                Series {
                    label: "glwe".into(),
                    points: vec![(f64::NAN, 1.0), (1e5, 10.0)],
                },
            ],
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a &lt; b"));
        // 3 finite points + 2 legend markers.
        assert_eq!(svg.matches("<circle").count(), 5);
    }

    #[test]
    fn empty_chart_says_so() {
        let chart = Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: false,
            kind: ChartKind::Lines,
            series: vec![],
        };
        assert!(chart.to_svg().contains("no data"));
    }
}
