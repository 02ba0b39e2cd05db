//! Charts for reports, drawn with `plotters` as standalone SVG files: line charts (training
//! curves, sensitivity curves, accuracy against time or size) and grouped bar charts
//! (per-layer kept fractions and bits).
//!
//! Only plotters' SVG backend is built: PNG output would need a font file at run time (its
//! bitmap backend rasterises text), which a clean machine does not have. The legend is drawn
//! in its own panel right of the plot, so it never hides data.

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// `(x, y)` in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart in data coordinates; ranges default to the data's, with a margin.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Horizontal dashed lines at `y`, with a label.
    pub guides: Vec<(f64, String)>,
    /// Logarithmic x axis (sizes in bytes spanning orders of magnitude).
    pub log_x: bool,
    /// Text beside chosen points: `(x, y, text)`.
    pub notes: Vec<(f64, f64, String)>,
}

/// Grouped bars: one group per category, one bar per series in each group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// `(name, one value per category)`; NaN leaves a gap.
    pub series: Vec<(String, Vec<f64>)>,
    pub y_range: Option<(f64, f64)>,
}

/// Tableau 10: distinguishable colours, also in grey-scale print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];
const PLOT_W: u32 = 560;
const HEIGHT: u32 = 440;
/// Width of one legend character at font size 13 (generous, so long names are not cut off).
const CHAR_W: u32 = 8;

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// `(lo, hi)` of the finite values, or `None`.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// A data range with 5% margins, widened if it is empty.
fn padded((lo, hi): (f64, f64)) -> (f64, f64) {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// Draws the legend (a colour box and a name per series) into its panel.
fn legend(area: &DrawingArea<SVGBackend, Shift>, names: &[String]) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        let y = 50 + 20 * i as i32;
        area.draw(&Rectangle::new(
            [(8, y - 6), (20, y + 6)],
            colour(i).filled(),
        ))
        .map_err(|e| e.to_string())?;
        area.draw(&Text::new(name.clone(), (26, y - 7), ("sans-serif", 13)))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The SVG document `draw` writes, or one saying why it could not (plotters fails only on
/// impossible layouts; a chart is never worth a panic).
fn svg_of(draw: impl FnOnce(&mut String) -> Result<(), String>) -> String {
    let mut out = String::new();
    match draw(&mut out) {
        Ok(()) => out,
        Err(e) => format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\"><text x=\"10\" y=\"20\">chart failed: {}</text></svg>\n",
            e.replace('<', "&lt;")
        ),
    }
}

/// The picture's width and its legend panel's, wide enough for `names`.
fn layout(names: &[String]) -> (u32, u32) {
    let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    let legend_w = if names.is_empty() {
        0
    } else {
        40 + CHAR_W * longest
    };
    (PLOT_W + 110 + legend_w, legend_w)
}

impl LineChart {
    /// The chart as a complete SVG document.
    pub fn to_svg(&self) -> String {
        svg_of(|out| self.draw(out))
    }

    fn draw(&self, out: &mut String) -> Result<(), String> {
        let names: Vec<String> = self.series.iter().map(|s| s.name.clone()).collect();
        let (width, legend_w) = layout(&names);
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = match self.x_range {
            Some(r) => r,
            None if self.log_x => {
                extent(points().map(|p| p.0).filter(|&x| x > 0.0)).unwrap_or((1.0, 10.0))
            }
            None => padded(extent(points().map(|p| p.0)).unwrap_or((0.0, 1.0))),
        };
        let (y0, y1) = self.y_range.unwrap_or_else(|| {
            let ys = points().map(|p| p.1).chain(self.guides.iter().map(|g| g.0));
            padded(extent(ys).unwrap_or((0.0, 1.0)))
        });
        let root = SVGBackend::with_string(out, (width, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (plot, side) = root.split_horizontally(width - legend_w);
        legend(&side, &names)?;
        if self.log_x {
            let lo = x0.max(f64::MIN_POSITIVE);
            let hi = x1.max(lo * 1.0001);
            self.draw_on(&plot, (lo / 1.5..hi * 1.5).log_scale(), y0..y1)
        } else {
            self.draw_on(&plot, x0..x1, y0..y1)
        }
    }

    fn draw_on<X>(
        &self,
        area: &DrawingArea<SVGBackend, Shift>,
        x: X,
        y: std::ops::Range<f64>,
    ) -> Result<(), String>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x, y.clone())
            .map_err(err)?;
        let log_x = self.log_x;
        let label = move |x: &f64| {
            if log_x {
                short_number(*x)
            } else {
                let s = format!("{x:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            }
        };
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_labels(8)
            .x_label_formatter(&label)
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .light_line_style(TRANSPARENT)
            .axis_style(TRANSPARENT)
            .draw()
            .map_err(err)?;
        let (gx0, gx1) = {
            let r = chart.x_range();
            (r.start, r.end)
        };
        frame(&chart.plotting_area().strip_coord_spec())?;
        for (y, label) in self.guides.iter().filter(|g| g.0.is_finite()) {
            // Dashes as thin rectangles: plotters' dashed paths would be drawn as polylines,
            // which readers of the SVG count as series.
            let n = 40;
            for k in 0..n {
                let f = |t: f64| {
                    if self.log_x {
                        gx0 * (gx1 / gx0).powf(t)
                    } else {
                        gx0 + (gx1 - gx0) * t
                    }
                };
                let (a, b) = (f(k as f64 / n as f64), f((k as f64 + 0.5) / n as f64));
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(a, *y), (b, *y)],
                        BLACK.mix(0.6).stroke_width(1),
                    )))
                    .map_err(err)?;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    label.clone(),
                    (f_at(gx0, gx1, 0.02, self.log_x), *y),
                    ("sans-serif", 12),
                )))
                .map_err(err)?;
        }
        for (i, s) in self.series.iter().enumerate() {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!self.log_x || p.0 > 0.0))
                .collect();
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?;
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        for (x, y, text) in &self.notes {
            if x.is_finite() && y.is_finite() {
                chart
                    .draw_series(std::iter::once(Text::new(
                        text.clone(),
                        (*x, *y),
                        ("sans-serif", 12),
                    )))
                    .map_err(err)?;
            }
        }
        area.present().map_err(err)
    }
}

/// A black frame around a plot. plotters draws axes as paths (`<polyline>` in SVG); drawn as a
/// rectangle instead, a chart's polylines are exactly its series, which tests and readers
/// of the files can count.
fn frame(area: &DrawingArea<SVGBackend, Shift>) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(0, 0), (w as i32 - 1, h as i32 - 1)],
        BLACK.stroke_width(1),
    ))
    .map_err(|e| e.to_string())
}

/// `40k`, `1.7M`: tick labels of a log axis over sizes.
fn short_number(x: f64) -> String {
    let (v, unit) = match x.abs() {
        a if a >= 1e9 => (x / 1e9, "G"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    let s = format!("{v:.1}");
    format!("{}{unit}", s.trim_end_matches(".0"))
}

/// The x at fraction `t` of `[lo, hi]`, on a linear or logarithmic axis.
fn f_at(lo: f64, hi: f64, t: f64, log: bool) -> f64 {
    if log {
        lo * (hi / lo).powf(t)
    } else {
        lo + (hi - lo) * t
    }
}

impl BarChart {
    /// The chart as a complete SVG document.
    pub fn to_svg(&self) -> String {
        svg_of(|out| self.draw(out))
    }

    fn draw(&self, out: &mut String) -> Result<(), String> {
        let names: Vec<String> = self.series.iter().map(|s| s.0.clone()).collect();
        let (width, legend_w) = layout(&names);
        let (y0, y1) = self.y_range.unwrap_or_else(|| {
            let (lo, hi) =
                extent(self.series.iter().flat_map(|s| s.1.iter().copied())).unwrap_or((0.0, 1.0));
            (lo.min(0.0), hi.max(lo + 1e-9) * 1.08)
        });
        let root = SVGBackend::with_string(out, (width, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (plot, side) = root.split_horizontally(width - legend_w);
        legend(&side, &names)?;
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let n = self.categories.len().max(1);
        let mut chart = ChartBuilder::on(&plot)
            .caption(&self.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(70)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(self.y_label.as_str())
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .light_line_style(TRANSPARENT)
            .axis_style(TRANSPARENT)
            .draw()
            .map_err(err)?;
        frame(&chart.plotting_area().strip_coord_spec())?;
        // Category names under their groups, placed in pixels (the axis has no ticks there).
        for (i, name) in self.categories.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, y0));
            let style = TextStyle::from(("sans-serif", 13).into_font()).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            );
            plot.draw(&Text::new(name.clone(), (px, py + 6), style))
                .map_err(err)?;
        }
        let k = self.series.len().max(1) as f64;
        let w = 0.8 / k;
        for (j, (_, values)) in self.series.iter().enumerate() {
            let bars = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| {
                    let x = i as f64 + 0.1 + w * j as f64;
                    Rectangle::new(
                        [(x, y0.max(0.0).min(v)), (x + w * 0.9, v)],
                        colour(j).filled(),
                    )
                });
            chart.draw_series(bars).map_err(err)?;
        }
        plot.present().map_err(err)
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
            guides: vec![(99.2, "unpruned".into())],
            ..Default::default()
        }
    }

    /// Every element opened is closed (self-closing or paired), in nesting order.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let j = rest[i..].find('>').expect("unterminated tag") + i;
            let tag = &rest[i + 1..j];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.to_string()), "mismatched </{name}>");
            } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
            rest = &rest[j + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn line_chart_is_well_formed_and_holds_every_series() {
        let svg = chart().to_svg();
        assert_well_formed(&svg);
        // Text is escaped; each series has one line and one marker per finite point, and a
        // legend entry; the NaN point is skipped.
        assert!(
            svg.contains("Sensitivity &lt;LeNet-5&gt; &amp; co"),
            "{svg}"
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3 + 3);
        assert!(svg.contains("conv1") && svg.contains("fc1") && svg.contains("unpruned"));
        assert!(!svg.contains("NaN"));
        // The picture widens to hold a long legend entry.
        let long = LineChart {
            series: vec![Series {
                name: "x".repeat(60),
                points: vec![(0.0, 1.0)],
            }],
            ..chart()
        };
        let width = |svg: &str| -> f64 {
            svg.split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(width(&long.to_svg()) >= width(&svg) + 50.0 * CHAR_W as f64);
    }

    #[test]
    fn log_axis_and_notes_draw_positive_points() {
        let c = LineChart {
            title: "accuracy against size".into(),
            series: vec![Series {
                name: "run".into(),
                points: vec![(1.7e6, 99.3), (4.1e4, 99.2), (0.0, 50.0)],
            }],
            log_x: true,
            notes: vec![(4.1e4, 99.2, "encode".into())],
            ..Default::default()
        };
        let svg = c.to_svg();
        assert_well_formed(&svg);
        assert_eq!(
            svg.matches("<circle").count(),
            2,
            "x = 0 has no place on a log axis"
        );
        assert!(svg.contains("encode"));
    }

    #[test]
    fn bar_chart_draws_one_bar_per_finite_value() {
        let c = BarChart {
            title: "kept per layer".into(),
            y_label: "kept (%)".into(),
            categories: vec!["conv1".into(), "fc1".into(), "fc2".into()],
            series: vec![
                ("prune".into(), vec![100.0, 7.0, 7.0]),
                ("share".into(), vec![100.0, f64::NAN, 7.0]),
            ],
            y_range: Some((0.0, 100.0)),
        };
        let svg = c.to_svg();
        assert_well_formed(&svg);
        assert!(svg.contains("conv1") && svg.contains("fc2") && svg.contains("share"));
        // Five bars, two legend boxes, the background and the frame.
        assert_eq!(svg.matches("<rect").count(), 5 + 2 + 2);
        assert_eq!(svg.matches("<polyline").count(), 0);
    }
}
