//! Client subcommands of the admin API: `status`, `sync` and `stage` (and the namespace
//! credentials `token list --admin` shows).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::CliError;
use crate::config::parse_duration;
use crate::service::staging::{ImageState, StagingRequest};
use crate::sync::Status;
use crate::sync::children::ChildView;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// Base URL of the registry's admin API.
    #[arg(long, env = "OUTPOST_ADMIN", default_value = "http://127.0.0.1:5050")]
    pub admin: String,
    /// PEM CA bundle to trust when the admin API is served over HTTPS.
    #[arg(long, env = "OUTPOST_ADMIN_CA_FILE")]
    pub admin_ca_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub format: Format,
}

/// `-o table|json`, shared by the commands that print what the admin API answers.
#[derive(clap::Args, Debug)]
pub struct Format {
    /// Output format: a table, or the admin API's JSON.
    #[arg(
        short = 'o',
        long,
        env = "OUTPOST_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Follow the run to its end, showing progress; exit 1 unless it succeeded.
    #[arg(long, env = "OUTPOST_SYNC_WAIT")]
    pub wait: bool,
    /// With --wait: give up following after this long (s, m or h suffix).
    #[arg(long, env = "OUTPOST_SYNC_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct StageArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Images to stage, named as in the parent (`demo-image:latest`, `team/app@sha256:...`) or
    /// fully qualified with the parent's login server.
    pub images: Vec<String>,
    /// File with more images, one per line (`#` starts a comment; `-` reads standard input).
    #[arg(short = 'f', long = "file", env = "OUTPOST_STAGE_FILE")]
    pub file: Option<PathBuf>,
    /// Follow the request to its end with a progress bar per image; exit 1 if any failed.
    #[arg(long, env = "OUTPOST_STAGE_WAIT")]
    pub wait: bool,
    /// With --wait: give up following after this long (s, m or h suffix).
    #[arg(long, env = "OUTPOST_STAGE_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Follow an existing request instead of starting one.
    #[arg(long, env = "OUTPOST_STAGE_ID", conflicts_with_all = ["images", "file"])]
    pub id: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ConnectedRegistryCommand {
    /// Every connected registry heard from: NAME | MODE | CONNECTION STATE | PARENT | LOGIN
    /// SERVER | LAST SYNC(UTC). One not heard from for two of its sync intervals (10 minutes
    /// when it reports none) is Offline.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// `-o json`: the admin API's JSON (GET /outpost/v1/children).
        #[command(flatten)]
        format: Format,
    },
    /// One connected registry in detail: version, storage, staging, when it was last heard.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// Its name (ConnectedRegistryName).
        name: String,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn client(a: &AdminArgs) -> Result<reqwest::Client, CliError> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(p) = &a.admin_ca_file {
        let pem = std::fs::read(p)
            .map_err(|e| CliError::Admin(format!("cannot read {}: {e}", p.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| CliError::Admin(format!("{}: {e}", p.display())))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| CliError::Admin(format!("cannot build HTTP client: {e}")))
}

fn url(a: &AdminArgs, path: &str) -> String {
    format!("{}{path}", a.admin.trim_end_matches('/'))
}

/// GETs `path` of the admin API as JSON.
async fn get_json<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    a: &AdminArgs,
    path: &str,
) -> Result<T, CliError> {
    let u = url(a, path);
    let resp = c
        .get(&u)
        .send()
        .await
        .map_err(|e| CliError::Admin(format!("cannot reach the admin API at {u}: {e}")))?;
    if !resp.status().is_success() {
        return Err(CliError::Admin(format!("{u}: HTTP {}", resp.status())));
    }
    resp.json()
        .await
        .map_err(|e| CliError::Admin(format!("{u}: unexpected answer: {e}")))
}

/// The namespaces whose credentials the registry accepted since it started.
pub async fn namespace_credentials(
    a: &AdminArgs,
) -> Result<Vec<crate::auth::namespace::SeenCredential>, CliError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        namespace_credentials: Vec<crate::auth::namespace::SeenCredential>,
    }
    let c = client(a)?;
    let answer: Answer = get_json(&c, a, "/outpost/v1/namespace-credentials").await?;
    Ok(answer.namespace_credentials)
}

/// POSTs `body` (JSON, or nothing) to `path` of the admin API; the answer's JSON, or the
/// API's refusal prefixed by `refused`.
async fn post_json(
    c: &reqwest::Client,
    a: &AdminArgs,
    path: &str,
    body: Option<serde_json::Value>,
    refused: &str,
) -> Result<serde_json::Value, CliError> {
    let u = url(a, path);
    let mut req = c.post(&u);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| CliError::Admin(format!("cannot reach the admin API at {u}: {e}")))?;
    let code = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or_default();
    if !code.is_success() {
        let why = answer["error"].as_str().unwrap_or("refused").to_owned();
        return Err(CliError::Admin(format!("{refused}: {why}")));
    }
    Ok(answer)
}

async fn fetch_status(c: &reqwest::Client, a: &AdminArgs) -> Result<Status, CliError> {
    get_json(c, a, "/outpost/v1/status").await
}

fn dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

/// Columns padded to their widest cell, separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

pub fn render_status(s: &Status) -> String {
    let mut out = table(&[
        [
            "NAME",
            "MODE",
            "CONNECTION STATE",
            "PARENT",
            "LOGIN SERVER",
            "LAST SYNC(UTC)",
            "SYNC SCHEDULE",
            "SYNC WINDOW",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            s.name.clone(),
            s.mode.clone(),
            s.connection_state.clone(),
            s.parent.clone(),
            s.login_server.clone(),
            dash(&s.last_sync_utc),
            s.sync_schedule.clone(),
            s.sync_window.clone(),
        ],
    ]);
    if !s.repositories.is_empty() {
        let mut rows = vec![
            [
                "REPOSITORY",
                "TAGS",
                "IMAGES",
                "DOWNLOADED",
                "LAST SYNC(UTC)",
                "ERROR",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for r in &s.repositories {
            rows.push(vec![
                r.name.clone(),
                r.tags.to_string(),
                format!("{}/{}", r.images_synced, r.images_total),
                format!("{} / {}", mib(r.bytes_done), mib(r.bytes_total)),
                dash(&r.last_sync_utc),
                dash(&r.last_error),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    if !s.platforms.is_empty() {
        out.push_str(&format!(
            "\nplatforms: {} (platform filter: other platforms of an index are fetched only \
             when pulled)\n",
            s.platforms.join(", ")
        ));
    }
    if let Some(n) = &s.scope_note {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!("last error: {e}\n"));
    }
    if s.outbox_pending > 0 {
        out.push_str(&format!(
            "pushes waiting for the parent: {}\n",
            s.outbox_pending
        ));
    }
    out
}

pub async fn status(a: StatusArgs) -> Result<ExitCode, CliError> {
    let c = client(&a.admin)?;
    let s = fetch_status(&c, &a.admin).await?;
    match a.format.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| CliError::Admin(e.to_string()))?
        ),
        Output::Table => print!("{}", render_status(&s)),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn render_children(children: &[ChildView]) -> String {
    let mut rows = vec![
        [
            "NAME",
            "MODE",
            "CONNECTION STATE",
            "PARENT",
            "LOGIN SERVER",
            "LAST SYNC(UTC)",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in children {
        rows.push(vec![
            c.name.clone(),
            c.mode.clone(),
            c.connection_state.clone(),
            c.parent.clone(),
            if c.login_server.is_empty() {
                "-".into()
            } else {
                c.login_server.clone()
            },
            dash(&c.last_sync_utc),
        ]);
    }
    table(&rows)
}

pub fn render_child(c: &ChildView) -> String {
    let staging = if c.staging.values().all(|n| *n == 0) {
        "-".to_owned()
    } else {
        c.staging
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows: Vec<Vec<String>> = [
        ("Name", c.name.clone()),
        ("Mode", c.mode.clone()),
        ("Connection state", c.connection_state.clone()),
        ("Parent", c.parent.clone()),
        ("Login server", c.login_server.clone()),
        ("Last sync (UTC)", dash(&c.last_sync_utc)),
        (
            "Last heard (UTC)",
            format!("{} ({} s ago)", c.last_heard_utc, c.seconds_since_heard),
        ),
        (
            "Offline after",
            format!("{} s unheard", c.offline_after_seconds),
        ),
        (
            "Sync interval",
            c.sync_interval_seconds
                .map_or("-".into(), |s| format!("{s} s")),
        ),
        ("Reported state", c.reported_connection_state.clone()),
        ("Version", c.version.clone()),
        ("Storage used", mib(c.storage_bytes)),
        ("Staging images", staging),
        ("Last error", dash(&c.last_error)),
    ]
    .into_iter()
    .map(|(k, v)| vec![format!("{k}:"), v])
    .collect();
    table(&rows)
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Admin(e.to_string()))?;
    println!("{text}");
    Ok(())
}

pub async fn connected_registry(cmd: ConnectedRegistryCommand) -> Result<ExitCode, CliError> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Answer {
        children: Vec<ChildView>,
    }
    match cmd {
        ConnectedRegistryCommand::List { admin, format } => {
            let c = client(&admin)?;
            let a: Answer = get_json(&c, &admin, "/outpost/v1/children").await?;
            match format.output {
                Output::Json => print_json(&a)?,
                Output::Table => print!("{}", render_children(&a.children)),
            }
        }
        ConnectedRegistryCommand::Show {
            admin,
            name,
            format,
        } => {
            // A name no child can have is not put in a URL.
            if !crate::sync::children::valid_name(&name) {
                return Err(CliError::Admin(format!(
                    "{name:?} is not a connected registry name (1-50 of A-Z a-z 0-9 - _)"
                )));
            }
            let c = client(&admin)?;
            let path = format!("/outpost/v1/children/{name}");
            let u = url(&admin, &path);
            let resp =
                c.get(&u).send().await.map_err(|e| {
                    CliError::Admin(format!("cannot reach the admin API at {u}: {e}"))
                })?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Err(CliError::Admin(format!(
                    "no connected registry {name} has reported to this registry"
                )));
            }
            if !resp.status().is_success() {
                return Err(CliError::Admin(format!("{u}: HTTP {}", resp.status())));
            }
            let child: ChildView = resp
                .json()
                .await
                .map_err(|e| CliError::Admin(format!("{u}: unexpected answer: {e}")))?;
            match format.output {
                Output::Json => print_json(&child)?,
                Output::Table => print!("{}", render_child(&child)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_line(s: &Status, run: u64) -> String {
    let (images, total, done, bytes) = s.repositories.iter().fold((0, 0, 0, 0), |acc, r| {
        (
            acc.0 + r.images_synced,
            acc.1 + r.images_total,
            acc.2 + r.bytes_done,
            acc.3 + r.bytes_total,
        )
    });
    format!(
        "sync run {run}: {images}/{total} images, {} of {} downloaded",
        mib(done),
        mib(bytes)
    )
}

pub async fn sync(a: SyncArgs) -> Result<ExitCode, CliError> {
    let c = client(&a.admin)?;
    let body = post_json(&c, &a.admin, "/outpost/v1/sync", None, "sync not started").await?;
    // The leading process answers with the run it started; another one with the request it
    // stored for the leader, found in the status's `requests` once a run serves it.
    let request = body["request"].as_str().map(str::to_owned);
    let mut run = match &request {
        Some(id) => {
            let at_least = body["runAtLeast"].as_u64().unwrap_or(0);
            println!(
                "sync requested ({id}); the leading process runs it within seconds, as run {at_least} or later"
            );
            at_least
        }
        None => {
            let run = body["run"].as_u64().unwrap_or(0);
            println!("sync run {run} started");
            run
        }
    };
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal();
    let began = Instant::now();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = fetch_status(&c, &a.admin).await?;
        // (run number, result) once the run that serves this sync finished.
        let finished = match &request {
            Some(id) => s.requests.iter().find(|q| q.id == *id).and_then(|q| {
                run = q.run;
                q.result.clone().map(|r| (q.run, r))
            }),
            None => s
                .last_run
                .as_ref()
                .filter(|r| r.number >= run && r.result.is_some() && !s.syncing)
                .map(|r| (r.number, r.result.clone().unwrap_or_default())),
        };
        if let Some((number, result)) = finished {
            if tty {
                eprintln!();
            }
            match s.last_run.as_ref().filter(|r| r.number == number) {
                Some(r) => {
                    println!(
                        "sync run {number} {result}: {} blobs ({}) downloaded, {} manifests written, {} tags deleted, {} pushes uploaded",
                        r.blobs_downloaded,
                        mib(r.bytes_downloaded),
                        r.manifests_written,
                        r.tags_deleted,
                        r.pushed_to_parent
                    );
                    if let Some(e) = &s.last_error {
                        println!("error: {e}");
                    }
                }
                // Another run started since: its figures are not this run's.
                None => println!("sync run {number} {result}"),
            }
            return Ok(if result == "success" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        let line = match &request {
            Some(id) if !s.requests.iter().any(|q| q.id == *id) => {
                format!("sync {id}: waiting for the leading process to start it")
            }
            _ => progress_line(&s, run),
        };
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!("{line}");
            last_print = Instant::now();
        }
        if began.elapsed() > a.timeout {
            return Err(CliError::Admin(format!(
                "sync run {run} still going after {:?}; follow it with `outpost-registry status`",
                a.timeout
            )));
        }
    }
}

fn read_image_list(path: &std::path::Path) -> Result<Vec<String>, CliError> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| CliError::Admin(format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// A 24-cell bar, e.g. `[##########..............]  42%`.
fn bar(done: u64, total: u64) -> String {
    let pct = (done.min(total) * 100)
        .checked_div(total)
        .map_or(100, |p| p as usize);
    let filled = pct * 24 / 100;
    format!(
        "[{}{}] {pct:>3}%",
        "#".repeat(filled),
        ".".repeat(24 - filled)
    )
}

/// One line per image: name, state, progress, and the error when there is one.
pub fn render_staging(r: &StagingRequest, bars: bool) -> Vec<String> {
    let width = r.images.iter().map(|i| i.image.len()).max().unwrap_or(0);
    r.images
        .iter()
        .map(|i| {
            let mut line = format!("{:<width$}  {:<11}", i.image, i.state.as_str());
            if bars {
                line.push_str(&format!(" {}", bar(i.bytes_done, i.bytes_total)));
            }
            line.push_str(&format!(" {} / {}", mib(i.bytes_done), mib(i.bytes_total)));
            if let Some(e) = &i.error {
                line.push_str(&format!("  {e}"));
            }
            line
        })
        .collect()
}

pub async fn stage(a: StageArgs) -> Result<ExitCode, CliError> {
    let c = client(&a.admin)?;
    let id = match &a.id {
        Some(id) => id.clone(),
        None => {
            let mut images = a.images.clone();
            if let Some(f) = &a.file {
                images.extend(read_image_list(f)?);
            }
            if images.is_empty() {
                return Err(CliError::Admin(
                    "name at least one image (arguments or -f FILE)".into(),
                ));
            }
            let body = post_json(
                &c,
                &a.admin,
                "/outpost/v1/staging",
                Some(serde_json::json!({ "images": images })),
                "staging refused",
            )
            .await?;
            let id = body["id"].as_str().unwrap_or_default().to_owned();
            println!("staging request {id} accepted ({} images)", images.len());
            id
        }
    };
    if !a.wait {
        println!("follow it with: outpost-registry stage --id {id} --wait");
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::stderr().is_terminal();
    let began = Instant::now();
    let mut drawn = 0usize;
    let mut last_plain: Vec<String> = Vec::new();
    loop {
        let r: StagingRequest =
            get_json(&c, &a.admin, &format!("/outpost/v1/staging/{id}")).await?;
        let finished = r.finished_utc.is_some();
        if tty {
            let lines = render_staging(&r, true);
            let mut err = std::io::stderr();
            // Redraw in place: up over the previous frame, clearing each line.
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            for l in &lines {
                let _ = writeln!(err, "\r\x1b[2K{l}");
            }
            let _ = err.flush();
            drawn = lines.len();
        } else {
            // Plain lines when something other than byte counts changed.
            let states: Vec<String> = r
                .images
                .iter()
                .map(|i| format!("{}{:?}", i.state.as_str(), i.error))
                .collect();
            if states != last_plain {
                for l in render_staging(&r, false) {
                    eprintln!("{l}");
                }
                last_plain = states;
            }
        }
        if finished {
            let staged = r
                .images
                .iter()
                .filter(|i| i.state == ImageState::Staged)
                .count();
            let failed = r.images.len() - staged;
            println!("staging {id} {}: {staged} staged, {failed} failed", r.state);
            for i in r.images.iter().filter(|i| i.state == ImageState::Failed) {
                println!(
                    "failed: {}: {}",
                    i.image,
                    i.error.as_deref().unwrap_or("unknown error")
                );
            }
            return Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if began.elapsed() > a.timeout {
            return Err(CliError::Admin(format!(
                "staging {id} still going after {:?}; follow it with `outpost-registry stage --id {id} --wait`",
                a.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::staging::ImageStatus;

    #[test]
    fn staging_lines_show_state_progress_and_error() {
        let img = |image: &str, state, done, total, error: Option<&str>| ImageStatus {
            image: image.into(),
            repository: None,
            reference: None,
            digest: None,
            state,
            bytes_done: done,
            bytes_total: total,
            error: error.map(String::from),
        };
        let r = StagingRequest {
            id: "stg-1".into(),
            created_utc: "2026-11-22T10:00:00Z".into(),
            finished_utc: None,
            state: "running".into(),
            images: vec![
                img("app:v1", ImageState::Downloading, 512 << 10, 1 << 20, None),
                img("app:nope", ImageState::Failed, 0, 0, Some("not found")),
            ],
        };
        let lines = render_staging(&r, true);
        assert!(
            lines[0].contains("downloading") && lines[0].contains(" 50%"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("0.5 MiB / 1.0 MiB"), "{}", lines[0]);
        assert!(
            lines[1].contains("failed") && lines[1].ends_with("not found"),
            "{}",
            lines[1]
        );
        assert!(!render_staging(&r, false)[0].contains('#'));
    }

    #[test]
    fn status_table_has_the_contract_columns() {
        let s = Status {
            name: "edge-1".into(),
            mode: "readonly".into(),
            connection_state: "online".into(),
            parent: "myacr.westeurope.data.azurecr.io".into(),
            login_server: "myacr.azurecr.io".into(),
            last_sync_utc: Some("2026-11-22T10:00:00Z".into()),
            sync_schedule: "* * * * *".into(),
            sync_window: "PT4H".into(),
            storage_bytes: 0,
            repositories: vec![],
            syncing: false,
            last_error: None,
            scope_note: None,
            last_run: None,
            outbox_pending: 0,
            requests: vec![],
            platforms: vec!["linux/amd64".into(), "linux/arm/v7".into()],
        };
        let t = render_status(&s);
        let mut lines = t.lines();
        let head = lines.next().unwrap();
        let cols: Vec<&str> = head
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            cols,
            [
                "NAME",
                "MODE",
                "CONNECTION STATE",
                "PARENT",
                "LOGIN SERVER",
                "LAST SYNC(UTC)",
                "SYNC SCHEDULE",
                "SYNC WINDOW"
            ]
        );
        let row = lines.next().unwrap();
        assert!(row.starts_with("edge-1"));
        assert!(row.contains("myacr.azurecr.io") && row.contains("2026-11-22T10:00:00Z"));
        let filter = lines
            .find_map(|l| l.strip_prefix("platforms: "))
            .expect("the platform filter is shown");
        assert!(filter.starts_with("linux/amd64, linux/arm/v7 "), "{filter}");
    }

    #[test]
    fn children_table_has_the_contract_columns() {
        let child = |name: &str, parent: &str, state: &str| ChildView {
            name: name.into(),
            mode: "readonly".into(),
            connection_state: state.into(),
            parent: parent.into(),
            login_server: "127.0.0.1:5000".into(),
            last_sync_utc: Some("2026-11-22T10:00:00Z".into()),
            last_heard_utc: "2026-11-22T10:00:01Z".into(),
            seconds_since_heard: 3,
            offline_after_seconds: 120,
            reported_connection_state: "online".into(),
            version: "0.1.0".into(),
            storage_bytes: 3 << 20,
            staging: [("staged".to_owned(), 2u64)].into_iter().collect(),
            sync_interval_seconds: Some(60),
            last_error: None,
        };
        let t = render_children(&[
            child("edge-a", "-", "Online"),
            child("edge-b", "edge-a", "Offline"),
        ]);
        let lines: Vec<Vec<&str>> = t
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(
            lines[0],
            [
                "NAME",
                "MODE",
                "CONNECTION STATE",
                "PARENT",
                "LOGIN SERVER",
                "LAST SYNC(UTC)"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "edge-b",
                "readonly",
                "Offline",
                "edge-a",
                "127.0.0.1:5000",
                "2026-11-22T10:00:00Z"
            ]
        );
        let d = render_child(&child("edge-b", "edge-a", "Offline"));
        assert!(
            d.contains("2 staged") && d.contains("3.0 MiB") && d.contains("120 s unheard"),
            "{d}"
        );
    }
}
