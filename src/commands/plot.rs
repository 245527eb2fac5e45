//! An SVG drawing of a `bench` sweep: median time and bytes transferred against gap size, a line
//! per concurrency and part size, so the knee is visible at a glance.

use std::fmt::Write;

use super::bench::{BenchReport, Setting};
use crate::units::human;

const WIDTH: f64 = 900.0;
const PANEL: f64 = 380.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 270.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];
/// After every color is used once, the lines are dashed, then dotted.
const DASHES: [&str; 3] = ["", "8 4", "2 3"];

/// A value on an axis with about three significant digits.
fn tick(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The gap sizes in the order of the sweep, and each setting's series (concurrency, part size).
fn axes(r: &BenchReport) -> (Vec<Option<u64>>, Vec<(u32, u64)>) {
    let mut gaps = Vec::new();
    let mut series = Vec::new();
    for s in &r.results {
        if !gaps.contains(&s.max_gap_size) {
            gaps.push(s.max_gap_size);
        }
        if !series.contains(&(s.concurrency, s.part_size)) {
            series.push((s.concurrency, s.part_size));
        }
    }
    (gaps, series)
}

/// A panel at vertical offset `y0`: `value` of each setting against the gap size.
fn panel(
    out: &mut String,
    r: &BenchReport,
    y0: f64,
    title: &str,
    unit: &str,
    value: &dyn Fn(&Setting) -> f64,
) {
    let (gaps, series) = axes(r);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = PANEL - TOP - BOTTOM;
    let max = r
        .results
        .iter()
        .map(value)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.1;
    let x = |i: usize| {
        LEFT + if gaps.len() > 1 {
            plot_w * i as f64 / (gaps.len() - 1) as f64
        } else {
            plot_w / 2.0
        }
    };
    let y = |v: f64| y0 + TOP + plot_h * (1.0 - v / max);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="16" font-weight="bold">{}</text>"#,
        y0 + 28.0,
        escape(title)
    );
    // Axes, grid and labels.
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>"##,
        y0 + TOP
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let (x2, yv, xl, yl) = (LEFT + plot_w, y(v), LEFT - 6.0, y(v) + 4.0);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{yv}" y2="{yv}" stroke="#ddd"/><text x="{xl}" y="{yl}" font-size="12" text-anchor="end">{} {unit}</text>"##,
            tick(v)
        );
    }
    for (i, g) in gaps.iter().enumerate() {
        let label = g.map_or_else(|| "inf".to_owned(), human);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            x(i),
            y0 + PANEL - BOTTOM + 18.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">max gap size</text>"#,
        LEFT + plot_w / 2.0,
        y0 + PANEL - 18.0
    );
    // A line per series.
    for (k, (conc, part)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let dash = DASHES[(k / COLORS.len()) % DASHES.len()];
        let points: Vec<String> = gaps
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                let s = r.results.iter().find(|s| {
                    s.max_gap_size == *g && s.concurrency == *conc && s.part_size == *part
                })?;
                Some(format!("{:.1},{:.1}", x(i), y(value(s))))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" points="{}"/>"#,
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').expect("x,y");
            let _ = writeln!(
                out,
                r#"<circle cx="{px}" cy="{py}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = y0 + TOP + 18.0 * k as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3" stroke-dasharray="{dash}"/><text x="{2}" y="{3}" font-size="12">concurrency {conc}, part {4}</text>"#,
            WIDTH - RIGHT + 15.0,
            WIDTH - RIGHT + 40.0,
            WIDTH - RIGHT + 46.0,
            ly + 4.0,
            escape(&human(*part))
        );
    }
}

/// The whole drawing.
pub fn svg(r: &BenchReport) -> String {
    let mut out = String::new();
    let height = 2.0 * PANEL + 30.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="13">{} — {} items, {} needed, {} sink, median of {} runs</text>"#,
        escape(&r.checkpoint),
        r.items,
        escape(&human(r.bytes_needed)),
        r.sink,
        r.runs_per_setting
    );
    panel(&mut out, r, 10.0, "Time to fetch (median)", "s", &|s| {
        s.seconds.median
    });
    panel(
        &mut out,
        r,
        10.0 + PANEL,
        "Bytes transferred",
        "MiB",
        &|s| s.bytes_transferred as f64 / (1u64 << 20) as f64,
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::super::bench::Seconds;
    use super::*;

    #[test]
    fn draws_a_line_per_series() {
        let setting = |gap: Option<u64>, conc: u32, secs: f64| Setting {
            max_gap_size: gap,
            concurrency: conc,
            part_size: 8 << 20,
            groups: 1,
            requests: 1,
            requests_sent: 1,
            bytes_needed: 100,
            bytes_transferred: 150,
            wasted_share: 0.33,
            seconds: Seconds {
                median: secs,
                min: secs,
                max: secs,
                runs: vec![secs],
            },
            throughput_bytes_per_second: 1.0,
            peak_memory: 0,
            peak_rss: None,
        };
        let r = BenchReport {
            checkpoint: "s3://b/<ck>".into(),
            sink: "null",
            items: 3,
            bytes_needed: 100,
            runs_per_setting: 1,
            interrupted: false,
            results: vec![
                setting(Some(0), 4, 1.0),
                setting(None, 4, 0.5),
                setting(Some(0), 16, 0.4),
                setting(None, 16, 0.2),
            ],
        };
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<polyline").count(),
            4,
            "two series in two panels"
        );
        assert!(
            svg.contains("concurrency 16") && svg.contains(">inf<") && svg.contains("&lt;ck&gt;")
        );
    }
}
