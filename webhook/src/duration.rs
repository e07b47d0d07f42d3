//! Durations on the command line (`500ms`, `2s`, `5m`, `1h`): a leaf module, so that every
//! subcommand's arguments (cli, uninstall) can parse them without importing each other.

use std::time::Duration;

/// `500ms`, `2s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} needs a unit: ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("unknown unit {unit:?} in {s:?}: use ms, s, m or h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_refusals() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 2s "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(
            parse_duration("26280h"),
            Ok(Duration::from_secs(26280 * 3600))
        );
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("m5").unwrap_err().contains("whole number"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
