//! The filter's metrics: names, and which ones a request's outcome increments.
//!
//! Envoy exports a Wasm metric `NAME` as the stat `wasmcustom.NAME` and, in
//! `/stats/prometheus`, as `NAME`. Proxy-wasm has no labels, so per-rule metrics carry the rule
//! in the name (`tollgate_rule_denied_total.rule.<rule>`); the bootstrap's `stats_tags` turn
//! that into a `rule` label (see README, "Metrics"):
//! `{"tag_name": "rule", "regex": "^wasmcustom\\.tollgate_rule_\\w+(\\.rule\\.(.+))$"}`.

/// Metrics every plugin defines once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Requests at least one rule applied to (a callout was made or attempted).
    Checked,
    Allowed,
    /// Denied by a limit (not by the failure mode).
    Denied,
    /// The shim gave no answer and `failure_mode: allow` let the request through.
    FailedOpen,
    /// The shim gave no answer and `failure_mode: deny` refused the request.
    FailedClosed,
    /// Denied by the over-limit cache, without a callout (also counted as denied).
    CacheHits,
    /// The shim gave no answer and `failure_mode: local` decided in the gateway.
    FailedLocal,
    /// Usage charged after a response (one per counter charged).
    UsageCharges,
    /// Usage charges the shim did not confirm (shim down or slow, a bad answer): that usage
    /// went uncounted.
    UsageChargeFailures,
    /// Requests admitted by spending a lease, without a callout (also counted as allowed).
    LeaseAdmitted,
    /// Units Redis granted as leases.
    LeaseUnitsGranted,
    /// Units held in a lease and dropped unspent (a later grant that expires later replaced
    /// them). Units that simply expire are not seen, so this is a lower bound of the waste.
    LeaseUnitsDropped,
    /// Lease refills that did not get an answer (the key's requests go to Redis meanwhile).
    LeaseRefillFailures,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::Checked,
        Counter::Allowed,
        Counter::Denied,
        Counter::FailedOpen,
        Counter::FailedClosed,
        Counter::CacheHits,
        Counter::FailedLocal,
        Counter::UsageCharges,
        Counter::UsageChargeFailures,
        Counter::LeaseAdmitted,
        Counter::LeaseUnitsGranted,
        Counter::LeaseUnitsDropped,
        Counter::LeaseRefillFailures,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Checked => "tollgate_requests_checked_total",
            Counter::Allowed => "tollgate_requests_allowed_total",
            Counter::Denied => "tollgate_requests_denied_total",
            Counter::FailedOpen => "tollgate_failed_open_total",
            Counter::FailedClosed => "tollgate_failed_closed_total",
            Counter::CacheHits => "tollgate_cache_hits_total",
            Counter::FailedLocal => "tollgate_failed_local_total",
            Counter::UsageCharges => "tollgate_usage_charges_total",
            Counter::UsageChargeFailures => "tollgate_usage_charge_failures_total",
            Counter::LeaseAdmitted => "tollgate_lease_admitted_total",
            Counter::LeaseUnitsGranted => "tollgate_lease_units_granted_total",
            Counter::LeaseUnitsDropped => "tollgate_lease_units_dropped_total",
            Counter::LeaseRefillFailures => "tollgate_lease_refill_failures_total",
        }
    }
}

/// Histogram of the callout's round trip, in milliseconds (Envoy's default buckets are in ms).
pub const CALLOUT_DURATION: &str = "tollgate_callout_duration_milliseconds";

/// Per-rule counters: denials, and shadow-mode denials.
pub fn rule_denied(rule: &str) -> String {
    format!("tollgate_rule_denied_total.rule.{rule}")
}

pub fn rule_shadow_denied(rule: &str) -> String {
    format!("tollgate_rule_shadow_denied_total.rule.{rule}")
}

/// What happened to one checked request, for the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Allowed by the shim; `shadow_denied`: rules in shadow mode that would have denied.
    Allowed {
        shadow_denied: &'a [usize],
    },
    /// Denied by these rules.
    Denied {
        rules: &'a [usize],
    },
    FailedOpen,
    FailedClosed,
    FailedLocal,
}

/// The global counters an outcome increments (`Checked` always).
pub fn counters(outcome: &Outcome<'_>) -> [Counter; 2] {
    let second = match outcome {
        Outcome::Allowed { .. } => Counter::Allowed,
        Outcome::Denied { .. } => Counter::Denied,
        Outcome::FailedOpen => Counter::FailedOpen,
        Outcome::FailedClosed => Counter::FailedClosed,
        Outcome::FailedLocal => Counter::FailedLocal,
    };
    [Counter::Checked, second]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for c in Counter::ALL {
            let name = c.name();
            assert!(
                name.starts_with("tollgate_") && name.ends_with("_total"),
                "{name}"
            );
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
        assert_eq!(
            rule_denied("search"),
            "tollgate_rule_denied_total.rule.search"
        );
        assert_eq!(
            rule_shadow_denied("a.b"),
            "tollgate_rule_shadow_denied_total.rule.a.b"
        );
    }

    #[test]
    fn every_outcome_counts_as_checked_and_once_more() {
        let table = [
            (Outcome::Allowed { shadow_denied: &[] }, Counter::Allowed),
            (Outcome::Denied { rules: &[0] }, Counter::Denied),
            (Outcome::FailedOpen, Counter::FailedOpen),
            (Outcome::FailedClosed, Counter::FailedClosed),
            (Outcome::FailedLocal, Counter::FailedLocal),
        ];
        for (outcome, expected) in table {
            assert_eq!(counters(&outcome), [Counter::Checked, expected]);
        }
    }
}
