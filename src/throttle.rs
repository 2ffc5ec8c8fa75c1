//! Keeps a recurring failure (shim down) from writing one log line per request.

/// Lets one message through per interval and counts the ones it held back.
#[derive(Debug, Default)]
pub struct LogThrottle {
    next_ms: u64,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(n)`: log now, mentioning the `n` occurrences suppressed since the last line.
    pub fn admit(&mut self, now_ms: u64, interval_ms: u64) -> Option<u64> {
        if now_ms < self.next_ms {
            self.suppressed += 1;
            return None;
        }
        self.next_ms = now_ms.saturating_add(interval_ms);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let mut t = LogThrottle::default();
        let seen: Vec<Option<u64>> = [0, 1, 5_000, 9_999, 10_000, 10_001, 30_000]
            .iter()
            .map(|&now| t.admit(now, 10_000))
            .collect();
        assert_eq!(seen, [Some(0), None, None, None, Some(3), None, Some(1)]);
    }
}
