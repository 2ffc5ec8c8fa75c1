//! Keeping window keys in line across gateways whose clocks disagree.
//!
//! Window keys are computed in the gateway from its clock, so a gateway whose clock is off by
//! seconds would count in other windows than its peers. Every shim reply carries Redis's time;
//! each gateway keeps a smoothed estimate of `Redis time − its own time` and computes keys on
//! the corrected clock, so all gateways agree with Redis (and so with each other) to within
//! about half a round trip.

/// Replies slower than this say little about the offset (the midpoint is too uncertain).
pub const MAX_USEFUL_RTT_MS: u64 = 250;

/// A smoothed estimate of the offset from the gateway clock to Redis's clock.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SkewEstimator {
    offset_ms: Option<i64>,
}

impl SkewEstimator {
    /// A reply sent at `sent_ms` and received at `received_ms` (gateway clock) was stamped
    /// `server_ms` by Redis, somewhere in between: assume the middle.
    pub fn observe(&mut self, sent_ms: u64, received_ms: u64, server_ms: u64) {
        let rtt = received_ms.saturating_sub(sent_ms);
        if rtt > MAX_USEFUL_RTT_MS {
            return;
        }
        let sample = server_ms as i64 - (sent_ms + rtt / 2) as i64;
        self.offset_ms = Some(match self.offset_ms {
            // The first sample is taken whole: a skew of seconds is corrected at once.
            None => sample,
            // Then an exponential average (1/8), so one odd reply moves it little.
            Some(o) => o + (sample - o) / 8,
        });
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.unwrap_or(0)
    }

    /// Starts from an offset learned elsewhere (another worker, through shared data).
    pub fn with_offset(offset_ms: i64) -> SkewEstimator {
        SkewEstimator {
            offset_ms: Some(offset_ms),
        }
    }
}

/// `gateway_ms` moved by `offset_ms`, never below zero.
pub fn corrected(gateway_ms: u64, offset_ms: i64) -> u64 {
    gateway_ms.saturating_add_signed(offset_ms)
}

/// Shared-data encoding of an offset (8 bytes, little endian).
pub fn encode(offset_ms: i64) -> [u8; 8] {
    offset_ms.to_le_bytes()
}

pub fn decode(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_gateway_learns_redis_time_from_the_first_reply() {
        // The gateway is 3 s ahead: it sends at 10_000 (its clock), Redis stamps 7_005.
        let mut e = SkewEstimator::default();
        assert_eq!(e.offset_ms(), 0);
        e.observe(10_000, 10_010, 7_005);
        assert_eq!(e.offset_ms(), -3_000);
        assert_eq!(corrected(10_020, e.offset_ms()), 7_020);
    }

    #[test]
    fn later_samples_are_smoothed_and_slow_replies_ignored() {
        // Gateway 3 s ahead: sent at 10_000, Redis says 7_005 for an exact estimate.
        let mut e = SkewEstimator::with_offset(-3_000);
        e.observe(10_000, 10_010, 7_085); // one sample 80 ms off
        assert_eq!(e.offset_ms(), -2_990);
        e.observe(10_000, 11_000, 50_000); // a one-second round trip: ignored
        assert_eq!(e.offset_ms(), -2_990);
        for _ in 0..100 {
            e.observe(10_000, 10_010, 7_005);
        }
        assert!((e.offset_ms() + 3_000).abs() <= 8, "{}", e.offset_ms());
    }

    #[test]
    fn offsets_round_trip_through_shared_data() {
        for o in [0, -3_000, 86_400_000, i64::MIN] {
            assert_eq!(decode(&encode(o)), Some(o));
        }
        assert_eq!(decode(b"short"), None);
        assert_eq!(corrected(5, -10), 0);
    }
}
