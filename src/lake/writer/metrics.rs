//! The lake writer's counters, resolved per table once so `append` only does atomic adds.

use super::super::registry::{Registry, TableId};
use super::super::LakeError;
use super::{DROP_REASONS, ERROR_KINDS};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

/// Counters, resolved per table once so `append` only does atomic adds.
pub(super) struct WriterMetrics {
    pub(super) accepted: Vec<IntCounter>,
    /// `[table][reason]`, reasons in [`DROP_REASONS`] order.
    pub(super) dropped: Vec<[IntCounter; DROP_REASONS.len()]>,
    pub(super) written: Vec<IntCounter>,
    pub(super) errors: IntCounterVec,
    pub(super) flushes: IntCounter,
    pub(super) flush_seconds: Histogram,
    pub(super) lock_wait_seconds: Histogram,
    pub(super) buffered: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &prometheus::Registry, c: T) -> Result<T, LakeError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl WriterMetrics {
    pub(super) fn new(r: &prometheus::Registry, tables: &Registry) -> Result<WriterMetrics, LakeError> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, LakeError> {
            register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let accepted = counter("pgbudget_lake_rows_appended_total", "Rows accepted into the lake buffer", &["table"])?;
        let dropped = counter(
            "pgbudget_lake_rows_dropped_total",
            "Rows that never reached the lake, by table and reason",
            &["table", "reason"],
        )?;
        let written = counter("pgbudget_lake_rows_written_total", "Rows committed to the lake", &["table"])?;
        let errors = counter("pgbudget_lake_flush_errors_total", "Failed lake flushes, by kind", &["kind"])?;
        for k in ERROR_KINDS {
            errors.with_label_values(&[k]);
        }
        let names: Vec<&str> = tables.tables().iter().map(|t| t.name.as_ref()).collect();
        Ok(WriterMetrics {
            accepted: names.iter().map(|t| accepted.with_label_values(&[t])).collect(),
            dropped: names.iter().map(|t| DROP_REASONS.map(|reason| dropped.with_label_values(&[t, reason]))).collect(),
            written: names.iter().map(|t| written.with_label_values(&[t])).collect(),
            errors,
            flushes: register(r, IntCounter::new("pgbudget_lake_flushes_total", "Successful lake flushes")?)?,
            flush_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("pgbudget_lake_flush_seconds", "Time one lake flush took (all tables)")
                        .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                )?,
            )?,
            lock_wait_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pgbudget_lake_flush_lock_wait_seconds",
                        "Time flushes waited for the cross-process flush lock (Postgres catalog), timeouts included",
                    )
                    .buckets(vec![0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                )?,
            )?,
            buffered: register(r, IntGauge::new("pgbudget_lake_buffered_rows", "Rows held by the flush thread")?)?,
        })
    }

    pub(super) fn drop_row(&self, table: TableId, reason: usize) {
        if let Some(c) = self.dropped.get(usize::from(table.0)) {
            c[reason].inc();
        }
    }
}
