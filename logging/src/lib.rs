//! Logging as every Outpost binary does it: `--log-level` and `--log-format` (each also read
//! from `OUTPOST_LOG_LEVEL`/`OUTPOST_LOG_FORMAT`), and a tracing subscriber on stderr that
//! logs the binary's own crates at the chosen level and dependencies at `warn` unless tracing.

use clap::ValueEnum;

/// The flags, for `#[command(flatten)]` into a binary's top-level parser.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct LogArgs {
    /// Log verbosity.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_LOG_LEVEL",
        value_enum,
        default_value = "info"
    )]
    pub log_level: LogLevel,
    /// Log line format: human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "OUTPOST_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter: `crates` (the binary's own, e.g. `outpost_registry`) and `outpost_core` at
/// `level`, everything else at `warn`; `trace` traces everything.
pub fn filter(level: LogLevel, crates: &[&str]) -> String {
    let l = level.as_str();
    if level == LogLevel::Trace {
        return "trace".to_owned();
    }
    let mut f = String::from("warn");
    for c in crates.iter().chain(["outpost_core"].iter()) {
        f.push_str(&format!(",{c}={l}"));
    }
    f
}

/// Colour codes only when a person reads stderr on a terminal: in a container log (kubectl logs,
/// a collector) they are noise. `NO_COLOR` (any value) turns them off on a terminal too.
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the subscriber; call once, at the top of `main`.
pub fn init(args: LogArgs, crates: &[&str]) {
    use std::io::IsTerminal;
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let builder = tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter(
            args.log_level,
            crates,
        )))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(
            filter(LogLevel::Debug, &["outpost_registry"]),
            "warn,outpost_registry=debug,outpost_core=debug"
        );
        assert_eq!(filter(LogLevel::Trace, &["x"]), "trace");
    }

    #[test]
    fn colour_only_on_a_terminal() {
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None));
        assert!(!use_colour(true, Some("1".into())));
        assert!(use_colour(true, Some("".into())));
    }
}
