//! Open-loop load for the webhook bench (`bench/webhook.py`): POSTs one AdmissionReview at a
//! fixed rate over HTTPS keep-alive and prints latency percentiles as JSON. Requests are
//! started on schedule whatever the server does, and each one's latency runs from its start,
//! including any wait for a free connection, so a stalled server cannot hide queueing (no
//! coordinated omission). Tokio's timer fires up to ~1 ms late; that lag is reported apart
//! (`schedule_lag_p99_ms`) rather than charged to the server.
//!
//! `admission_load --url https://127.0.0.1:8443/mutate --ca ca.crt --body review.json
//!  --rate 1000 --seconds 20 --connections 8`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    ca: std::path::PathBuf,
    #[arg(long)]
    body: std::path::PathBuf,
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Keep-alive connections (and requests in flight at most).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests sent first and not measured (TLS handshakes, caches).
    #[arg(long, default_value_t = 500)]
    warmup: u64,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&args.ca)?)?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .http1_only()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(10))
        .build()?;
    let body = bytes::Bytes::from(std::fs::read(&args.body)?);
    let send = |client: reqwest::Client, body: bytes::Bytes, url: String| async move {
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let ok = r.status().is_success();
        let text = r.bytes().await?;
        anyhow::Ok(ok && text.windows(6).any(|w| w == b"\"patch"))
    };
    for _ in 0..args.warmup {
        send(client.clone(), body.clone(), args.url.clone()).await?;
    }
    let total = args.rate * args.seconds;
    let gap = Duration::from_secs_f64(1.0 / args.rate as f64);
    let slots = Arc::new(Semaphore::new(args.connections));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + gap * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, body, url) = (client.clone(), body.clone(), args.url.clone());
        let (slots, results, errors) = (slots.clone(), results.clone(), errors.clone());
        let lag = due.elapsed();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            match send(client, body, url).await {
                Ok(true) => results.lock().await.push((started.elapsed(), lag)),
                _ => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat: Vec<Duration> = results.lock().await.iter().map(|r| r.0).collect();
    lat.sort();
    let mut lags: Vec<Duration> = results.lock().await.iter().map(|r| r.1).collect();
    lags.sort();
    let out = serde_json::json!({
        "requests": lat.len(),
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "achieved_rps": lat.len() as f64 / elapsed,
        "p50_ms": pct(&lat, 0.50),
        "p90_ms": pct(&lat, 0.90),
        "p99_ms": pct(&lat, 0.99),
        "p999_ms": pct(&lat, 0.999),
        "max_ms": lat.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        "schedule_lag_p99_ms": pct(&lags, 0.99),
    });
    println!("{out}");
    Ok(())
}
