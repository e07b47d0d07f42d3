//! When a sync may start (a cron schedule in UTC) and how long it may go on (the window).

use std::fmt;
use std::time::{Duration, SystemTime};

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use jiff::{Span, SpanRelativeTo, Timestamp, Zoned};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("--sync-schedule {0:?} is not a cron expression: {1}")]
    Cron(String, String),
    #[error("--sync-window {0:?} is not an ISO 8601 duration such as PT4H: {1}")]
    Window(String, String),
    #[error("--sync-window must be longer than zero")]
    EmptyWindow,
}

/// A cron schedule (5 fields; a leading seconds field is also accepted) and an optional window.
#[derive(Clone)]
pub struct Schedule {
    expr: String,
    cron: Cron,
    window: Option<Duration>,
    window_text: Option<String>,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("cron", &self.expr)
            .field("window", &self.window_text)
            .finish()
    }
}

/// Parses an ISO 8601 duration (`PT4H`, `P1D`, `PT90M`); days count as 24 hours.
pub fn parse_window(text: &str) -> Result<Duration, ScheduleError> {
    // jiff also reads its friendly format ("4h"); the contract is ISO 8601 only.
    if !text.starts_with(['P', 'p']) {
        return Err(ScheduleError::Window(
            text.into(),
            "must start with P (ISO 8601)".into(),
        ));
    }
    let span: Span = text
        .parse()
        .map_err(|e: jiff::Error| ScheduleError::Window(text.into(), e.to_string()))?;
    let d = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|e| ScheduleError::Window(text.into(), e.to_string()))?;
    let d =
        Duration::try_from(d).map_err(|_| ScheduleError::Window(text.into(), "negative".into()))?;
    if d.is_zero() {
        return Err(ScheduleError::EmptyWindow);
    }
    Ok(d)
}

fn zoned(t: SystemTime) -> Option<Zoned> {
    Timestamp::try_from(t)
        .ok()
        .map(|ts| ts.to_zoned(TimeZone::UTC))
}

fn system_time(z: &Zoned) -> SystemTime {
    SystemTime::from(z.timestamp())
}

impl Schedule {
    pub fn new(cron: &str, window: Option<&str>) -> Result<Self, ScheduleError> {
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        let parsed = parser
            .parse(cron)
            .map_err(|e| ScheduleError::Cron(cron.into(), e.to_string()))?;
        // A pattern that never fires (e.g. 30 February) would silently never sync.
        let now = zoned(SystemTime::now())
            .unwrap_or_else(|| Timestamp::UNIX_EPOCH.to_zoned(TimeZone::UTC));
        parsed
            .find_next_occurrence(&now, false)
            .map_err(|e| ScheduleError::Cron(cron.into(), e.to_string()))?;
        Ok(Schedule {
            expr: cron.to_owned(),
            cron: parsed,
            window: window.map(parse_window).transpose()?,
            window_text: window.map(str::to_owned),
        })
    }

    pub fn cron_text(&self) -> &str {
        &self.expr
    }

    /// The window as given, or "continuous".
    pub fn window_text(&self) -> &str {
        self.window_text.as_deref().unwrap_or("continuous")
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let z = zoned(t)?;
        self.cron
            .find_next_occurrence(&z, false)
            .ok()
            .map(|n| system_time(&n))
    }

    /// When syncing started at `fired` must stop; `None` for a continuous window.
    pub fn deadline(&self, fired: SystemTime) -> Option<SystemTime> {
        self.window.map(|w| fired + w)
    }

    /// If `t` lies inside a window opened by an earlier firing, that firing and its deadline.
    /// Lets a restart mid-window resume at once instead of waiting for the next firing.
    pub fn open_window_at(&self, t: SystemTime) -> Option<(SystemTime, SystemTime)> {
        let w = self.window?;
        let z = zoned(t)?;
        let prev = self.cron.find_previous_occurrence(&z, true).ok()?;
        let fired = system_time(&prev);
        let end = fired + w;
        (end > t).then_some((fired, end))
    }
}

/// `SystemTime` as RFC 3339 UTC with seconds, e.g. `2026-11-22T10:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    match Timestamp::try_from(t) {
        Ok(ts) => ts
            .round(jiff::Unit::Second)
            .map_or_else(|_| ts.to_string(), |r| r.to_string()),
        Err(_) => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        SystemTime::from(s.parse::<Timestamp>().unwrap())
    }

    #[test]
    fn windows_parse_as_iso8601() {
        assert_eq!(parse_window("PT4H").unwrap(), Duration::from_secs(4 * 3600));
        assert_eq!(parse_window("P1D").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_window("PT90S").unwrap(), Duration::from_secs(90));
        assert!(parse_window("4h").is_err());
        assert_eq!(
            parse_window("PT0S").unwrap_err(),
            ScheduleError::EmptyWindow
        );
    }

    #[test]
    fn next_firing_and_deadline() {
        let s = Schedule::new("0 2 * * *", Some("PT4H")).unwrap();
        let n = s.next_after(at("2026-11-22T10:00:00Z")).unwrap();
        assert_eq!(n, at("2026-11-23T02:00:00Z"));
        assert_eq!(s.deadline(n).unwrap(), at("2026-11-23T06:00:00Z"));
        assert_eq!(s.window_text(), "PT4H");
    }

    #[test]
    fn restart_inside_a_window_finds_it() {
        let s = Schedule::new("0 2 * * *", Some("PT4H")).unwrap();
        let (fired, end) = s.open_window_at(at("2026-11-22T03:30:00Z")).unwrap();
        assert_eq!(fired, at("2026-11-22T02:00:00Z"));
        assert_eq!(end, at("2026-11-22T06:00:00Z"));
        assert!(s.open_window_at(at("2026-11-22T07:00:00Z")).is_none());
        let continuous = Schedule::new("* * * * *", None).unwrap();
        assert!(
            continuous
                .open_window_at(at("2026-11-22T07:00:30Z"))
                .is_none()
        );
        assert_eq!(continuous.window_text(), "continuous");
    }

    #[test]
    fn seconds_field_and_bad_patterns() {
        let s = Schedule::new("*/20 * * * * *", Some("PT5S")).unwrap();
        assert_eq!(
            s.next_after(at("2026-11-22T10:00:01Z")).unwrap(),
            at("2026-11-22T10:00:20Z")
        );
        assert!(matches!(
            Schedule::new("every minute", None),
            Err(ScheduleError::Cron(..))
        ));
        assert!(matches!(
            Schedule::new("* * * * *", Some("soon")),
            Err(ScheduleError::Window(..))
        ));
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(
            rfc3339(at("2026-11-22T10:00:00.4Z")),
            "2026-11-22T10:00:00Z"
        );
    }
}
