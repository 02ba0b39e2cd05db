//! Line charts as standalone SVG files, written by hand so reports need no plotting crate:
//! axes with "nice" ticks (1, 2 or 5 times a power of ten), one polyline with markers per
//! series, optional horizontal guide lines, a legend and a title.

use std::fmt::Write;

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// `(x, y)` in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A chart in data coordinates; ranges default to the data's, widened to whole ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Horizontal dashed lines at `y`, with a label.
    pub guides: Vec<(f64, String)>,
}

/// Tableau 10: distinguishable colours, also in grey-scale print.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

const PLOT_W: f64 = 460.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 45.0;
const BOTTOM: f64 = 60.0;
/// Width of one legend character at font size 12 (generous, so long names are not cut off).
const CHAR_W: f64 = 7.2;

/// The tick step for about `max_ticks` intervals over `span`: 1, 2 or 5 times a power of ten.
fn nice_step(span: f64, max_ticks: usize) -> f64 {
    let raw = span / max_ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let unit = raw / mag;
    let nice = if unit <= 1.0 {
        1.0
    } else if unit <= 2.0 {
        2.0
    } else if unit <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick positions covering `[lo, hi]`, from a multiple of the step at or below `lo` to one at
/// or above `hi`. A zero-width range is widened by one on each side.
pub fn nice_ticks(lo: f64, hi: f64, max_ticks: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let step = nice_step(hi - lo, max_ticks);
    let first = (lo / step + 1e-9).floor();
    let last = (hi / step - 1e-9).ceil();
    // Round away binary noise (6 * 0.05 = 0.30000000000000004) at the step's last digit.
    let scale = 10f64.powi((-step.log10().floor()).max(0.0) as i32);
    (first as i64..=last as i64)
        .map(|k| (k as f64 * step * scale).round() / scale)
        .collect()
}

/// Digits after the point that show every tick of this spacing distinctly.
fn decimals(ticks: &[f64]) -> usize {
    match ticks {
        [a, b, ..] => (-(b - a).log10().floor()).max(0.0) as usize,
        _ => 0,
    }
}

/// Escapes the five XML special characters.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

impl LineChart {
    fn data_range(&self, axis: fn(&(f64, f64)) -> f64) -> Option<(f64, f64)> {
        let values = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(axis);
        values.fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
    }

    /// The chart as a complete SVG document.
    pub fn to_svg(&self) -> String {
        let (x_lo, x_hi) = self
            .x_range
            .or_else(|| self.data_range(|p| p.0))
            .unwrap_or((0.0, 1.0));
        let guides = self.guides.iter().map(|g| g.0).filter(|y| y.is_finite());
        let (y_lo, y_hi) = match self.y_range {
            Some(r) => r,
            None => {
                let (lo, hi) = self.data_range(|p| p.1).unwrap_or((0.0, 1.0));
                guides.fold((lo, hi), |(lo, hi), y| (lo.min(y), hi.max(y)))
            }
        };
        let xt = nice_ticks(x_lo, x_hi, 10);
        let yt = nice_ticks(y_lo, y_hi, 8);
        let (x0, x1) = (xt[0], xt[xt.len() - 1]);
        let (y0, y1) = (yt[0], yt[yt.len() - 1]);
        // The legend and guide labels sit right of the plot; the picture widens to hold them.
        let longest = self
            .series
            .iter()
            .map(|s| s.name.chars().count() + 6)
            .chain(self.guides.iter().map(|g| g.1.chars().count()))
            .max()
            .unwrap_or(0);
        let (pw, ph) = (PLOT_W, HEIGHT - TOP - BOTTOM);
        let width = (LEFT + pw + 20.0 + CHAR_W * longest as f64).ceil();
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;
        let (xd, yd) = (decimals(&xt), decimals(&yt));

        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT}" viewBox="0 0 {width} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            o,
            r#"<rect x="0" y="0" width="{width}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        // Grid and tick labels.
        for &x in &xt {
            let px = sx(x);
            let _ = writeln!(
                o,
                r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
                TOP,
                TOP + ph
            );
            let _ = writeln!(
                o,
                r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{x:.xd$}</text>"#,
                TOP + ph + 18.0
            );
        }
        for &y in &yt {
            let py = sy(y);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.yd$}</text>"#,
                LEFT - 8.0,
                py + 4.0
            );
        }
        // Axes and their labels.
        let _ = writeln!(
            o,
            r#"<rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            HEIGHT - 18.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Guides.
        for (y, label) in &self.guides {
            if !(y.is_finite() && (y0..=y1).contains(y)) {
                continue;
            }
            let py = sy(*y);
            let _ = writeln!(
                o,
                r##"<line class="guide" x1="{LEFT:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#555" stroke-dasharray="5,4"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="start" fill="#555">{}</text>"##,
                LEFT + pw + 6.0,
                py + 4.0,
                esc(label)
            );
        }
        // Series: a polyline and a marker per point, clipped to the plot area.
        let _ = writeln!(
            o,
            r#"<clipPath id="plot"><rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}"/></clipPath>"#
        );
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(x, y)| (sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                o,
                r#"<g class="series" clip-path="url(#plot)"><title>{}</title>"#,
                esc(&s.name)
            );
            let coords: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                o,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                coords.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}"/>"#
                );
            }
            let _ = writeln!(o, "</g>");
        }
        // Legend, right of the plot.
        let lx = LEFT + pw + 14.0;
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let ly = TOP + 40.0 + 20.0 * i as f64;
            let _ = writeln!(
                o,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{colour}"/>"#,
                lx + 22.0,
                lx + 11.0
            );
            let _ = writeln!(
                o,
                r#"<text class="legend" x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 28.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
        o.push_str("</svg>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> LineChart {
        LineChart {
            title: "Sensitivity <LeNet-5> & co".into(),
            x_label: "sparsity (%)".into(),
            y_label: "accuracy (%)".into(),
            series: vec![
                Series {
                    name: "conv1".into(),
                    points: vec![(0.0, 99.2), (50.0, 99.0), (90.0, 80.0)],
                },
                Series {
                    name: "fc1".into(),
                    points: vec![(0.0, 99.2), (50.0, 99.2), (f64::NAN, 1.0), (90.0, 98.9)],
                },
            ],
            x_range: Some((0.0, 100.0)),
            y_range: None,
            guides: vec![(99.2, "unpruned".into())],
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 10),
            (0..=10).map(|k| k as f64 * 10.0).collect::<Vec<_>>()
        );
        let t = nice_ticks(80.0, 99.27, 8);
        assert_eq!(t.first(), Some(&80.0));
        assert_eq!(t.last(), Some(&100.0));
        assert_eq!(t, vec![80.0, 85.0, 90.0, 95.0, 100.0]);
        let t = nice_ticks(0.31, 0.52, 5);
        assert_eq!(t, vec![0.3, 0.35, 0.4, 0.45, 0.5, 0.55]);
        assert_eq!(decimals(&t), 2);
        assert_eq!(nice_ticks(5.0, 5.0, 4), vec![4.0, 4.5, 5.0, 5.5, 6.0]);
    }

    #[test]
    fn svg_is_well_formed_and_holds_every_series() {
        let svg = chart().to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Every element opened is closed (self-closing or paired), in nesting order.
        let mut stack = Vec::new();
        let mut rest = svg.as_str();
        while let Some(i) = rest.find('<') {
            let j = rest[i..].find('>').expect("unterminated tag") + i;
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.to_string()), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
            rest = &rest[j + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        // Text is escaped, and each series has its line, its markers and a legend entry.
        assert!(svg.contains("Sensitivity &lt;LeNet-5&gt; &amp; co"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("class=\"legend\"").count(), 2);
        assert!(svg.contains(">conv1</text>") && svg.contains(">fc1</text>"));
        // The NaN point is skipped: 3 + 3 markers, plus one per legend entry.
        assert_eq!(svg.matches("<circle").count(), 3 + 3 + 2);
        assert!(!svg.contains("NaN"));
        // The y axis spans the data and the guide with round ticks; the x range is as given.
        // (x ticks are multiples of 10, so 85 and 95 can only be y ticks).
        assert!(svg.contains(">85</text>") && svg.contains(">95</text>"));
        assert!(!svg.contains(">75</text>") && !svg.contains(">105</text>"));
        assert!(svg.contains("class=\"guide\"") && svg.contains(">unpruned</text>"));
        // The picture is wide enough for the longest legend entry.
        let long = LineChart {
            series: vec![Series {
                name: "x".repeat(60),
                points: vec![(0.0, 1.0)],
            }],
            ..chart()
        };
        let svg = long.to_svg();
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(width >= LEFT + PLOT_W + 60.0 * 6.0, "{width}");
    }

    #[test]
    fn points_map_into_the_plot_area() {
        let svg = chart().to_svg();
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let coords: Vec<(f64, f64)> = line
            .split('"')
            .nth(1)
            .unwrap()
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        // x = 0 sits on the left edge, x = 90 at 90% of the width; larger y is higher up.
        assert_eq!(coords[0].0, LEFT);
        assert!((coords[2].0 - (LEFT + 0.9 * PLOT_W)).abs() < 0.1);
        assert!(coords[0].1 < coords[2].1);
        for (x, y) in coords {
            assert!((LEFT..=LEFT + PLOT_W).contains(&x) && (TOP..=HEIGHT - BOTTOM).contains(&y));
        }
    }
}
