//! Label values the metrics share with the layers that count them: admission decisions and pin reasons.

/// What admission decided for one checkout (the `decision` label of `pgbudget_admission_total`); the
/// discriminant is the index into [`Decision::ALL`] and the per-pool counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Got a server without waiting.
    Admitted,
    /// Waited in the queue, then got a server.
    Queued,
    /// Refused at once: at or above `shed` with `max_waiting` clients already queued.
    RejectedQueueFull,
    /// Refused at once: at or above the hard-reject line.
    RejectedHard,
    /// Waited `checkout_timeout` without getting a server.
    TimedOut,
    /// An exempt client served above the hard-reject line.
    Exempt,
    /// The client disconnected or cancelled while queued.
    Abandoned,
}

impl Decision {
    pub const ALL: [Decision; 7] = [
        Decision::Admitted,
        Decision::Queued,
        Decision::RejectedQueueFull,
        Decision::RejectedHard,
        Decision::TimedOut,
        Decision::Exempt,
        Decision::Abandoned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Admitted => "admitted",
            Decision::Queued => "queued",
            Decision::RejectedQueueFull => "rejected_queue_full",
            Decision::RejectedHard => "rejected_hard",
            Decision::TimedOut => "timed_out",
            Decision::Exempt => "exempt",
            Decision::Abandoned => "abandoned",
        }
    }
}

/// Why a server is pinned to its client (the `reason` label of `pgbudget_pinned_total`).
pub const PIN_REASONS: [&str; 6] = ["listen", "temp_table", "advisory_lock", "cursor", "sql_prepare", "load"];
