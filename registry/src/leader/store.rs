//! The leader lease as a document in the store itself (`sync/leader.json`), for processes that
//! share an object store without Kubernetes. Every write is conditional on the version read
//! (a conditional create when there is none), so two processes racing for it cannot both win.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Lease, LeaseError, Observed, may_take};
use crate::storage::{DocVersion, StorageError, Store};

const KEY: &str = "leader.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    /// Empty when released.
    holder: String,
    duration_ms: u64,
    /// For people reading the object; expiry is judged from observed changes, not from this.
    renewed_utc: String,
}

pub struct StoreLease {
    store: Arc<dyn Store>,
    observed: Observed,
}

impl StoreLease {
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreLease {
            store,
            observed: Observed::default(),
        }
    }

    fn err(&self, e: StorageError) -> LeaseError {
        LeaseError::Backend {
            lease: self.describe(),
            message: e.to_string(),
        }
    }

    async fn read(&self) -> Result<Option<(Option<Record>, DocVersion)>, LeaseError> {
        let Some((raw, version)) = self
            .store
            .doc_get_versioned(KEY)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        // Unreadable: treated as a record nobody holds, replaced by the next write.
        Ok(Some((serde_json::from_slice(&raw).ok(), version)))
    }

    async fn write(
        &self,
        holder: &str,
        duration: Duration,
        expected: Option<&DocVersion>,
    ) -> Result<bool, LeaseError> {
        let record = Record {
            holder: holder.to_owned(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            renewed_utc: jiff::Timestamp::now().to_string(),
        };
        let raw = serde_json::to_vec(&record)
            .map_err(|e| self.err(StorageError::Io(std::io::Error::other(e))))?;
        let written = self
            .store
            .doc_put_if(KEY, raw.into(), expected)
            .await
            .map_err(|e| self.err(e))?;
        Ok(written.is_some())
    }
}

#[async_trait::async_trait]
impl Lease for StoreLease {
    async fn acquire_or_renew(&self, holder: &str, duration: Duration) -> Result<bool, LeaseError> {
        let Some((record, version)) = self.read().await? else {
            return self.write(holder, duration, None).await;
        };
        let unchanged = self.observed.unchanged_for(version.as_str());
        let (current, theirs) = record.as_ref().map_or((None, Duration::ZERO), |r| {
            (
                Some(r.holder.as_str()),
                Duration::from_millis(r.duration_ms),
            )
        });
        if !may_take(holder, current, unchanged, theirs) {
            return Ok(false);
        }
        self.write(holder, duration, Some(&version)).await
    }

    async fn release(&self, holder: &str) -> Result<(), LeaseError> {
        match self.read().await? {
            Some((Some(r), version)) if r.holder == holder => {
                self.write("", Duration::ZERO, Some(&version)).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        "the store's sync/leader.json".to_owned()
    }
}
