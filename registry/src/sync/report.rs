//! A child's report to its parent, sent at the end of every sync run that reached the parent,
//! when the parent is an Outpost (it sets [`OUTPOST_API_HEADER`] on `/v2/`; ACR and the
//! distribution registry do not, and are never sent anything). A report that fails never fails
//! the sync: it is counted (`outpost_parent_reports_total{result}`) and logged at info once
//! per kind of failure, at debug after that.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::Syncer;
use super::children::{RegistryState, Report};
use super::parent::{Parent, ParentError};
use crate::metrics::{ResultLabels, StateLabels};

/// The header an Outpost sets on its registry API's answers, and its value.
pub const OUTPOST_API_HEADER: &str = "outpost-api";
pub const OUTPOST_API_VERSION: &str = "v1";
/// Where a child reports, followed by its name.
pub const REPORT_PATH: &str = "/outpost/v1/children/";
/// Longest a report may take: it follows the run, before the next one may start.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

/// The time between two firings of the schedule after `now`, if it fires twice.
fn interval(s: &super::schedule::Schedule, now: SystemTime) -> Option<u64> {
    let a = s.next_after(now)?;
    let b = s.next_after(a)?;
    b.duration_since(a).ok().map(|d| d.as_secs().max(1))
}

impl Syncer {
    /// This registry's state as its parent is told it.
    fn own_report(&self) -> Report {
        let st = self.status(self.metrics.storage_bytes.get());
        let staging = ["pending", "downloading", "staged", "failed"]
            .into_iter()
            .map(|state| {
                // The staging service above keeps these counts current; sync reads them here
                // rather than import it.
                let n = self
                    .metrics
                    .staging_images
                    .get_or_create(&StateLabels { state })
                    .get();
                (state.to_owned(), n.max(0) as u64)
            })
            .collect();
        Report {
            state: RegistryState {
                name: st.name,
                mode: st.mode,
                connection_state: st.connection_state,
                login_server: st.login_server,
                last_sync_utc: st.last_sync_utc,
                version: env!("CARGO_PKG_VERSION").into(),
                storage_bytes: st.storage_bytes,
                staging,
                sync_interval_seconds: interval(&self.opts.schedule, SystemTime::now()),
                last_error: st.last_error,
            },
            children: self
                .children
                .get()
                .map(|c| c.descendants())
                .unwrap_or_default(),
        }
    }

    /// Notes what the last `/v2/` answer said about the parent; says so when it changes.
    pub(super) fn note_parent_kind(&self, outpost: bool) {
        let before = self.parent_is_outpost.swap(outpost, Ordering::SeqCst);
        let first = !self.parent_kind_known.swap(true, Ordering::SeqCst);
        if first || before != outpost {
            if outpost {
                tracing::info!(
                    "the parent is an Outpost: this registry reports its state to it after each sync"
                );
            } else {
                tracing::info!("the parent is not an Outpost: no state is reported to it");
            }
        }
    }

    /// Reports to an Outpost parent (nothing for any other); never fails the run.
    pub(super) async fn report_to_parent(&self, parent: &Arc<Parent>) {
        if !self.parent_is_outpost.load(Ordering::SeqCst) {
            return;
        }
        let report = self.own_report();
        if !super::children::valid_name(&report.state.name) {
            self.report_outcome("failed", || {
                format!(
                    "ConnectedRegistryName {:?} cannot be reported (1-50 of A-Z a-z 0-9 - _)",
                    report.state.name
                )
            });
            return;
        }
        let body = match serde_json::to_vec(&report) {
            Ok(b) => b,
            Err(e) => {
                self.report_outcome("failed", || e.to_string());
                return;
            }
        };
        let sent = tokio::time::timeout(REPORT_TIMEOUT, parent.report(&report.state.name, body))
            .await
            .unwrap_or_else(|_| Err(ParentError::Unreachable("report timed out".into())));
        match sent {
            Ok(()) => self.report_outcome("sent", String::new),
            Err(ParentError::Denied(e)) => self.report_outcome("denied", || {
                format!(
                    "{e}; the sync token's scope map needs message/write on {}",
                    crate::auth::gateway_repository(&report.state.name)
                )
            }),
            Err(e) => self.report_outcome("failed", || e.to_string()),
        }
    }

    /// Counts a report's result and logs a failure at info the first time in a row it happens.
    fn report_outcome(&self, result: &'static str, why: impl FnOnce() -> String) {
        self.metrics
            .parent_reports
            .get_or_create(&ResultLabels { result })
            .inc();
        let mut last = self
            .last_report_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if result == "sent" {
            if last.take().is_some() {
                tracing::info!("state reported to the parent again");
            }
            return;
        }
        let why = why();
        if *last == Some(result) {
            tracing::debug!(result, error = %why, "cannot report this registry's state to the parent");
        } else {
            tracing::info!(result, error = %why, "cannot report this registry's state to the parent (the sync is not affected; logged once)");
            *last = Some(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_of_a_schedule() {
        let now = SystemTime::now();
        let every_3s = super::super::schedule::Schedule::new("*/3 * * * * *", None).unwrap();
        assert_eq!(interval(&every_3s, now), Some(3));
        let minutely = super::super::schedule::Schedule::new("* * * * *", None).unwrap();
        assert_eq!(interval(&minutely, now), Some(60));
    }
}
