//! The object store as the backend's code sees it: a wrapper that counts every request by
//! operation (object stores bill per request) and watches its outcome, so readiness knows
//! whether the store answered lately without asking it again; and the errors that mean "the
//! store is unavailable" from the others.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as Key;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// Whether `e` (an object_store error, or an I/O error carrying one) means the store did not
/// answer: connection refused, reset or timed out, a 5xx, or throttling (429, S3's SlowDown),
/// all after the client's own retries. Other errors (not found, refused credentials, a
/// precondition) are answers.
pub(crate) fn is_unavailable(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    // Bounded: error chains are short, but a cycle must not hang a request.
    for _ in 0..16 {
        let Some(err) = cur else { return false };
        if let Some(h) = err.downcast_ref::<HttpError>()
            && matches!(
                h.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            )
        {
            return true;
        }
        if let Some(ioe) = err.downcast_ref::<io::Error>() {
            use io::ErrorKind as K;
            if matches!(
                ioe.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::TimedOut
                    | K::BrokenPipe
            ) {
                return true;
            }
            // io::Error's source() skips the error it wraps: look at that one next.
            if let Some(inner) = ioe.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        if unavailable_text(&err.to_string()) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The client reports an HTTP answer it gave up on as "... status code: 503 Service
/// Unavailable ..." (its error type is private); S3 may also throttle in the body of a 200.
fn unavailable_text(text: &str) -> bool {
    let status = text
        .split("status code: ")
        .skip(1)
        .any(|rest| rest.starts_with('5') || rest.starts_with("429"));
    status || text.contains("<Code>SlowDown</Code>")
}

/// The operations counted, as named in `outpost_storage_requests_total{operation}`.
const OPERATIONS: [&str; 10] = [
    "get",
    "head",
    "put",
    "put_multipart",
    "put_part",
    "complete_multipart",
    "abort_multipart",
    "list",
    "delete",
    "copy",
];

#[derive(Clone, Copy)]
enum Op {
    Get,
    Head,
    Put,
    PutMultipart,
    PutPart,
    CompleteMultipart,
    AbortMultipart,
    List,
    Delete,
    Copy,
}

/// Keys a LIST page holds at most (S3's limit; Azure's pages may hold more, so a long Azure
/// listing is counted high).
const LIST_PAGE: u64 = 1000;

/// Requests sent to an object store since start, by operation (each is billed). Storage
/// exposes them; the metrics layer reads them on each scrape.
#[derive(Debug)]
pub struct RequestCounts {
    backend: &'static str,
    counts: [AtomicU64; OPERATIONS.len()],
}

impl RequestCounts {
    fn new(backend: &'static str) -> Self {
        RequestCounts {
            backend,
            counts: Default::default(),
        }
    }

    /// `s3` or `azblob`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Every operation with its count, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        OPERATIONS
            .iter()
            .zip(&self.counts)
            .map(|(op, n)| (*op, n.load(Ordering::Relaxed)))
            .collect()
    }

    fn add(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the last requests said about the store.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// When the last request ended, and whether the store answered it.
    last: Mutex<Option<(Instant, bool)>>,
    /// Held while a readiness probe runs, so concurrent checks share one request.
    pub(super) probing: tokio::sync::Mutex<()>,
}

impl Health {
    pub(super) fn observe<T>(&self, r: &object_store::Result<T>) {
        let answered = match r {
            Ok(_) => true,
            Err(e) => !is_unavailable(e),
        };
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), answered));
        }
    }

    /// Whether the store answered the last request, if that request ended within `within`.
    pub(super) fn recent(&self, within: Duration) -> Option<bool> {
        let last = *self.last.lock().ok()?;
        last.and_then(|(at, answered)| (at.elapsed() < within).then_some(answered))
    }
}

/// An [`ObjectStore`] that reports every outcome to a [`Health`].
#[derive(Debug)]
pub(super) struct Instrumented {
    inner: Arc<dyn ObjectStore>,
    health: Arc<Health>,
    counts: Arc<RequestCounts>,
}

impl Instrumented {
    pub(super) fn new(inner: Arc<dyn ObjectStore>, health: Arc<Health>) -> Self {
        // object_store's clients name themselves in Display ("AmazonS3(bucket)", …).
        let name = inner.to_string();
        let backend = if name.starts_with("AmazonS3") {
            "s3"
        } else if name.starts_with("MicrosoftAzure") {
            "azblob"
        } else {
            "other"
        };
        Instrumented {
            inner,
            health,
            counts: Arc::new(RequestCounts::new(backend)),
        }
    }

    pub(super) fn counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    fn watch<T>(&self, r: object_store::Result<T>) -> object_store::Result<T> {
        self.health.observe(&r);
        r
    }

    /// A listing, counted as one request per page: the first now, one more per full page of
    /// keys (a listing dropped early sends no further pages).
    fn count_pages(
        &self,
        s: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counts.add(Op::List);
        let counts = self.counts.clone();
        let mut seen = 0u64;
        self.watch_stream(
            s.map(move |r| {
                seen += 1;
                if seen.is_multiple_of(LIST_PAGE) {
                    counts.add(Op::List);
                }
                r
            })
            .boxed(),
        )
    }

    fn watch_stream<T: Send + 'static>(
        &self,
        s: BoxStream<'static, object_store::Result<T>>,
    ) -> BoxStream<'static, object_store::Result<T>> {
        let health = self.health.clone();
        s.map(move |r| {
            health.observe(&r);
            r
        })
        .boxed()
    }
}

impl fmt::Display for Instrumented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

// Methods with a default implementation in terms of these (get_ranges, rename_opts) are left to it, so their requests pass through here too.
#[async_trait]
impl ObjectStore for Instrumented {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.counts.add(Op::Put);
        self.watch(self.inner.put_opts(location, payload, opts).await)
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.counts.add(Op::PutMultipart);
        let upload = self.watch(self.inner.put_multipart_opts(location, opts).await)?;
        Ok(Box::new(Upload {
            inner: upload,
            health: self.health.clone(),
            counts: self.counts.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Key,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.counts
            .add(if options.head { Op::Head } else { Op::Get });
        self.watch(self.inner.get_opts(location, options).await)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Key>>,
    ) -> BoxStream<'static, object_store::Result<Key>> {
        // One request per key as this backend deletes (one at a time; S3 could batch).
        let counts = self.counts.clone();
        self.watch_stream(
            self.inner
                .delete_stream(locations)
                .map(move |r| {
                    counts.add(Op::Delete);
                    r
                })
                .boxed(),
        )
    }

    fn list(&self, prefix: Option<&Key>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.count_pages(self.inner.list(prefix))
    }

    // Forwarded rather than left to the default (a full listing filtered here): S3 and Azure
    // start the listing after `offset` themselves, which is what makes a page cheap.
    fn list_with_offset(
        &self,
        prefix: Option<&Key>,
        offset: &Key,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.count_pages(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Key>) -> object_store::Result<ListResult> {
        self.counts.add(Op::List);
        self.watch(self.inner.list_with_delimiter(prefix).await)
    }

    async fn copy_opts(
        &self,
        from: &Key,
        to: &Key,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.counts.add(Op::Copy);
        self.watch(self.inner.copy_opts(from, to, options).await)
    }
}

/// A multipart upload whose part, completion and abort requests are watched too.
#[derive(Debug)]
struct Upload {
    inner: Box<dyn MultipartUpload>,
    health: Arc<Health>,
    counts: Arc<RequestCounts>,
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.counts.add(Op::PutPart);
        let part = self.inner.put_part(data);
        let health = self.health.clone();
        Box::pin(async move {
            let r = part.await;
            health.observe(&r);
            r
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.counts.add(Op::CompleteMultipart);
        let r = self.inner.complete().await;
        self.health.observe(&r);
        r
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.counts.add(Op::AbortMultipart);
        let r = self.inner.abort().await;
        self.health.observe(&r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_and_5xx_are_unavailable_not_found_is_not() {
        let refused = object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                HttpErrorKind::Connect,
                io::Error::from(io::ErrorKind::ConnectionRefused),
            )),
        };
        assert!(is_unavailable(&refused));
        let wrapped = io::Error::other(refused);
        assert!(is_unavailable(&wrapped), "also inside an io::Error");
        let busy = object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: "Server returned non-2xx status code: 503 Service Unavailable: ServerBusy"
                .into(),
        };
        assert!(is_unavailable(&busy));
        let throttled = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 429 Too Many Requests: ".into(),
        };
        assert!(is_unavailable(&throttled));
        let missing = object_store::Error::NotFound {
            path: "x".into(),
            source: "Server returned non-2xx status code: 404 Not Found: ".into(),
        };
        assert!(!is_unavailable(&missing));
        let denied = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 403 Forbidden: ".into(),
        };
        assert!(!is_unavailable(&denied));
    }

    #[test]
    fn health_forgets_old_observations() {
        let h = Health::default();
        assert_eq!(h.recent(Duration::from_secs(60)), None);
        h.observe::<()>(&Ok(()));
        assert_eq!(h.recent(Duration::from_secs(60)), Some(true));
        assert_eq!(h.recent(Duration::ZERO), None);
    }
}
