//! The maintenance lock (shared by manifest writes, exclusive for gc) and the serving lock.

use std::fs::{self, File};
use std::io;

use super::FsStore;
use super::files::*;
use crate::storage::{MaintenanceGuard, MaintenanceHold, StorageError};

pub(super) struct FileLockGuard(#[allow(dead_code)] File);

/// An flock is held until the file closes, also across a stalled process: nothing to check.
impl MaintenanceHold for FileLockGuard {}

impl FsStore {
    pub(super) fn lock_file(&self, exclusive: bool) -> io::Result<FileLockGuard> {
        // A new open file description per guard: flock locks belong to the description, so
        // sharing one would let one guard's release unlock another's.
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("maintenance.lock"))?;
        if exclusive {
            f.lock()?;
        } else {
            f.lock_shared()?;
        }
        Ok(FileLockGuard(f))
    }

    /// Takes the lock that keeps a second server off this store; held while the file lives.
    pub fn lock_for_serving(&self) -> io::Result<File> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("serve.lock"))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another outpost-registry is serving {}",
                    self.root.display()
                ),
            )),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

pub(super) async fn maintenance_lock(store: &FsStore) -> Result<MaintenanceGuard, StorageError> {
    let store = store.handle();
    let guard = blocking(move || Ok(store.lock_file(true)?)).await?;
    Ok(Box::new(guard))
}
