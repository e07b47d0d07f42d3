//! Brings the node's files in line with the config: writes what is wanted (atomically, only
//! when the content differs), removes owned files no rule wants any more, refuses to touch
//! files it does not own, and undoes everything on cleanup. What it created (directories,
//! registries.yaml keys, backups) is recorded in a small state file next to what it manages,
//! so a restarted agent cleans up after its predecessor too.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use outpost_core::MirrorConfig;
use serde::{Deserialize, Serialize};

use crate::render::{self, DesiredFile, MANAGED_HEADER, OwnedYamlKeys, RenderOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// containerd's hosts directory (`/etc/containerd/certs.d`, or `--hosts-dir`).
    Containerd,
    /// k3s's `/etc/rancher/k3s/registries.yaml` (k3s reads it at start).
    K3s,
    /// RKE2's `/etc/rancher/rke2/registries.yaml` (k3s's format; RKE2 reads it at start).
    Rke2,
}

impl Runtime {
    /// True when the agent writes registries.yaml rather than containerd's hosts directory.
    pub fn uses_registries_yaml(self) -> bool {
        matches!(self, Runtime::K3s | Runtime::Rke2)
    }

    /// The default layout of this runtime's files.
    pub fn default_layout(self) -> render::Layout {
        match self {
            Runtime::Rke2 => render::Layout {
                registries_yaml: PathBuf::from(render::RKE2_REGISTRIES_YAML),
                ..Default::default()
            },
            Runtime::Containerd | Runtime::K3s => render::Layout::default(),
        }
    }

    /// What to restart after registries.yaml changed.
    fn services(self) -> &'static str {
        match self {
            Runtime::Rke2 => "rke2-server (or rke2-agent)",
            _ => "k3s (or k3s-agent)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("state file {path} is unreadable: {reason}")]
    State { path: String, reason: String },
    #[error(
        "the registry serves HTTPS (registry_plain_http is not set) and no CA was given (--ca-file)"
    )]
    NoCa,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReconcileError + '_ {
    move |source| ReconcileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What the agent made, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// Files it wrote, relative to the root.
    pub files: BTreeSet<PathBuf>,
    /// Directories it created, relative to the root (removed on cleanup when empty).
    pub dirs: BTreeSet<PathBuf>,
    /// registries.yaml keys it owns.
    #[serde(default)]
    pub yaml: OwnedYamlKeys,
    /// Backup of a registries.yaml that existed before the agent first changed it.
    #[serde(default)]
    pub yaml_backup: Option<PathBuf>,
    /// Whether registries.yaml existed before the agent wrote it.
    #[serde(default)]
    pub yaml_preexisted: bool,
    /// Its permission bits then, restored on cleanup.
    #[serde(default)]
    pub yaml_mode: Option<u32>,
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    /// Files (or registries.yaml keys) the agent wanted but someone else owns.
    pub refused: Vec<String>,
    /// hosts.toml files (or mirrors) in place and owned.
    pub configured_hosts: usize,
    /// The registry's own CA and hosts entry are in place.
    pub registry_trusted: bool,
}

pub struct Reconciler {
    pub root: PathBuf,
    pub runtime: Runtime,
    pub options: RenderOptions,
    /// Where the runtime's files are, relative to the root.
    pub layout: render::Layout,
}

fn owned(content: &str) -> bool {
    content.starts_with(MANAGED_HEADER)
}

/// The permissions a written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Those of the file it replaces (an admin's 0600 registries.yaml stays 0600), or 0644
    /// for a new file, like the rest of containerd's configuration.
    Keep,
    /// 0600: the file holds credentials (or may: a backup of someone's registries.yaml).
    Private,
    /// Exactly these bits (a restored original).
    Exact(u32),
}

/// Creates the temp file for `path` with the permissions `mode` asks for.
fn create_tmp(tmp: &Path, path: &Path, mode: Mode) -> io::Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let bits = match mode {
        Mode::Private => 0o600,
        Mode::Exact(b) => b & 0o7777,
        Mode::Keep => fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777),
    };
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(bits)
        .open(tmp)?;
    // The umask narrows the creation mode, and a stale temp file keeps its old one: set it.
    f.set_permissions(fs::Permissions::from_mode(bits))?;
    Ok(f)
}

/// Writes `data` to `path` through a temp file in the same directory, fsynced and renamed,
/// then fsyncs the directory: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, data: &[u8], mode: Mode) -> io::Result<()> {
    let tmp = tmp_path(path)?;
    {
        let mut f = create_tmp(&tmp, path, mode)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn tmp_path(path: &Path) -> io::Result<PathBuf> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent"))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("path has no file name"))?;
    Ok(dir.join(format!(".{name}.outpost-tmp")))
}

/// fsyncs `paths` (files or directories) from a few threads at once.
fn sync_concurrently(paths: &[PathBuf]) -> Result<(), (PathBuf, io::Error)> {
    const THREADS: usize = 16;
    let per_thread = paths.len().div_ceil(THREADS).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(per_thread)
            .map(|chunk| {
                s.spawn(move || {
                    for p in chunk {
                        fs::File::open(p)
                            .and_then(|f| f.sync_all())
                            .map_err(|e| (p.clone(), e))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| {
                (
                    PathBuf::from("fsync"),
                    io::Error::other("an fsync thread panicked"),
                )
            })??;
        }
        Ok(())
    })
}

/// [`write_atomic`] for many files at once. Their fsyncs are issued concurrently, so the
/// filesystem commits them together (ext4 and xfs group concurrent fsyncs into one journal
/// commit) instead of one commit per file: a first pass over 50 rules costs about as much as
/// one file, busy disk or not. Every file is complete on disk before any is renamed into
/// place, and the renames happen in the order given.
pub fn write_atomic_all(files: &[(PathBuf, &[u8], Mode)]) -> Result<(), (PathBuf, io::Error)> {
    let mut tmps = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, data, mode) in files {
            let tmp = tmp_path(path).map_err(|e| (path.clone(), e))?;
            tmps.push(tmp.clone());
            create_tmp(&tmp, path, *mode)
                .and_then(|mut f| f.write_all(data))
                .map_err(|e| (path.clone(), e))?;
        }
        sync_concurrently(&tmps)?;
        for ((path, _, _), tmp) in files.iter().zip(&tmps) {
            fs::rename(tmp, path).map_err(|e| (path.clone(), e))?;
        }
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|(p, _, _)| p.parent().map(Path::to_path_buf))
            .collect();
        sync_concurrently(&dirs.into_iter().collect::<Vec<_>>())
    })();
    if result.is_err() {
        // Temp files left by a failed batch are removed (renamed ones are gone already).
        for t in &tmps {
            let _ = fs::remove_file(t);
        }
    }
    result
}

fn read_opt(path: &Path) -> Result<Option<String>, ReconcileError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl Reconciler {
    /// A reconciler for `runtime`'s default layout.
    pub fn new(root: PathBuf, runtime: Runtime, options: RenderOptions) -> Self {
        Reconciler {
            root,
            runtime,
            options,
            layout: runtime.default_layout(),
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn state_rel(&self) -> PathBuf {
        if self.runtime.uses_registries_yaml() {
            self.layout
                .registries_yaml
                .parent()
                .unwrap_or(Path::new(""))
                .join(".outpost-node-agent.json")
        } else {
            self.layout.hosts_dir.join(".outpost-node-agent.json")
        }
    }

    pub fn load_state(&self) -> Result<AgentState, ReconcileError> {
        let path = self.abs(&self.state_rel());
        match read_opt(&path)? {
            None => Ok(AgentState::default()),
            Some(text) => serde_json::from_str(&text).map_err(|e| ReconcileError::State {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn save_state(&self, st: &AgentState) -> Result<(), ReconcileError> {
        let rel = self.state_rel();
        let path = self.abs(&rel);
        if *st == AgentState::default() {
            return match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&path)(e)),
            };
        }
        let data = serde_json::to_vec_pretty(st).map_err(|e| ReconcileError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if read_opt(&path)?.as_deref().map(str::as_bytes) == Some(data.as_slice()) {
            return Ok(());
        }
        write_atomic(&path, &data, Mode::Keep).map_err(io_err(&path))
    }

    /// Creates the directories above `rel` that do not exist, recording them.
    fn ensure_dirs(&self, rel: &Path, st: &mut AgentState) -> Result<(), ReconcileError> {
        let mut missing = Vec::new();
        let mut cur = rel.parent();
        while let Some(d) = cur {
            if d.as_os_str().is_empty() || self.abs(d).is_dir() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            let p = self.abs(&d);
            fs::create_dir(&p).map_err(io_err(&p))?;
            st.dirs.insert(d);
        }
        Ok(())
    }

    /// What to do with one wanted file: someone else's is in the way (`None`), ours is
    /// current (`Some(false)`), or it must be written (`Some(true)`).
    fn plan(
        &self,
        f: &DesiredFile,
        st: &mut AgentState,
        report: &mut Report,
    ) -> Result<Option<bool>, ReconcileError> {
        match read_opt(&self.abs(&f.path))? {
            Some(cur) if !owned(&cur) => {
                report.refused.push(f.path.display().to_string());
                Ok(None)
            }
            Some(cur) if cur == f.content => {
                st.files.insert(f.path.clone());
                Ok(Some(false))
            }
            _ => Ok(Some(true)),
        }
    }

    /// Writes the planned files in one batch.
    fn put_all(
        &self,
        files: &[&DesiredFile],
        st: &mut AgentState,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        if files.is_empty() {
            return Ok(());
        }
        for f in files {
            self.ensure_dirs(&f.path, st)?;
            st.files.insert(f.path.clone());
        }
        // The state goes in the same batch, renamed into place before any of the files: a
        // crash leaves at worst a record of a file that does not exist (cleanup handles that),
        // never a file nobody knows about. One batch is one round of fsyncs, not two.
        let state_path = self.abs(&self.state_rel());
        let state = serde_json::to_vec_pretty(&*st).map_err(|e| ReconcileError::State {
            path: state_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut batch: Vec<(PathBuf, &[u8], Mode)> = Vec::with_capacity(files.len() + 1);
        if read_opt(&state_path)?.as_deref().map(str::as_bytes) != Some(state.as_slice()) {
            batch.push((state_path, &state, Mode::Keep));
        }
        batch.extend(files.iter().map(|f| {
            let mode = if f.private { Mode::Private } else { Mode::Keep };
            (self.abs(&f.path), f.content.as_bytes(), mode)
        }));
        write_atomic_all(&batch).map_err(|(p, e)| io_err(&p)(e))?;
        report.written.extend(files.iter().map(|f| f.path.clone()));
        Ok(())
    }

    /// Removes an owned file (and directories the agent created that are now empty).
    fn drop_file(
        &self,
        rel: &Path,
        st: &mut AgentState,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        let path = self.abs(rel);
        match read_opt(&path)? {
            Some(cur) if owned(&cur) => {
                fs::remove_file(&path).map_err(io_err(&path))?;
                report.removed.push(rel.to_path_buf());
            }
            // Replaced by someone else's file meanwhile: theirs now.
            Some(_) => report.refused.push(rel.display().to_string()),
            None => {}
        }
        st.files.remove(rel);
        self.prune_dirs(rel, st)
    }

    fn prune_dirs(&self, rel: &Path, st: &mut AgentState) -> Result<(), ReconcileError> {
        let mut cur = rel.parent();
        while let Some(d) = cur {
            if !st.dirs.contains(d) {
                break;
            }
            let p = self.abs(d);
            match fs::remove_dir(&p) {
                Ok(()) => {
                    st.dirs.remove(d);
                }
                // Not empty (someone put something there): it stays, and so does the record.
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    st.dirs.remove(d);
                }
                Err(e) => return Err(io_err(&p)(e)),
            }
            cur = d.parent();
        }
        Ok(())
    }

    /// One pass: the files `cfg` wants, given the registry's CA (`None` is enough for a
    /// plain-HTTP registry).
    pub fn reconcile(
        &self,
        cfg: &MirrorConfig,
        ca_pem: Option<&str>,
    ) -> Result<Report, ReconcileError> {
        let ca_pem = match ca_pem {
            _ if cfg.registry_plain_http => None,
            Some(pem) => Some(pem),
            None => return Err(ReconcileError::NoCa),
        };
        let mut st = self.load_state()?;
        let mut report = Report::default();
        let desired = if self.runtime.uses_registries_yaml() {
            ca_pem
                .map(|pem| render::k3s_ca_file(&self.layout, cfg, pem))
                .into_iter()
                .collect()
        } else {
            render::containerd_files(cfg, ca_pem, &self.options, &self.layout.hosts_dir)
        };
        let mut registry_ok = true;
        let mut to_write = Vec::new();
        for f in &desired {
            let plan = self.plan(f, &mut st, &mut report)?;
            let ok = plan.is_some();
            if plan == Some(true) {
                to_write.push(f);
            }
            let is_registry = f
                .path
                .starts_with(self.layout.hosts_dir.join(cfg.registry.as_str()))
                || f.path == self.layout.k3s_ca_path(cfg);
            if is_registry && !ok {
                registry_ok = false;
            }
            if ok && f.path.ends_with("hosts.toml") {
                report.configured_hosts += 1;
            }
        }
        self.put_all(&to_write, &mut st, &mut report)?;
        let wanted: BTreeSet<&PathBuf> = desired.iter().map(|f| &f.path).collect();
        let stale: Vec<PathBuf> = st
            .files
            .iter()
            .filter(|p| !wanted.contains(p) && **p != self.layout.registries_yaml)
            .cloned()
            .collect();
        for p in stale {
            self.drop_file(&p, &mut st, &mut report)?;
        }
        if self.runtime.uses_registries_yaml() {
            let ok = self.reconcile_yaml(cfg, ca_pem.is_some(), &mut st, &mut report)?;
            registry_ok &= ok;
        }
        report.registry_trusted = registry_ok;
        self.save_state(&st)?;
        Ok(report)
    }

    fn reconcile_yaml(
        &self,
        cfg: &MirrorConfig,
        with_ca: bool,
        st: &mut AgentState,
        report: &mut Report,
    ) -> Result<bool, ReconcileError> {
        let rel = self.layout.registries_yaml.clone();
        let path = self.abs(&rel);
        let current = read_opt(&path)?;
        let ca_on_host = with_ca.then(|| format!("/{}", self.layout.k3s_ca_path(cfg).display()));
        let merged = render::merge_registries_yaml(
            current.as_deref(),
            &st.yaml,
            cfg,
            ca_on_host.as_deref(),
            &self.options,
        )?;
        report.refused.extend(merged.refused.iter().cloned());
        report.configured_hosts += merged.owned.mirrors.len();
        let trusted = merged.registry_ok;
        if current.as_deref() == Some(merged.content.as_str()) && st.yaml == merged.owned {
            return Ok(trusted);
        }
        if st.yaml_backup.is_none() && !st.files.contains(&rel) {
            // First change to this file: keep what was there.
            st.yaml_preexisted = current.is_some();
            if let Some(text) = &current {
                let backup = rel.with_extension("yaml.outpost-backup");
                let bpath = self.abs(&backup);
                write_atomic(&bpath, text.as_bytes(), Mode::Private).map_err(io_err(&bpath))?;
                st.yaml_backup = Some(backup);
                st.yaml_mode = fs::metadata(&path)
                    .ok()
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
            }
        }
        self.ensure_dirs(&rel, st)?;
        st.files.insert(rel.clone());
        st.yaml = merged.owned;
        self.save_state(st)?;
        // Node credentials in it make it private; otherwise it keeps the mode it has.
        let mode = if self.options.basic.is_some() {
            Mode::Private
        } else {
            Mode::Keep
        };
        write_atomic(&path, merged.content.as_bytes(), mode).map_err(io_err(&path))?;
        report.written.push(rel);
        tracing::warn!(
            path = %path.display(),
            "registries.yaml changed: it is read only at start, so restart {} on this node to apply it",
            self.runtime.services()
        );
        Ok(trusted)
    }

    /// Removes everything the agent wrote and restores what it changed.
    pub fn cleanup(&self) -> Result<Report, ReconcileError> {
        let mut st = self.load_state()?;
        let mut report = Report::default();
        let yaml_rel = self.layout.registries_yaml.clone();
        if st.files.contains(&yaml_rel) {
            self.cleanup_yaml(&yaml_rel, &mut st, &mut report)?;
        }
        let files: Vec<PathBuf> = st.files.iter().cloned().collect();
        for p in files {
            self.drop_file(&p, &mut st, &mut report)?;
        }
        // Everything else is gone: the state file goes too, then the directories the agent
        // made, deepest first; one someone else put files into stays (and stays recorded).
        let state_path = self.abs(&self.state_rel());
        match fs::remove_file(&state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&state_path)(e)),
        }
        let dirs: Vec<PathBuf> = st.dirs.iter().rev().cloned().collect();
        for d in dirs {
            let p = self.abs(&d);
            match fs::remove_dir(&p) {
                Ok(()) => {
                    st.dirs.remove(&d);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    st.dirs.remove(&d);
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "directory the agent created is not empty; left in place");
                }
            }
        }
        if !st.dirs.is_empty() {
            self.save_state(&st)?;
        }
        Ok(report)
    }

    fn cleanup_yaml(
        &self,
        rel: &Path,
        st: &mut AgentState,
        report: &mut Report,
    ) -> Result<(), ReconcileError> {
        let path = self.abs(rel);
        let current = read_opt(&path)?;
        let remaining = match &current {
            Some(text) => render::strip_registries_yaml(text, &st.yaml)?,
            None => None,
        };
        let backup_text = match &st.yaml_backup {
            Some(b) => read_opt(&self.abs(b))?,
            None => None,
        };
        let backup_map = backup_text.as_deref().and_then(render::yaml_mapping);
        if let Some(text) = &backup_text
            && remaining == backup_map
        {
            // Nobody else changed it: put back the original bytes, and permissions.
            let mode = st.yaml_mode.map_or(Mode::Keep, Mode::Exact);
            write_atomic(&path, text.as_bytes(), mode).map_err(io_err(&path))?;
            if let Some(b) = st.yaml_backup.take() {
                let bp = self.abs(&b);
                fs::remove_file(&bp).map_err(io_err(&bp))?;
            }
        } else if let Some(m) = remaining {
            // Others edited it meanwhile: keep their entries, drop ours, keep the backup.
            let body = serde_norway::to_string(&serde_norway::Value::Mapping(m))
                .map_err(|e| render::RenderError::Yaml(e.to_string()))?;
            let mode = st.yaml_mode.map_or(Mode::Keep, Mode::Exact);
            write_atomic(&path, body.as_bytes(), mode).map_err(io_err(&path))?;
            tracing::warn!(path = %path.display(), backup = ?st.yaml_backup, "registries.yaml was edited by others while the agent managed it: their entries kept, the backup left in place");
            st.yaml_backup = None;
        } else if current.is_some() && !st.yaml_preexisted {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        report.removed.push(rel.to_path_buf());
        st.files.remove(rel);
        st.yaml = OwnedYamlKeys::default();
        st.yaml_preexisted = false;
        st.yaml_mode = None;
        self.prune_dirs(rel, st)
    }
}
