//! One blob from the parent into the store, resumable: the download goes into an upload
//! session of the store, appended (and fsynced) one chunk at a time, so a fault, a closing
//! window or a restart loses at most the chunk in flight. The store verifies the digest before
//! the blob becomes visible.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use outpost_core::{Digest, RepositoryName};

use super::parent::{Parent, ParentError, backoff};
use super::state::{Partial, StateFile};
use crate::metrics::Metrics;
use crate::storage::{ByteStream, StorageError, Store};

/// Attempts at one blob within one run (each resumes where the last one stopped).
pub const ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("blob {digest} from the parent does not match its digest; discarded")]
    Corrupt { digest: Digest },
}

/// How a transfer ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The blob is stored, verified and linked.
    Done,
    /// The window closed; what arrived is kept for the next run.
    Paused,
}

/// Caps the download rate shared by every transfer (a token bucket of one second).
pub struct Throttle {
    rate: u64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Self {
        Throttle {
            rate: bytes_per_second.max(1),
            state: std::sync::Mutex::new((0.0, Instant::now())),
        }
    }

    /// How long to wait before `n` more bytes may be taken.
    fn reserve(&self, n: usize) -> Duration {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (ref mut tokens, ref mut last) = *g;
        let now = Instant::now();
        let rate = self.rate as f64;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        *tokens -= n as f64;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / rate)
        }
    }
}

/// Told of a transfer's progress as it happens (pull-through readers follow the download).
pub trait Observer: Send + Sync {
    /// The blob's size became known.
    fn size(&self, size: u64);
    /// More bytes were taken from the parent (not necessarily written yet).
    fn progress(&self, bytes: u64);
}

/// What every transfer of a run shares.
pub struct TransferContext {
    pub store: Arc<dyn Store>,
    pub state: Arc<StateFile>,
    pub metrics: Arc<Metrics>,
    pub chunk_size: u64,
    pub throttle: Option<Arc<Throttle>>,
    /// Transfers stop (keeping what arrived) at this instant.
    pub deadline: Option<SystemTime>,
    /// Bytes downloaded in this run.
    pub downloaded: Arc<AtomicU64>,
    /// Attempts at one blob (each resumes where the last one stopped).
    pub attempts: u32,
    pub observer: Option<Arc<dyn Observer>>,
}

impl TransferContext {
    /// A context for transfers outside a run, with nothing of the run's own.
    pub fn new(
        store: Arc<dyn Store>,
        state: Arc<StateFile>,
        metrics: Arc<Metrics>,
        chunk_size: u64,
    ) -> Self {
        TransferContext {
            store,
            state,
            metrics,
            chunk_size: chunk_size.max(64 * 1024),
            throttle: None,
            deadline: None,
            downloaded: Arc::new(AtomicU64::new(0)),
            attempts: ATTEMPTS,
            observer: None,
        }
    }
}

impl TransferContext {
    fn window_closed(&self) -> bool {
        self.deadline.is_some_and(|d| SystemTime::now() >= d)
    }
}

/// Why a chunk's body stream stopped early.
#[derive(Debug, Clone)]
enum Stop {
    Window,
    Fault(String),
}

/// The parent's response body, cut into chunk-sized streams for the store one at a time.
struct Source {
    body: ByteStream,
    pending: Option<Bytes>,
    ended: bool,
    stop: Option<Stop>,
}

fn chunk_stream(
    src: Arc<tokio::sync::Mutex<Source>>,
    limit: u64,
    ctx: Arc<TransferContext>,
    progress: Arc<AtomicU64>,
) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        (src, limit),
        move |(src, remaining)| {
            let ctx = ctx.clone();
            let progress = progress.clone();
            async move {
                if remaining == 0 {
                    return None;
                }
                let mut g = src.lock().await;
                if g.stop.is_some() || g.ended {
                    return None;
                }
                if ctx.window_closed() {
                    g.stop = Some(Stop::Window);
                    return Some((
                        Err(io::Error::other("sync window closed")),
                        (src.clone(), 0),
                    ));
                }
                let mut piece = match g.pending.take() {
                    Some(p) => p,
                    None => match g.body.next().await {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => {
                            g.stop = Some(Stop::Fault(e.to_string()));
                            return Some((Err(e), (src.clone(), 0)));
                        }
                        None => {
                            g.ended = true;
                            return None;
                        }
                    },
                };
                if piece.len() as u64 > remaining {
                    g.pending = Some(piece.split_off(remaining as usize));
                }
                drop(g);
                if let Some(t) = &ctx.throttle {
                    let wait = t.reserve(piece.len());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
                let n = piece.len() as u64;
                ctx.metrics.sync_bytes_downloaded.inc_by(n);
                ctx.downloaded.fetch_add(n, Ordering::Relaxed);
                let now = progress.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(o) = &ctx.observer {
                    o.progress(now);
                }
                Some((Ok(piece), (src, remaining - n)))
            }
        },
    ))
}

/// Finds the session holding a partial download of `digest`, or starts one in `repo`.
async fn session(
    ctx: &TransferContext,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<(RepositoryName, String, u64), TransferError> {
    let key = digest.to_string();
    if let Some(p) = ctx.state.read(|s| s.partials.get(&key).cloned())
        && let Ok(r) = p.repo.parse::<RepositoryName>()
    {
        match ctx.store.upload_status(&r, &p.upload_id).await {
            Ok(st) => return Ok((r, p.upload_id, st.offset)),
            // Expired or removed: start over.
            Err(StorageError::UploadUnknown) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let id = ctx.store.upload_start(repo).await?;
    ctx.state.update(|s| {
        s.partials.insert(
            key,
            Partial {
                repo: repo.as_str().to_owned(),
                upload_id: id.clone(),
            },
        )
    });
    // Durable before any byte lands in the session, so a crash resumes rather than restarts.
    if let Err(e) = ctx.state.save().await {
        tracing::warn!(error = %e, "cannot save sync state");
    }
    Ok((repo.clone(), id, 0))
}

fn forget_partial(ctx: &TransferContext, digest: &Digest) {
    let key = digest.to_string();
    ctx.state.update(|s| s.partials.remove(&key));
}

/// Downloads `digest` (of `size` bytes, when known) from `repo` at the parent into the store,
/// resuming a partial download if there is one. `progress` counts the bytes of this blob now
/// stored.
pub async fn fetch_blob(
    ctx: Arc<TransferContext>,
    parent: &Parent,
    repo: &RepositoryName,
    digest: &Digest,
    mut size: Option<u64>,
    progress: Arc<AtomicU64>,
) -> Result<(RepositoryName, Outcome), TransferError> {
    // Stored in the meantime (a download that just ended): link it, fetch nothing.
    if let Some(n) = ctx.store.blob_size(digest).await? {
        super::image::link(&*ctx.store, repo, digest).await?;
        progress.store(n, Ordering::Relaxed);
        if let Some(o) = &ctx.observer {
            o.size(n);
        }
        return Ok((repo.clone(), Outcome::Done));
    }
    let (session_repo, mut id, mut offset) = session(&ctx, repo, digest).await?;
    progress.store(offset, Ordering::Relaxed);
    if let (Some(n), Some(o)) = (size, &ctx.observer) {
        o.size(n);
    }
    let mut attempt = 0;
    loop {
        if size.is_some_and(|n| offset >= n) {
            break;
        }
        if ctx.window_closed() {
            return Ok((session_repo, Outcome::Paused));
        }
        attempt += 1;
        let fault = match parent.blob(repo, digest, offset).await {
            Ok(b) => {
                if size.is_none()
                    && let Some(n) = b.total
                {
                    size = Some(n);
                    if let Some(o) = &ctx.observer {
                        o.size(n);
                    }
                }
                if b.starts_at != offset {
                    // The parent ignored the Range: start the session over from zero.
                    tracing::info!(%digest, offset, "parent does not serve ranges; downloading whole");
                    let _ = ctx.store.upload_cancel(&session_repo, &id).await;
                    forget_partial(&ctx, digest);
                    let (_, new_id, _) = session(&ctx, &session_repo, digest).await?;
                    id = new_id;
                    offset = 0;
                    progress.store(0, Ordering::Relaxed);
                }
                let src = Arc::new(tokio::sync::Mutex::new(Source {
                    body: b.body,
                    pending: None,
                    ended: false,
                    stop: None,
                }));
                let mut fault = None;
                loop {
                    let chunk =
                        chunk_stream(src.clone(), ctx.chunk_size, ctx.clone(), progress.clone());
                    let res = ctx
                        .store
                        .upload_append(&session_repo, &id, Some(offset), chunk)
                        .await;
                    let (ended, stop) = {
                        let g = src.lock().await;
                        (g.ended, g.stop.clone())
                    };
                    match res {
                        Ok(st) => offset = st.offset,
                        Err(StorageError::Body(_)) => {
                            // What arrived before the stop is stored; continue from there.
                            offset = ctx.store.upload_status(&session_repo, &id).await?.offset;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    progress.store(offset, Ordering::Relaxed);
                    if let Some(o) = &ctx.observer {
                        o.progress(offset);
                    }
                    match stop {
                        Some(Stop::Window) => return Ok((session_repo, Outcome::Paused)),
                        Some(Stop::Fault(f)) => {
                            fault = Some(ParentError::Unreachable(f));
                            break;
                        }
                        None => {}
                    }
                    if ended || size.is_some_and(|n| offset >= n) {
                        break;
                    }
                }
                match size {
                    Some(n) if fault.is_none() && offset < n => {
                        fault = Some(ParentError::Unreachable(format!(
                            "blob {digest} ended at {offset} of {n} bytes"
                        )));
                    }
                    // Without a size, the end of the body is the end of the blob; the digest
                    // check on finish catches a short one.
                    None if fault.is_none() => size = Some(offset),
                    _ => {}
                }
                fault
            }
            Err(e) => Some(e),
        };
        match fault {
            None => break,
            Some(e) if e.is_transient() && attempt < ctx.attempts => {
                tracing::info!(%digest, offset, attempt, error = %e, "blob download interrupted; resuming");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Some(e) => return Err(e.into()),
        }
    }
    match ctx.store.upload_finish(&session_repo, &id, digest).await {
        Ok(_) => {
            forget_partial(&ctx, digest);
            Ok((session_repo, Outcome::Done))
        }
        Err(StorageError::DigestMismatch { .. }) | Err(StorageError::SizeMismatch { .. }) => {
            let _ = ctx.store.upload_cancel(&session_repo, &id).await;
            forget_partial(&ctx, digest);
            Err(TransferError::Corrupt {
                digest: digest.clone(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_spreads_bytes_over_time() {
        let t = Throttle::new(1000);
        assert_eq!(t.reserve(0), Duration::ZERO);
        let w = t.reserve(2000);
        assert!(
            w > Duration::from_millis(1900) && w <= Duration::from_millis(2000),
            "{w:?}"
        );
    }
}
