//! One download per blob, however many want it at once: a sync run, a staging request and any
//! number of clients pulling through all join the same flight. Clients do not wait for the end:
//! they stream what the download has written so far from the store's upload session and follow
//! it as it grows, then read the rest from the committed blob.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use outpost_core::{Digest, RepositoryName};
use tokio::sync::watch;

use super::parent::{Parent, ParentError};
use super::state::StateFile;
use super::transfer::{self, Observer, Outcome, Throttle, TransferContext, TransferError};
use crate::metrics::Metrics;
use crate::storage::{ByteStream, RangeRequest, StorageError, Store};

/// How a flight ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Stored, verified and linked into the repository it was fetched for.
    Done,
    /// The sync window closed; what arrived is kept for later.
    Paused,
    Failed {
        message: String,
        /// The parent could not be reached or refused the token (not a per-blob problem).
        contact: bool,
        /// The parent does not have it.
        not_found: bool,
    },
}

/// What followers see of a flight.
#[derive(Debug, Clone, Default)]
pub struct FlightState {
    pub size: Option<u64>,
    /// Bytes taken from the parent so far (the store may still be writing the last piece).
    pub bytes: u64,
    pub end: Option<End>,
}

pub struct Flight {
    pub digest: Digest,
    tx: watch::Sender<FlightState>,
    /// Bytes of this blob stored so far (the status page's progress).
    pub progress: Arc<AtomicU64>,
    /// Bytes this flight downloaded (excluding what an earlier partial download had).
    pub downloaded: Arc<AtomicU64>,
}

impl Flight {
    pub fn subscribe(&self) -> watch::Receiver<FlightState> {
        self.tx.subscribe()
    }

    /// Waits for the flight to end.
    pub async fn wait(&self) -> End {
        let mut rx = self.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().end.clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return End::Failed {
                    message: "download abandoned".into(),
                    contact: false,
                    not_found: false,
                };
            }
        }
    }
}

struct FlightObserver(watch::Sender<FlightState>);

impl Observer for FlightObserver {
    fn size(&self, size: u64) {
        self.0.send_modify(|s| s.size = Some(size));
    }

    fn progress(&self, bytes: u64) {
        self.0.send_modify(|s| s.bytes = bytes);
    }
}

/// The blob downloads under way.
pub struct Flights {
    store: Arc<dyn Store>,
    state: Arc<StateFile>,
    metrics: Arc<Metrics>,
    chunk_size: u64,
    throttle: Option<Arc<Throttle>>,
    active: Mutex<HashMap<Digest, Arc<Flight>>>,
}

/// Options of one flight, from whoever starts it.
#[derive(Debug, Clone, Copy)]
pub struct FlightOptions {
    pub size: Option<u64>,
    pub deadline: Option<SystemTime>,
    pub attempts: u32,
}

impl Flights {
    pub fn new(
        store: Arc<dyn Store>,
        state: Arc<StateFile>,
        metrics: Arc<Metrics>,
        chunk_size: u64,
        throttle: Option<Arc<Throttle>>,
    ) -> Self {
        Flights {
            store,
            state,
            metrics,
            chunk_size,
            throttle,
            active: Mutex::new(HashMap::new()),
        }
    }

    /// Joins the download of `digest` under way, or starts one from `repo` at the parent.
    /// True in the second place when this call started it.
    pub fn fetch(
        self: &Arc<Self>,
        parent: Arc<Parent>,
        repo: &RepositoryName,
        digest: &Digest,
        opts: FlightOptions,
    ) -> (Arc<Flight>, bool) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = active.get(digest) {
            return (f.clone(), false);
        }
        let (tx, _) = watch::channel(FlightState {
            size: opts.size,
            ..Default::default()
        });
        let flight = Arc::new(Flight {
            digest: digest.clone(),
            tx: tx.clone(),
            progress: Arc::new(AtomicU64::new(0)),
            downloaded: Arc::new(AtomicU64::new(0)),
        });
        active.insert(digest.clone(), flight.clone());
        drop(active);
        let ctx = Arc::new(TransferContext {
            throttle: self.throttle.clone(),
            deadline: opts.deadline,
            downloaded: flight.downloaded.clone(),
            attempts: opts.attempts.max(1),
            observer: Some(Arc::new(FlightObserver(tx))),
            ..TransferContext::new(
                self.store.clone(),
                self.state.clone(),
                self.metrics.clone(),
                self.chunk_size,
            )
        });
        let me = self.clone();
        let f = flight.clone();
        let repo = repo.clone();
        tokio::spawn(async move {
            let res = transfer::fetch_blob(
                ctx,
                &parent,
                &repo,
                &f.digest,
                opts.size,
                f.progress.clone(),
            )
            .await;
            let end = match res {
                Ok((_, Outcome::Done)) => End::Done,
                Ok((_, Outcome::Paused)) => End::Paused,
                Err(TransferError::Parent(e)) => End::Failed {
                    contact: e.is_contact_failure(),
                    not_found: matches!(e, ParentError::NotFound(_)),
                    message: e.to_string(),
                },
                Err(e) => End::Failed {
                    message: e.to_string(),
                    contact: false,
                    not_found: false,
                },
            };
            {
                let mut active = me.active.lock().unwrap_or_else(|p| p.into_inner());
                if active.get(&f.digest).is_some_and(|a| Arc::ptr_eq(a, &f)) {
                    active.remove(&f.digest);
                }
            }
            f.tx.send_modify(|s| s.end = Some(end));
        });
        (flight, true)
    }

    /// Fetches `blobs` (digest, size) from `repo` at the parent, `concurrency` at a time,
    /// joining flights already under way; how each one ended.
    pub async fn fetch_all(
        self: &Arc<Self>,
        parent: Arc<Parent>,
        repo: &RepositoryName,
        blobs: Vec<(Digest, u64)>,
        deadline: Option<SystemTime>,
        concurrency: usize,
    ) -> Vec<(Digest, u64, End)> {
        futures_util::stream::iter(blobs)
            .map(|(d, n)| {
                let parent = parent.clone();
                async move {
                    let (f, _) = self.fetch(
                        parent,
                        repo,
                        &d,
                        FlightOptions {
                            size: Some(n),
                            deadline,
                            attempts: transfer::ATTEMPTS,
                        },
                    );
                    (d, n, f.wait().await)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }

    /// The flight of `digest`, if one is under way.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// A stream of the whole blob for a client, following `flight` as it downloads. Ends with
    /// an error when the download fails (the client sees a cut body, never wrong bytes).
    pub fn follow(self: &Arc<Self>, flight: Arc<Flight>) -> ByteStream {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.pump(&flight, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    async fn pump(
        &self,
        flight: &Flight,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), std::io::Error> {
        let mut rx = flight.subscribe();
        let mut sent = 0u64;
        let key = flight.digest.to_string();
        // Bounded: a flight that stops making progress ends (fails) within its read timeout.
        loop {
            let st = rx.borrow_and_update().clone();
            match st.end {
                Some(End::Done) => {
                    return self.send_committed(&flight.digest, sent, tx).await;
                }
                Some(End::Paused) => {
                    return Err(std::io::Error::other(
                        "download paused at the end of the sync window; pull again",
                    ));
                }
                Some(End::Failed { message, .. }) => return Err(std::io::Error::other(message)),
                None => {}
            }
            let session = self.state.read(|s| s.partials.get(&key).cloned());
            let mut progressed = false;
            if let Some(p) = session
                && let Ok(repo) = p.repo.parse::<RepositoryName>()
            {
                match self.store.upload_read(&repo, &p.upload_id, sent).await {
                    Ok(mut body) => {
                        while let Some(piece) = body.next().await {
                            let piece = piece?;
                            if piece.is_empty() {
                                continue;
                            }
                            sent += piece.len() as u64;
                            progressed = true;
                            if tx.send(Ok(piece)).await.is_err() {
                                // The client went away; the download goes on for the others.
                                return Ok(());
                            }
                        }
                    }
                    // Finished (renamed into the store) or restarted in the meantime.
                    Err(StorageError::UploadUnknown) => {}
                    Err(e) => return Err(std::io::Error::other(e.to_string())),
                }
            }
            if !progressed {
                // Woken by new bytes or the end; the timeout covers a write that landed after
                // its notification.
                let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
            }
        }
    }

    async fn send_committed(
        &self,
        digest: &Digest,
        sent: u64,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), std::io::Error> {
        let range = (sent > 0).then_some(RangeRequest::From {
            first: sent,
            last: None,
        });
        let mut body = match self.store.blob_open(digest, range).await {
            Ok((r, _)) => r.body,
            // Everything was sent already.
            Err(StorageError::RangeNotSatisfiable { .. }) => return Ok(()),
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        };
        while let Some(piece) = body.next().await {
            if tx.send(Ok(piece?)).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Bytes stored so far of each blob being downloaded.
    pub fn progress_of(&self, digest: &Digest) -> Option<u64> {
        self.get(digest).map(|f| f.progress.load(Ordering::Relaxed))
    }
}
