//! An SVG plot of each model's window: generated tokens per second and, where a meter was
//! used, power. Written directly (a few polylines need no plotting library).

use std::fmt::Write;

use super::report::BenchReport;

const W: f64 = 800.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel: a line per model of (t, value) points.
fn panel(svg: &mut String, top: f64, title: &str, unit: &str, series: &[(String, Vec<(f64, f64)>)]) {
    let t_max = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0f64, f64::max);
    let v_max = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, top + PANEL_H - 30.0, top + 30.0);
    let x = |t: f64| x0 + (x1 - x0) * t / t_max;
    let y = |v: f64| y0 - (y0 - y1) * v / v_max;
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#, top + 18.0, escape(title));
    let _ = writeln!(svg, r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#999"/>"##, x1 - x0, y0 - y1);
    for i in 0..=4 {
        let v = v_max * i as f64 / 4.0;
        let _ = writeln!(svg, r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{v:.1}</text><line x1="{x0}" x2="{x1}" y1="{2}" y2="{2}" stroke="#eee"/>"##, x0 - 6.0, y(v) + 4.0, y(v));
        let t = t_max * i as f64 / 4.0;
        let digits = if t_max < 10.0 { 1 } else { 0 };
        let _ = writeln!(svg, r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{t:.digits$} s</text>"#, x(t), y0 + 16.0);
    }
    let _ = writeln!(svg, r#"<text x="14" y="{}" font-size="11" transform="rotate(-90 14 {0})">{}</text>"#, (y0 + y1) / 2.0, escape(unit));
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        let _ = writeln!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#, pts.join(" "));
        // Legend in the title row, right-aligned, one entry per model.
        let _ = writeln!(svg, r#"<text x="{}" y="{}" font-size="12" text-anchor="end" fill="{color}">{}</text>"#, x1, top + 12.0 + 13.0 * i as f64, escape(name));
    }
}

pub fn svg(report: &BenchReport) -> String {
    let tok: Vec<(String, Vec<(f64, f64)>)> = report
        .models
        .iter()
        .map(|m| (m.model.label(), m.timeline.iter().map(|p| (p.t_s, p.generated_tok_s)).collect()))
        .collect();
    let power: Vec<(String, Vec<(f64, f64)>)> = report
        .models
        .iter()
        .map(|m| (m.model.label(), m.timeline.iter().filter_map(|p| Some((p.t_s, p.power_w?))).collect::<Vec<_>>()))
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    let panels = if power.is_empty() { 1.0 } else { 2.0 };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
        PANEL_H * panels
    );
    svg.push('\n');
    panel(&mut svg, 0.0, "Generated tokens per second over the window", "tok/s", &tok);
    if !power.is_empty() {
        let scope = report.meter.as_ref().map(|m| format!("{:?}", m.scope)).unwrap_or_default();
        panel(&mut svg, PANEL_H, &format!("Power over the window ({scope})"), "W", &power);
    }
    svg.push_str("</svg>\n");
    svg
}
