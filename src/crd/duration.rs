//! Durations as users write them in resources: `100ms`, `1s`, `1.5s`, `2m`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration: write a number with a unit, e.g. 100ms, 1s, 1.5s or 2m")]
    Syntax(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses `<number>[.<fraction>](ms|s|m)` exactly (no float rounding).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(text.to_string());
    let (number, unit_nanos): (&str, u128) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000_000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000_000_000)
    } else {
        return Err(syntax());
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) || number.ends_with('.') {
        return Err(syntax());
    }
    let overflow = || DurationError::Overflow(text.to_string());
    let whole: u128 = whole.parse().map_err(|_| overflow())?;
    let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(overflow)?;
    let mut scale = unit_nanos;
    for digit in fraction.bytes() {
        scale /= 10;
        nanos += u128::from(digit - b'0') * scale;
    }
    let nanos = u64::try_from(nanos).map_err(|_| overflow())?;
    Ok(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_write() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.01s"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "", "100", "ms", "1.s", ".5s", "-1s", "1 s", "1h", "1e3ms", "1.5.5s",
        ] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Syntax(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            parse_duration("99999999999999999999999m"),
            Err(DurationError::Overflow(_))
        ));
    }
}
