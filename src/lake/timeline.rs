//! `pgbudget lake timeline`: per service and UTC day (or hour) over a window, the events that say a budget was
//! too tight — checkout timeouts, 53300 rejections, read-only violations, server errors — and the peak
//! utilisation of the service's share. Also the plain aligned text tables the lake CLI prints.

use super::reader::QueryResult;
use super::registry::Value;
use super::{LakeError, LakeReader};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// `admission_decisions.reason` values (with `accepted = false`) counted as 53300 rejections: admission's own
/// refusals. `timed_out` is left out (each one is a `checkout_timeouts` row, counted there) and so is `budget`
/// (a refused login's row, written beside the checkout's own decision row), so every event is counted once.
pub const REJECTION_REASONS: [&str; 2] = ["rejected_hard", "rejected_queue_full"];

/// Most buckets (days or hours) a timeline covers.
pub const MAX_DAYS: u32 = 3660;

/// Servers in use at a snapshot row's peak: its high-water mark (rows since the marks exist), else the sample.
const PEAK_WITH_MARKS: &str = "greatest(in_use, coalesce(max_in_use, in_use))";

/// The timeline query. `UNIT` (day or hour), `STEP` (`to_days`/`to_hours`), `LABEL` (the bucket's strftime
/// format) and `PEAK_IN_USE` (the in-use expression the lake's columns allow) are filled in by [`timeline`]; its
/// parameters are the number of buckets and the service (NULL: every service). Buckets are UTC (`ts` columns
/// are UTC timestamps), the current one last. Every service seen in the window gets a row for every bucket.
pub const TIMELINE_SQL: &str = "\
WITH win AS (
    SELECT cur - STEP(n - 1) AS first_b, cur + STEP(1) AS end_b, svc
    FROM (SELECT date_trunc('UNIT', CAST(timezone('UTC', now()) AS TIMESTAMP)) AS cur, CAST(? AS INTEGER) AS n,
                 CAST(? AS VARCHAR) AS svc)
),
buckets AS (SELECT unnest(range(first_b, end_b, STEP(1))) AS b FROM win),
events AS (
    SELECT service, date_trunc('UNIT', ts) AS b, count(*) AS timeouts, 0 AS rejections, 0 AS ro, 0 AS errors,
           CAST(NULL AS DOUBLE) AS util
    FROM lake.main.checkout_timeouts, win WHERE ts >= first_b AND ts < end_b GROUP BY ALL
    UNION ALL
    SELECT service, date_trunc('UNIT', ts), 0, count(*), 0, 0, NULL
    FROM lake.main.admission_decisions, win
    WHERE ts >= first_b AND ts < end_b AND accepted = false
      AND reason IN ('rejected_hard', 'rejected_queue_full')
    GROUP BY ALL
    UNION ALL
    SELECT service, date_trunc('UNIT', ts), 0, 0, count(*), 0, NULL
    FROM lake.main.ro_violations, win WHERE ts >= first_b AND ts < end_b GROUP BY ALL
    UNION ALL
    SELECT service, date_trunc('UNIT', ts), 0, 0, 0, count(*), NULL
    FROM lake.main.server_errors, win
    WHERE ts >= first_b AND ts < end_b AND (kind IN ('connect', 'reset') OR (kind = 'server_error'
          AND (substr(sqlstate, 1, 2) IN ('08', '53', '58', 'XX', '28', 'F0') OR sqlstate LIKE '57P0%')))
    GROUP BY ALL
    UNION ALL
    SELECT service, date_trunc('UNIT', ts), 0, 0, 0, 0, max(CAST(PEAK_IN_USE AS DOUBLE) / share)
    FROM lake.main.pool_snapshots, win WHERE ts >= first_b AND ts < end_b AND share > 0 GROUP BY ALL
),
named AS (
    SELECT coalesce(service, '?') AS service, * EXCLUDE (service) FROM events
    WHERE (SELECT svc FROM win) IS NULL OR coalesce(service, '?') = (SELECT svc FROM win)
),
services AS (SELECT DISTINCT service FROM named)
SELECT s.service, strftime(d.b, 'LABEL') AS bucket,
       coalesce(sum(e.timeouts), 0) AS checkout_timeouts,
       coalesce(sum(e.rejections), 0) AS rejections,
       coalesce(sum(e.ro), 0) AS ro_violations,
       coalesce(sum(e.errors), 0) AS server_errors,
       max(e.util) AS peak_utilisation
FROM services s CROSS JOIN buckets d
LEFT JOIN named e ON e.service = s.service AND e.b = d.b
GROUP BY s.service, d.b
ORDER BY s.service, d.b";

/// How long a timeline's buckets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Bucket {
    #[default]
    Day,
    Hour,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Day => "day",
            Bucket::Hour => "hour",
        }
    }

    pub fn length(self) -> std::time::Duration {
        std::time::Duration::from_secs(match self {
            Bucket::Day => 86_400,
            Bucket::Hour => 3_600,
        })
    }

    /// How many buckets cover `since` (the current one included; at least one).
    pub fn count(self, since: std::time::Duration) -> u32 {
        let len = self.length().as_secs();
        u32::try_from(since.as_secs().div_ceil(len).max(1)).unwrap_or(u32::MAX)
    }
}

/// What a timeline covers: the last `buckets` UTC days or hours, every service or one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineOptions {
    #[serde(default)]
    pub by: Bucket,
    pub buckets: u32,
    #[serde(default)]
    pub service: Option<String>,
}

impl TimelineOptions {
    /// The last `n` UTC days (`--days N`).
    pub fn days(n: u32) -> TimelineOptions {
        TimelineOptions { by: Bucket::Day, buckets: n, service: None }
    }
}

/// One service in one UTC bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineRow {
    pub service: String,
    /// `YYYY-MM-DD` (day) or `YYYY-MM-DD HH:00` (hour), UTC.
    pub bucket: String,
    pub checkout_timeouts: i64,
    /// 53300 rejections: admission refusals ([`REJECTION_REASONS`]).
    pub rejections: i64,
    pub ro_violations: i64,
    /// Upstream-side `server_errors` rows: `connect`, `reset`, and `server_error` of a server-health SQLSTATE
    /// class (rows an older pgbudget wrote for refusals, query errors or `RAISE` are not counted).
    pub server_errors: i64,
    /// Highest `in_use / share` in the bucket's pool snapshots, from their high-water marks (`max_in_use`) where
    /// the rows have them, so a burst between two snapshots counts (`None`: no snapshot in the bucket).
    pub peak_utilisation: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub options: TimelineOptions,
    pub rows: Vec<TimelineRow>,
    /// The reader's row limit (`lake.max_rows`) cut the timeline short.
    pub truncated: bool,
}

/// Read the timeline `o` asks for (the current bucket included) through the lake reader.
pub fn timeline(reader: &LakeReader, o: &TimelineOptions) -> Result<Timeline, LakeError> {
    if o.buckets == 0 || o.buckets > MAX_DAYS {
        return Err(LakeError::Config(format!(
            "a timeline covers 1 to {MAX_DAYS} {}s, got {}",
            o.by.as_str(),
            o.buckets
        )));
    }
    let (step, label) = match o.by {
        Bucket::Day => ("to_days", "%Y-%m-%d"),
        Bucket::Hour => ("to_hours", "%Y-%m-%d %H:00"),
    };
    let sql = TIMELINE_SQL
        .replace("PEAK_IN_USE", if has_marks(reader) { PEAK_WITH_MARKS } else { "in_use" })
        .replace("UNIT", o.by.as_str())
        .replace("STEP", step)
        .replace("LABEL", label);
    let service = o.service.as_deref().map_or(Value::Null, |s| Value::Text(s.to_owned()));
    let r = reader.query(&sql, &[Value::Int(o.buckets.into()), service], usize::MAX)?;
    let rows = r.rows.iter().map(row).collect::<Result<_, _>>()?;
    Ok(Timeline { options: o.clone(), rows, truncated: r.truncated })
}

/// Whether `pool_snapshots` has the high-water columns (a lake read READ_ONLY before any newer pgbudget
/// attached it for writing has not).
fn has_marks(reader: &LakeReader) -> bool {
    let cols = reader.with_conn(|c| super::catalog::existing_columns(c, "pool_snapshots"));
    cols.is_ok_and(|cols| cols.iter().any(|(name, _)| name == "max_in_use"))
}

fn row(m: &serde_json::Map<String, Json>) -> Result<TimelineRow, LakeError> {
    let bad = |c: &str| LakeError::Schema { table: "timeline".into(), reason: format!("unexpected value in {c}") };
    let text = |c: &str| m.get(c).and_then(Json::as_str).map(str::to_owned).ok_or_else(|| bad(c));
    let int = |c: &str| m.get(c).and_then(Json::as_i64).ok_or_else(|| bad(c));
    Ok(TimelineRow {
        service: text("service")?,
        bucket: text("bucket")?,
        checkout_timeouts: int("checkout_timeouts")?,
        rejections: int("rejections")?,
        ro_violations: int("ro_violations")?,
        server_errors: int("server_errors")?,
        peak_utilisation: m.get("peak_utilisation").and_then(Json::as_f64),
    })
}

/// The timeline as one JSON document (`--format json`, `POST /lake/timeline`).
pub fn format_timeline_json(t: &Timeline) -> String {
    let mut s = serde_json::to_string(t).unwrap_or_default();
    s.push('\n');
    s
}

/// The timeline as text: a title line, then one aligned table, services apart by a blank line.
pub fn format_timeline(t: &Timeline) -> String {
    let by = t.options.by.as_str();
    let bucket = format!("{by} (UTC)");
    let header = ["service", &bucket, "checkout_timeouts", "53300_rejections", "ro_violations", "server_errors"];
    let mut headers: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    headers.push("peak_util".into());
    let mut rows = Vec::with_capacity(t.rows.len());
    let mut breaks = Vec::new();
    for (i, r) in t.rows.iter().enumerate() {
        if i > 0 && t.rows[i - 1].service != r.service {
            breaks.push(i);
        }
        rows.push(vec![
            r.service.clone(),
            r.bucket.clone(),
            r.checkout_timeouts.to_string(),
            r.rejections.to_string(),
            r.ro_violations.to_string(),
            r.server_errors.to_string(),
            r.peak_utilisation.map_or_else(|| "-".to_owned(), |u| format!("{:.0}%", u * 100.0)),
        ]);
    }
    let mut out = format!("lake timeline: last {} UTC {by}(s), {} service(s)\n", t.options.buckets, {
        let mut s: Vec<&str> = t.rows.iter().map(|r| r.service.as_str()).collect();
        s.dedup();
        s.len()
    });
    if t.rows.is_empty() {
        out.push_str("no events in the window\n");
        return out;
    }
    let right = [false, false, true, true, true, true, true];
    out.push_str(&text_table(&headers, &rows, &right, &breaks));
    if t.truncated {
        out.push_str("(truncated: raise lake.max_rows or ask for a shorter window)\n");
    }
    out
}

/// An aligned text table: header, dashes, rows; `right[i]` right-aligns column `i`; a blank line before each
/// row index in `breaks`. Trailing spaces are trimmed.
pub fn text_table(headers: &[String], rows: &[Vec<String>], right: &[bool], breaks: &[usize]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = w.saturating_sub(c.chars().count());
            if right.get(i).copied().unwrap_or(false) {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(headers);
    out.push_str(&line(&width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>()));
    for (i, r) in rows.iter().enumerate() {
        if breaks.contains(&i) {
            out.push('\n');
        }
        out.push_str(&line(r));
    }
    out
}

/// A query result as an aligned table (numbers right-aligned, NULL as empty) with a row-count footer.
pub fn format_result(r: &QueryResult) -> String {
    let cell = |v: Option<&Json>| match v {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let rows: Vec<Vec<String>> = r.rows.iter().map(|m| r.columns.iter().map(|c| cell(m.get(c))).collect()).collect();
    let right: Vec<bool> = r
        .columns
        .iter()
        .map(|c| {
            let mut vals = r.rows.iter().filter_map(|m| m.get(c)).filter(|v| !v.is_null()).peekable();
            vals.peek().is_some() && vals.all(Json::is_number)
        })
        .collect();
    let mut out = text_table(&r.columns, &rows, &right, &[]);
    let n = r.rows.len();
    out.push_str(&format!(
        "({n} row{}{})\n",
        if n == 1 { "" } else { "s" },
        if r.truncated { ", truncated" } else { "" }
    ));
    out
}

/// A query result as JSON lines, one object per row (keys in column order).
pub fn format_json_lines(r: &QueryResult) -> String {
    let mut out = String::new();
    for m in &r.rows {
        let cells: Vec<String> = r
            .columns
            .iter()
            .map(|c| {
                let k = Json::String(c.clone()).to_string();
                format!("{k}:{}", m.get(c).unwrap_or(&Json::Null))
            })
            .collect();
        out.push('{');
        out.push_str(&cells.join(","));
        out.push_str("}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tr(service: &str, day: &str, counts: [i64; 4], util: Option<f64>) -> TimelineRow {
        TimelineRow {
            service: service.into(),
            bucket: day.into(),
            checkout_timeouts: counts[0],
            rejections: counts[1],
            ro_violations: counts[2],
            server_errors: counts[3],
            peak_utilisation: util,
        }
    }

    #[test]
    fn timeline_text() {
        let t = Timeline {
            options: TimelineOptions::days(2),
            rows: vec![
                tr("api", "2026-01-01", [3, 0, 0, 12], Some(0.8)),
                tr("api", "2026-01-02", [0, 0, 0, 0], None),
                tr("billing", "2026-01-01", [0, 1, 2, 0], Some(1.0)),
                tr("billing", "2026-01-02", [0, 0, 0, 0], Some(0.066)),
            ],
            truncated: false,
        };
        assert_eq!(
            format_timeline(&t),
            "lake timeline: last 2 UTC day(s), 2 service(s)\n\
             service  day (UTC)   checkout_timeouts  53300_rejections  ro_violations  server_errors  peak_util\n\
             -------  ----------  -----------------  ----------------  -------------  -------------  ---------\n\
             api      2026-01-01                  3                 0              0             12        80%\n\
             api      2026-01-02                  0                 0              0              0          -\n\
             \n\
             billing  2026-01-01                  0                 1              2              0       100%\n\
             billing  2026-01-02                  0                 0              0              0         7%\n"
        );
        let empty = Timeline { options: TimelineOptions::days(7), rows: vec![], truncated: false };
        assert_eq!(
            format_timeline(&empty),
            "lake timeline: last 7 UTC day(s), 0 service(s)\nno events in the window\n"
        );
    }

    #[test]
    fn result_text_and_json_lines() {
        let obj = |v: serde_json::Value| v.as_object().unwrap().clone();
        let r = QueryResult {
            columns: vec!["service".into(), "n".into(), "note".into()],
            rows: vec![
                obj(json!({"service": "api", "n": 1234, "note": null})),
                obj(json!({"service": "b", "n": 5, "note": "x y"})),
            ],
            truncated: false,
        };
        assert_eq!(
            format_result(&r),
            "service     n  note\n-------  ----  ----\napi      1234\nb           5  x y\n(2 rows)\n"
        );
        assert_eq!(
            format_json_lines(&r),
            "{\"service\":\"api\",\"n\":1234,\"note\":null}\n{\"service\":\"b\",\"n\":5,\"note\":\"x y\"}\n"
        );
    }
}
