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

/// Installs the subscriber; call once, at the top of `main`.
pub fn init(args: LogArgs, crates: &[&str]) {
    let builder = tracing_subscriber::fmt()
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
}
