//! Durations written the way operators write them: `"50ms"`, `"1s"`, `"5m"`, `"1h"`, `"1d"`.

use std::time::Duration;

/// Parses a whole number followed by one unit (`ms`, `s`, `m`, `h`, `d`).
pub fn parse_duration(s: &str) -> Result<Duration, &'static str> {
    const EXPECTED: &str =
        "expected a whole number and a unit: ms, s, m, h or d (e.g. \"50ms\", \"1m\")";
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or(EXPECTED)?;
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return Err(EXPECTED);
    }
    let n: u64 = digits.parse().map_err(|_| EXPECTED)?;
    let ms_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(EXPECTED),
    };
    Ok(Duration::from_millis(n * ms_per_unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let table = [
            ("0ms", 0),
            ("50ms", 50),
            ("1s", 1_000),
            ("90s", 90_000),
            ("1m", 60_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ];
        for (text, ms) in table {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "ms",
            "1",
            "1.5s",
            "-1s",
            " 1s",
            "1s ",
            "1 s",
            "1S",
            "1w",
            "1000000000000s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
