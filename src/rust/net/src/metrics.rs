//! Counters for `GET /metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds (seconds) of the round-duration histogram's buckets.
pub const ROUND_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Default, Clone)]
pub struct Metrics {
    pub rounds_committed: u64,
    pub updates_received: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub requests: BTreeMap<&'static str, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Cumulative counts per bucket of ROUND_BUCKETS, then +Inf.
    pub round_buckets: [u64; 12],
    pub round_sum: f64,
}

impl Metrics {
    pub fn observe_round(&mut self, seconds: f64) {
        self.rounds_committed += 1;
        self.round_sum += seconds;
        for (i, ub) in ROUND_BUCKETS.iter().enumerate() {
            if seconds <= *ub {
                self.round_buckets[i] += 1;
            }
        }
        self.round_buckets[ROUND_BUCKETS.len()] += 1;
    }

    pub fn render(&self, registered: usize, connected: usize, ready: bool) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(s, "# HELP fedagg_{name} {help}\n# TYPE fedagg_{name} {kind}\nfedagg_{name} {v}");
        };
        gauge("rounds_committed_total", "Rounds committed by the server.", "counter", self.rounds_committed.to_string());
        gauge("nodes_registered", "Nodes that joined.", "gauge", registered.to_string());
        gauge("nodes_connected", "Nodes heard from within the liveness window.", "gauge", connected.to_string());
        gauge("updates_received_total", "Updates accepted (a resend counts once).", "counter", self.updates_received.to_string());
        gauge("bytes_in_total", "Request bytes read (headers excluded).", "counter", self.bytes_in.to_string());
        gauge("bytes_out_total", "Response bytes written (headers excluded).", "counter", self.bytes_out.to_string());
        gauge("ready", "1 when the server accepts nodes.", "gauge", (ready as u8).to_string());
        let _ = writeln!(s, "# HELP fedagg_requests_total Requests by endpoint.\n# TYPE fedagg_requests_total counter");
        for (k, v) in &self.requests {
            let _ = writeln!(s, "fedagg_requests_total{{endpoint=\"{k}\"}} {v}");
        }
        let _ = writeln!(s, "# HELP fedagg_rejected_total Requests refused, by reason.\n# TYPE fedagg_rejected_total counter");
        for (k, v) in &self.rejected {
            let _ = writeln!(s, "fedagg_rejected_total{{reason=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP fedagg_round_duration_seconds Wall time of committed rounds.\n# TYPE fedagg_round_duration_seconds histogram"
        );
        for (i, ub) in ROUND_BUCKETS.iter().enumerate() {
            let _ = writeln!(s, "fedagg_round_duration_seconds_bucket{{le=\"{ub}\"}} {}", self.round_buckets[i]);
        }
        let _ = writeln!(
            s,
            "fedagg_round_duration_seconds_bucket{{le=\"+Inf\"}} {}\nfedagg_round_duration_seconds_sum {}\nfedagg_round_duration_seconds_count {}",
            self.round_buckets[ROUND_BUCKETS.len()],
            self.round_sum,
            self.rounds_committed
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut m = Metrics::default();
        m.observe_round(0.2);
        m.observe_round(3.0);
        m.observe_round(1000.0);
        let text = m.render(2, 1, true);
        assert!(text.contains("fedagg_round_duration_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("fedagg_round_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("fedagg_round_duration_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("fedagg_round_duration_seconds_count 3"));
        assert!(text.contains("fedagg_nodes_registered 2"));
    }
}
