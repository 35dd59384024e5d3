//! `tmoctl outcomes report`: what a fleet manager looks at, per policy version and per day, on
//! the latest version of each row: turns, route mix, fallback rate, mean score, latency and
//! cost percentiles, budget exhaustion. As rows (a table or JSON in tmoctl) and PNG charts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::schema::Columns;
use crate::{DataError, OutcomeStore};

/// One policy version on one day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    pub policy_version: String,
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Rows (latest versions).
    pub turns: u64,
    /// Devices that logged them.
    pub devices: u64,
    /// Share of turns whose action was a local answer.
    pub local_share: f64,
    /// Share of turns sent to the cloud without attachments.
    pub cloud_text_share: f64,
    /// Share of turns sent to the cloud with at least one attachment.
    pub cloud_attach_share: f64,
    /// Share of turns whose answer came another way than the action (the cloud failed, was
    /// unreachable ...: the row's `route`).
    pub fallback_rate: f64,
    /// Share of turns the app forced to a route.
    pub forced_share: f64,
    /// Turns with a score.
    pub scored: u64,
    /// Mean score of those (none without any).
    pub mean_score: Option<f64>,
    pub latency_p50_secs: f64,
    pub latency_p90_secs: f64,
    pub latency_p99_secs: f64,
    pub cost_p50_usd: f64,
    pub cost_p90_usd: f64,
    pub cost_p99_usd: f64,
    pub cost_total_usd: f64,
    /// Share of turns that took more than the remaining latency or usage budget the policy
    /// saw (over the turns whose observation holds the budgets).
    pub budget_exhausted_share: Option<f64>,
}

/// The report's query (one row per policy version and day, in that order). Percentiles are
/// the engine's approximate ones (t-digest): exact for small groups, within a fraction of a
/// percent of the rank beyond.
const REPORT_SQL: &str = "
SELECT policy_version, day,
  count(*) AS turns,
  count(DISTINCT device_id) AS devices,
  avg(CASE WHEN action_kind = 'local' THEN 1.0 ELSE 0.0 END) AS local_share,
  avg(CASE WHEN action_kind = 'cloud' AND action_modalities = 0 THEN 1.0 ELSE 0.0 END) AS cloud_text_share,
  avg(CASE WHEN action_kind = 'cloud' AND action_modalities <> 0 THEN 1.0 ELSE 0.0 END) AS cloud_attach_share,
  avg(CASE WHEN route IS NOT NULL THEN 1.0 ELSE 0.0 END) AS fallback_rate,
  avg(CASE WHEN forced THEN 1.0 ELSE 0.0 END) AS forced_share,
  count(score) AS scored,
  avg(score) AS mean_score,
  approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_secs) AS latency_p50_secs,
  approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY latency_secs) AS latency_p90_secs,
  approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_secs) AS latency_p99_secs,
  approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY cost_usd) AS cost_p50_usd,
  approx_percentile_cont(0.9) WITHIN GROUP (ORDER BY cost_usd) AS cost_p90_usd,
  approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY cost_usd) AS cost_p99_usd,
  sum(cost_usd) AS cost_total_usd,
  avg(CASE WHEN budget_latency_secs IS NULL THEN NULL
           WHEN latency_secs > budget_latency_secs OR cost_usd > budget_usd THEN 1.0 ELSE 0.0 END)
    AS budget_exhausted_share
FROM day_outcomes
GROUP BY policy_version, day
ORDER BY policy_version, day";

/// The report of the dataset's latest versions, computed day by day (a query holds one day).
pub async fn report(store: &OutcomeStore) -> Result<Vec<ReportRow>, DataError> {
    let mut batches = Vec::new();
    let days: Vec<String> = store.days().map(str::to_owned).collect();
    for day in days {
        store.select_day(&day).await?;
        batches.extend(store.collect(REPORT_SQL).await?);
    }
    let mut rows = Vec::new();
    for batch in batches {
        let c = Columns::new(&batch);
        let (version, day) = (c.strings("policy_version")?, c.strings("day")?);
        let count = |name: &str| -> Result<Vec<u64>, DataError> {
            Ok(c.ints(name)?.into_iter().map(|v| v.unwrap_or(0).max(0) as u64).collect())
        };
        let (turns, devices, scored) = (count("turns")?, count("devices")?, count("scored")?);
        let f = |name: &str| c.floats(name);
        let (local, text, attach, fallback, forced) = (
            f("local_share")?,
            f("cloud_text_share")?,
            f("cloud_attach_share")?,
            f("fallback_rate")?,
            f("forced_share")?,
        );
        let (score, exhausted, cost_total) =
            (f("mean_score")?, f("budget_exhausted_share")?, f("cost_total_usd")?);
        let latency = [f("latency_p50_secs")?, f("latency_p90_secs")?, f("latency_p99_secs")?];
        let cost = [f("cost_p50_usd")?, f("cost_p90_usd")?, f("cost_p99_usd")?];
        for i in 0..batch.num_rows() {
            let v = |c: &[Option<f64>]| c[i].unwrap_or(0.0);
            rows.push(ReportRow {
                policy_version: version.value(i).to_owned(),
                day: day.value(i).to_owned(),
                turns: turns[i],
                devices: devices[i],
                local_share: v(&local),
                cloud_text_share: v(&text),
                cloud_attach_share: v(&attach),
                fallback_rate: v(&fallback),
                forced_share: v(&forced),
                scored: scored[i],
                mean_score: score[i],
                latency_p50_secs: v(&latency[0]),
                latency_p90_secs: v(&latency[1]),
                latency_p99_secs: v(&latency[2]),
                cost_p50_usd: v(&cost[0]),
                cost_p90_usd: v(&cost[1]),
                cost_p99_usd: v(&cost[2]),
                cost_total_usd: v(&cost_total),
                budget_exhausted_share: exhausted[i],
            });
        }
    }
    rows.sort_by(|a, b| (&a.policy_version, &a.day).cmp(&(&b.policy_version, &b.day)));
    Ok(rows)
}

/// Where charts find their font: `font` if given, else the usual places of DejaVu Sans or
/// Liberation Sans.
pub fn find_font(font: Option<&Path>) -> Result<PathBuf, DataError> {
    const CANDIDATES: [&str; 5] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    if let Some(font) = font {
        return Ok(font.to_owned());
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| DataError::Chart {
        path: PathBuf::from(CANDIDATES[0]),
        message: "no font for the charts' text: install fonts-dejavu-core or pass --font FILE.ttf".into(),
    })
}

/// One chart: a metric of the report per day, one line per policy version.
struct Metric {
    file: &'static str,
    title: &'static str,
    value: fn(&ReportRow) -> Option<f64>,
}

const METRICS: [Metric; 6] = [
    Metric { file: "turns.png", title: "turns per day", value: |r| Some(r.turns as f64) },
    Metric { file: "mean_score.png", title: "mean score", value: |r| r.mean_score },
    Metric { file: "latency_p90.png", title: "latency p90 (s)", value: |r| Some(r.latency_p90_secs) },
    Metric {
        file: "cost_per_turn.png",
        title: "mean cost per turn (USD)",
        value: |r| (r.turns > 0).then(|| r.cost_total_usd / r.turns as f64),
    },
    Metric {
        file: "cloud_share.png",
        title: "share sent to the cloud",
        value: |r| Some(r.cloud_text_share + r.cloud_attach_share),
    },
    Metric { file: "fallback_rate.png", title: "fallback rate", value: |r| Some(r.fallback_rate) },
];

/// Draws the report's charts into `dir` (one PNG per metric, days across, a line per policy
/// version, so a push shows as a new line where the old one ends); returns the files.
pub fn draw_charts(rows: &[ReportRow], dir: &Path, font: &Path) -> Result<Vec<PathBuf>, DataError> {
    let chart_error = |path: &Path| {
        let path = path.to_owned();
        move |e: String| DataError::Chart { path: path.clone(), message: e }
    };
    let bytes = std::fs::read(font).map_err(crate::io_error("reading the font", font))?;
    // plotters keeps registered fonts for the process's life.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| chart_error(font)(format!("{} is not a TrueType font", font.display())))?;
    std::fs::create_dir_all(dir).map_err(crate::io_error("creating", dir))?;

    let days: Vec<&str> = {
        let mut days: Vec<&str> = rows.iter().map(|r| r.day.as_str()).collect();
        days.sort_unstable();
        days.dedup();
        days
    };
    let mut by_version: BTreeMap<&str, Vec<&ReportRow>> = BTreeMap::new();
    for r in rows {
        by_version.entry(&r.policy_version).or_default().push(r);
    }
    let mut files = Vec::new();
    for metric in &METRICS {
        let path = dir.join(metric.file);
        draw_metric(metric, &days, &by_version, &path).map_err(chart_error(&path))?;
        files.push(path);
    }
    Ok(files)
}

fn draw_metric(
    metric: &Metric,
    days: &[&str],
    by_version: &BTreeMap<&str, Vec<&ReportRow>>,
    path: &Path,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let values: Vec<f64> = by_version.values().flatten().filter_map(|r| (metric.value)(r)).collect();
    let top = values.iter().copied().fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let x_end = days.len().max(2) - 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(metric.title, ("sans-serif", 24))
        .margin(12)
        // Room for the last day's label, centred on the right edge.
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..x_end, 0.0..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_labels(days.len().clamp(2, 10))
        .x_label_formatter(&|i| days.get(*i).map(|d| d.to_string()).unwrap_or_default())
        .x_desc("day (UTC)")
        .draw()
        .map_err(|x| e(&x))?;
    for (n, (version, rows)) in by_version.iter().enumerate() {
        let color = Palette99::pick(n).to_rgba();
        let points: Vec<(usize, f64)> = rows
            .iter()
            .filter_map(|r| {
                let x = days.iter().position(|d| *d == r.day)?;
                Some((x, (metric.value)(r)?))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(version.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
