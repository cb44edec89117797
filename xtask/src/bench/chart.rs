//! The bench chart: one horizontal bar per (metric, variant), as a ratio to direct, grouped by
//! workload, with an x axis in "× direct", the line at 1.0 and each metric's target drawn where
//! one is set. Hand-written SVG (readable in any browser, no plotting dependency), built from a
//! plain model so its layout is tested without running a bench.

/// A chart's content, in the order it is drawn.
pub struct Chart {
    pub title: String,
    /// Variants with a bar in every row, and their colours.
    pub series: Vec<(&'static str, &'static str)>,
    pub groups: Vec<Group>,
}

/// One workload: a heading and its metrics.
pub struct Group {
    pub title: String,
    pub rows: Vec<Row>,
}

pub struct Row {
    /// The metric, its unit and which way is better.
    pub label: String,
    pub target: Option<Target>,
    /// One per series.
    pub cells: Vec<Cell>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell {
    /// The variant has no path for this workload.
    NotApplicable,
    Failed,
    Ratio(f64),
}

/// What the project aims for, as a ratio to direct: at least `ratio` when higher is better,
/// at most when lower is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    pub ratio: f64,
    pub higher_is_better: bool,
}

const W: f64 = 960.0;
const BAR: f64 = 14.0;
const ROW_GAP: f64 = 10.0;
const GROUP_HEAD: f64 = 22.0;
const TOP: f64 = 78.0;
const FONT: f64 = 11.0;
/// Wider than the average sans-serif glyph at [`FONT`] px, so an estimated width never
/// undershoots (the old chart clipped its labels on the left by guessing too narrow).
const CHAR_W: f64 = 6.6;
/// Right of the longest bar: room for its value, e.g. `10.00 (cut)`.
const VALUE_ROOM: f64 = 11.0 * CHAR_W + 10.0;
/// Ratios beyond this are drawn cut, with their value.
const MAX_RATIO: f64 = 10.0;

/// Estimated rendered width of `s` at the chart's font size.
pub fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_W
}

impl Chart {
    /// The left margin: the longest metric label and a gap, so no label is cut. (Workload
    /// headings have a line of their own, across the whole chart.)
    fn label_width(&self) -> f64 {
        let longest = self
            .groups
            .iter()
            .flat_map(|g| g.rows.iter().map(|r| text_width(&r.label)))
            .fold(0.0, f64::max);
        longest + 20.0
    }

    /// Wide enough for the bars and for the longest workload heading.
    fn width(&self, label_w: f64) -> f64 {
        let heading = self
            .groups
            .iter()
            .map(|g| text_width(&g.title) * 1.1 + 20.0)
            .fold(0.0, f64::max);
        W.max(label_w + 400.0).max(heading)
    }

    fn max_ratio(&self) -> f64 {
        self.groups
            .iter()
            .flat_map(|g| &g.rows)
            .flat_map(|r| {
                r.cells
                    .iter()
                    .filter_map(|c| match c {
                        Cell::Ratio(x) => Some(*x),
                        _ => None,
                    })
                    .chain(r.target.map(|t| t.ratio))
            })
            .fold(1.25, f64::max)
            .min(MAX_RATIO)
    }

    fn row_height(&self) -> f64 {
        BAR * self.series.len().max(1) as f64 + ROW_GAP
    }

    pub fn to_svg(&self) -> String {
        let label_w = self.label_width();
        let width = self.width(label_w);
        let max = axis_end(self.max_ratio());
        let scale = (width - label_w - VALUE_ROOM) / max;
        let x_of = |r: f64| label_w + r.min(max) * scale;
        let rows: usize = self.groups.iter().map(|g| g.rows.len()).sum();
        let plot_h = GROUP_HEAD * self.groups.len() as f64 + self.row_height() * rows as f64;
        let bottom = TOP + plot_h;
        let height = bottom + 46.0;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
             font-family=\"sans-serif\" font-size=\"{FONT}\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\">{}</text>\n",
            xml(&self.title)
        );
        // Legend: the series, then what the dashed lines mean.
        let mut x = 10.0;
        for (name, colour) in &self.series {
            s.push_str(&format!(
                "<rect x=\"{x}\" y=\"34\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
                 <text x=\"{}\" y=\"44\">{}</text>\n",
                x + 16.0,
                xml(name)
            ));
            x += 16.0 + text_width(name) + 18.0;
        }
        s.push_str(&format!(
            "<line x1=\"{x}\" y1=\"40\" x2=\"{}\" y2=\"40\" stroke=\"#c0392b\" stroke-width=\"2\" \
             stroke-dasharray=\"3 2\"/><text x=\"{}\" y=\"44\">target</text>\n",
            x + 18.0,
            x + 24.0
        ));
        // Axis: ticks and grid lines in "× direct".
        let step = tick_step(max);
        let mut t = 0.0;
        while t <= max + 1e-9 {
            let x = x_of(t);
            s.push_str(&format!(
                "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#e4e4e4\"/>\
                 <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}×</text>\n",
                bottom + 14.0,
                trim(t)
            ));
            t += step;
        }
        let one = x_of(1.0);
        s.push_str(&format!(
            "<line x1=\"{one:.1}\" y1=\"{}\" x2=\"{one:.1}\" y2=\"{bottom}\" stroke=\"black\" \
             stroke-dasharray=\"4 3\"/>\
             <text x=\"{one:.1}\" y=\"{}\" text-anchor=\"middle\">1.0 = direct</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">ratio to direct (× direct), \
             median over repetitions</text>\n",
            TOP - 6.0,
            TOP - 10.0,
            label_w + (width - label_w - VALUE_ROOM) / 2.0,
            bottom + 32.0
        ));
        let mut y = TOP;
        for g in &self.groups {
            s.push_str(&format!(
                "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{}</text>\n",
                y + 15.0,
                xml(&g.title)
            ));
            y += GROUP_HEAD;
            for r in &g.rows {
                self.push_row(&mut s, r, y, label_w, &x_of);
                y += self.row_height();
            }
        }
        s.push_str("</svg>\n");
        s
    }

    fn push_row(&self, s: &mut String, r: &Row, y0: f64, label_w: f64, x_of: &dyn Fn(f64) -> f64) {
        let h = self.row_height() - ROW_GAP;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            label_w - 8.0,
            y0 + h / 2.0 + 4.0,
            xml(&r.label)
        ));
        for (k, cell) in r.cells.iter().enumerate() {
            let y = y0 + BAR * k as f64;
            let colour = self.series.get(k).map_or("#000000", |(_, c)| c);
            match cell {
                Cell::NotApplicable => {}
                Cell::Ratio(v) => {
                    let end = x_of(*v);
                    let cut = if *v > MAX_RATIO { " (cut)" } else { "" };
                    s.push_str(&format!(
                        "<rect x=\"{label_w}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>\
                         <text x=\"{:.1}\" y=\"{}\">{v:.2}{cut}</text>\n",
                        (end - label_w).max(1.0),
                        BAR - 2.0,
                        end + 4.0,
                        y + BAR - 4.0
                    ));
                }
                Cell::Failed => s.push_str(&format!(
                    "<text x=\"{}\" y=\"{}\" fill=\"red\">failed</text>\n",
                    label_w + 4.0,
                    y + BAR - 4.0
                )),
            }
        }
        if let Some(t) = r.target {
            let x = x_of(t.ratio);
            s.push_str(&format!(
                "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#c0392b\" \
                 stroke-width=\"2\" stroke-dasharray=\"3 2\"><title>target {} {}</title></line>\n",
                y0 - 2.0,
                y0 + h + 2.0,
                if t.higher_is_better { "≥" } else { "≤" },
                trim(t.ratio)
            ));
        }
    }
}

/// Where the axis ends: the next tick at or above `max`.
fn axis_end(max: f64) -> f64 {
    let step = tick_step(max);
    (max / step).ceil() * step
}

fn tick_step(max: f64) -> f64 {
    if max <= 2.0 {
        0.25
    } else if max <= 5.0 {
        0.5
    } else {
        1.0
    }
}

/// `1.50` as `1.5`, `2.00` as `2`.
fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(ratios: &[f64]) -> Chart {
        Chart {
            title: "t".into(),
            series: vec![("sockmesh", "#2a7ab0"), ("haproxy", "#7a7a7a")],
            groups: vec![Group {
                title:
                    "new connections to a meshed server (inbound; wrk, Connection: close, 8 conns)"
                        .into(),
                rows: vec![Row {
                    label: "rate (conn/s, higher better)".into(),
                    target: Some(Target {
                        ratio: 0.9,
                        higher_is_better: true,
                    }),
                    cells: ratios.iter().map(|r| Cell::Ratio(*r)).collect(),
                }],
            }],
        }
    }

    /// Every `text-anchor="end"` label starts right of the left edge, and every other text
    /// ends left of the right edge: nothing is clipped (what the old chart got wrong).
    #[test]
    fn no_label_is_clipped() {
        for ratios in [[0.5, 0.7], [3.0, 12.0]] {
            let svg = chart(&ratios).to_svg();
            let width: f64 = attr(&svg, "<svg", "width").parse().expect("width");
            for el in svg.split("<text").skip(1) {
                let x: f64 = attr(el, "", "x").parse().expect("x");
                let text = &el[el.find('>').expect(">") + 1..el.find("</text>").expect("end")];
                let w = text_width(text);
                if el.contains("text-anchor=\"end\"") {
                    assert!(x - w >= 0.0, "{text:?} clipped on the left: x={x} w={w}");
                } else if el.contains("text-anchor=\"middle\"") {
                    assert!(x - w / 2.0 >= 0.0 && x + w / 2.0 <= width, "{text:?}");
                } else {
                    assert!(x + w <= width, "{text:?} clipped on the right: x={x} w={w}");
                }
            }
        }
    }

    #[test]
    fn draws_the_axis_with_units_and_the_targets() {
        let svg = chart(&[0.5, 0.7]).to_svg();
        assert!(svg.contains(">0.5×</text>"), "{svg}");
        assert!(svg.contains(">1×</text>"), "{svg}");
        assert!(svg.contains("ratio to direct (× direct)"), "{svg}");
        assert!(svg.contains("<title>target ≥ 0.9</title>"), "{svg}");
        assert!(svg.contains(">0.70</text>"), "{svg}");
    }

    #[test]
    fn a_ratio_off_the_scale_is_cut_and_says_so() {
        let svg = chart(&[0.5, 40.0]).to_svg();
        assert!(svg.contains(">40.00 (cut)</text>"), "{svg}");
    }

    #[test]
    fn ticks_end_at_or_past_the_largest_ratio() {
        assert_eq!(axis_end(1.3), 1.5);
        assert_eq!(axis_end(4.2), 4.5);
        assert_eq!(axis_end(7.5), 8.0);
        assert_eq!(trim(1.5), "1.5");
        assert_eq!(trim(2.0), "2");
    }

    fn attr<'a>(s: &'a str, after: &str, name: &str) -> &'a str {
        let s = &s[s.find(after).expect("element")..];
        let key = format!(" {name}=\"");
        let i = s.find(&key).expect("attribute") + key.len();
        &s[i..i + s[i..].find('"').expect("quote")]
    }
}
