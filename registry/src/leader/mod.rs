//! Leader election: of the processes serving one store, one leads and runs the schedule-driven
//! work (sync runs, the readwrite outbox, staging downloads, retention); all of them serve.
//! Leadership is a lease: a Kubernetes `Lease` object ([`kubernetes`]) when running in a
//! cluster, or a document in the store written with conditional writes ([`store`]). A leader renews it every third of its duration and steps down by itself when it
//! could not renew for two thirds of it, before any other process may take it over.
//!
//! Expiry is judged on the observer's own clock, from when it last saw the lease change (as
//! client-go does), so clocks that disagree between nodes cannot make two leaders.

pub mod kubernetes;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {lease}: {message}")]
    Backend { lease: String, message: String },
}

/// A lease record that several processes compete for.
#[async_trait::async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Takes the lease for `holder` when nobody holds it or its holder stopped renewing it for
    /// `duration` (as observed here), or renews it when `holder` holds it. True when `holder`
    /// holds it now.
    async fn acquire_or_renew(&self, holder: &str, duration: Duration) -> Result<bool, LeaseError>;
    /// Gives the lease up if `holder` holds it, so a successor need not wait for it to expire.
    async fn release(&self, holder: &str) -> Result<(), LeaseError>;
    /// What the lease is, for logs (never a credential).
    fn describe(&self) -> String;
}

/// Tells whether this process leads, and when that changes.
pub struct Leadership {
    identity: String,
    tx: watch::Sender<bool>,
    lease: Option<Arc<dyn Lease>>,
    /// Set by [`Leadership::resign`]: the election loop stops competing.
    resigned: std::sync::atomic::AtomicBool,
    /// One lease operation at a time, so a resignation cannot be overtaken by a renewal.
    op: tokio::sync::Mutex<()>,
}

impl Leadership {
    /// No election: this process is the only one (a directory store, which one process locks).
    pub fn sole(identity: String) -> Arc<Self> {
        let (tx, _) = watch::channel(true);
        Arc::new(Leadership {
            identity,
            tx,
            lease: None,
            resigned: false.into(),
            op: tokio::sync::Mutex::new(()),
        })
    }

    /// Competes for `lease` from now on, renewing every third of `duration`.
    pub fn elect(identity: String, lease: Arc<dyn Lease>, duration: Duration) -> Arc<Self> {
        let (tx, _) = watch::channel(false);
        let me = Arc::new(Leadership {
            identity,
            tx,
            lease: Some(lease.clone()),
            resigned: false.into(),
            op: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&me);
        let retry = (duration / 3).max(Duration::from_millis(200));
        // A leader that could not renew for this long steps down: the lease may be taken
        // over once `duration` has passed since its last renewal.
        let renew_deadline = duration.saturating_sub(retry);
        tokio::spawn(async move {
            let mut last_renewed: Option<Instant> = None;
            loop {
                let Some(me) = weak.upgrade() else { return };
                let op = me.op.lock().await;
                if me.resigned.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let leading = match lease.acquire_or_renew(&me.identity, duration).await {
                    Ok(true) => {
                        last_renewed = Some(Instant::now());
                        true
                    }
                    Ok(false) => false,
                    Err(e) => {
                        let keep = me.is_leader()
                            && last_renewed.is_some_and(|t| t.elapsed() < renew_deadline);
                        tracing::warn!(error = %e, leading = keep, "cannot renew the leader lease");
                        keep
                    }
                };
                me.set(leading);
                drop(op);
                drop(me);
                tokio::time::sleep(retry).await;
            }
        });
        me
    }

    fn set(&self, leading: bool) {
        let was = self.tx.send_replace(leading);
        if was != leading {
            match (leading, &self.lease) {
                (true, Some(l)) => {
                    tracing::info!(identity = %self.identity, lease = %l.describe(), "leading: this process runs sync, staging and retention")
                }
                (false, Some(l)) => {
                    tracing::info!(identity = %self.identity, lease = %l.describe(), "no longer leading: serving only")
                }
                _ => {}
            }
        }
    }

    /// No election: this process is the only one.
    pub fn is_sole(&self) -> bool {
        self.lease.is_none()
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    /// Follows leadership changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Waits until this process leads.
    pub async fn until_leading(&self) {
        let mut rx = self.subscribe();
        // The sender lives as long as `self`, so this ends only by leading.
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Steps down and gives the lease up (at shutdown), so a successor starts at once.
    pub async fn resign(&self) {
        let Some(lease) = &self.lease else { return };
        let _op = self.op.lock().await;
        self.resigned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.set(false);
        if let Err(e) = lease.release(&self.identity).await {
            tracing::warn!(error = %e, "cannot release the leader lease; it expires by itself");
        }
    }
}

/// This process's name in a lease: the pod's name when the chart sets `POD_NAME`, else the
/// host name, with a random suffix so two processes on one host differ.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "outpost".to_owned());
    let mut b = [0u8; 4];
    aws_lc_rs::rand::fill(&mut b).unwrap_or_default();
    let suffix: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{base}-{suffix}")
}

/// Whether `holder` may write the lease whose current holder is `current` (None or empty:
/// released) and whose record has not changed for `unchanged` (observed here) against its
/// `duration`: it is ours, free, or expired. The rule every backend applies.
pub(crate) fn may_take(
    holder: &str,
    current: Option<&str>,
    unchanged: Duration,
    duration: Duration,
) -> bool {
    match current.filter(|h| !h.is_empty() && *h != holder) {
        None => true,
        Some(other) if unchanged >= duration => {
            tracing::info!(previous = %other, "the leader lease expired; taking it over");
            true
        }
        Some(_) => false,
    }
}

/// When the record a lease backend last read changed, on this process's clock: expiry is
/// judged from this, never from the timestamps other hosts wrote.
#[derive(Default)]
pub(crate) struct Observed {
    last: std::sync::Mutex<Option<(String, Instant)>>,
}

impl Observed {
    /// Notes the record's version; how long it has been unchanged.
    pub(crate) fn unchanged_for(&self, version: &str) -> Duration {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((v, at)) if v == version => at.elapsed(),
            _ => {
                *last = Some((version.to_owned(), Instant::now()));
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A lease in memory applying the real take-over rule, to test the election loop.
    struct Memory {
        holder: Mutex<Option<String>>,
        observed: Observed,
        version: Mutex<u64>,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Lease for Memory {
        async fn acquire_or_renew(
            &self,
            holder: &str,
            duration: Duration,
        ) -> Result<bool, LeaseError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LeaseError::Backend {
                    lease: "memory".into(),
                    message: "down".into(),
                });
            }
            let mut h = self.holder.lock().unwrap();
            let mut v = self.version.lock().unwrap();
            // Every holder here asks with the same duration, so it stands for the record's.
            let unchanged = self.observed.unchanged_for(&v.to_string());
            let free = may_take(holder, h.as_deref(), unchanged, duration);
            if free {
                *h = Some(holder.to_owned());
                *v += 1;
            }
            Ok(free)
        }
        async fn release(&self, holder: &str) -> Result<(), LeaseError> {
            let mut h = self.holder.lock().unwrap();
            if h.as_deref() == Some(holder) {
                *h = None;
                *self.version.lock().unwrap() += 1;
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    async fn wait(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn one_leads_a_resignation_hands_over_and_an_unrenewable_lease_steps_down() {
        let lease = Arc::new(Memory {
            holder: Mutex::new(None),
            observed: Observed::default(),
            version: Mutex::new(0),
            fail: false.into(),
        });
        let d = Duration::from_millis(600);
        let a = Leadership::elect("a".into(), lease.clone(), d);
        wait("a leads", || a.is_leader()).await;
        let b = Leadership::elect("b".into(), lease.clone(), d);
        // b keeps observing a renewing: it never leads while a does.
        tokio::time::sleep(d * 2).await;
        assert!(a.is_leader() && !b.is_leader());
        a.resign().await;
        wait("b takes over after the resignation", || b.is_leader()).await;
        assert!(!a.is_leader());
        // The lease store fails: b steps down by itself within the duration.
        lease.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        wait("b steps down", || !b.is_leader()).await;
        assert!(Leadership::sole("x".into()).is_leader());
    }
}
