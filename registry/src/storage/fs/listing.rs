//! Paged listings of the repository tree (`_catalog`) and of a repository's tags, at a cost in
//! proportion to the page rather than to the store.
//!
//! Why a walk over cached directory listings and not a maintained index: the directory tree
//! already is the index, kept by every writer (other processes on the store included, e.g.
//! `gc`), so there is nothing to keep in step or to rebuild after a crash. What costs in a
//! walk is reading and sorting a large directory (a namespace with thousands of repositories,
//! a repository with thousands of tags) on every page; so the sorted listing of a large
//! directory is kept in memory and reused while the directory is unchanged, which its own
//! times and inode tell with one `stat`. A page then costs a `stat` per directory on the way
//! down, a binary search to `last`, and one or two `stat`s per repository it returns.
//!
//! Lexical order of full names is not the order of a per-directory walk: `a-b` sorts between
//! `a` and `a/b` ('-' and '.' sort before '/'). So each child `c` of a directory is two items,
//! `c` (the repository `c`, if it is one) and `c/` (everything under it), and the items are
//! sorted as strings: every name under `c` lies between `c/` and the next sibling item, so
//! expanding each `c/` in place yields the names in lexical order.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outpost_core::{RepositoryName, Tag};

/// Directories with fewer entries are read every time: that is cheap, and the cache holds at
/// most one listing per this many entries in the store.
const CACHE_MIN_ENTRIES: usize = 64;
/// A listing is cached only if its directory had not changed for this long when it was read:
/// file times advance in kernel ticks, so a change in the same tick as the read could leave
/// them as they were (the "racy" case git's index has too).
const SETTLED: Duration = Duration::from_secs(2);

/// What tells one state of a directory from another: an entry added, removed or renamed
/// moves its modification and change times; a directory replaced has another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether both times are at least `settle` in the past.
    fn settled(&self, settle: Duration) -> bool {
        let nanos = |(s, ns): (i64, i64)| i128::from(s) * 1_000_000_000 + i128::from(ns);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let limit = i128::try_from(now.saturating_sub(settle).as_nanos()).unwrap_or(i128::MAX);
        nanos(self.mtime) < limit && nanos(self.ctime) < limit
    }
}

struct Cached {
    stamp: Stamp,
    items: Arc<Vec<String>>,
}

/// Sorted listings of large directories, by path.
pub(super) struct DirCache {
    map: Mutex<HashMap<PathBuf, Cached>>,
    settle: Duration,
}

impl Default for DirCache {
    fn default() -> Self {
        DirCache {
            map: Mutex::default(),
            settle: SETTLED,
        }
    }
}

/// Entries of `dir` (UTF-8 names only) and whether each is a directory.
fn read_entries(dir: &Path) -> io::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let ft = entry.file_type()?;
        // The type comes with the entry on most filesystems; only a symlink needs a stat.
        let is_dir = ft.is_dir() || (ft.is_symlink() && entry.path().is_dir());
        out.push((name, is_dir));
    }
    Ok(out)
}

impl DirCache {
    /// The entries of `dir` made into sorted items by `build`; empty if `dir` does not exist.
    /// From the cache while the directory is as it was when cached. A small directory not in
    /// the cache costs one read and no `stat` (most directories of the tree are a
    /// repository's own, with two or three entries).
    fn sorted(
        &self,
        dir: &Path,
        build: impl FnOnce(Vec<(String, bool)>) -> Vec<String>,
    ) -> io::Result<Arc<Vec<String>>> {
        let stamp = || match fs::metadata(dir) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let read = || match read_entries(dir) {
            Ok(e) => Ok(e),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let cached = self.lock().get(dir).map(|c| (c.stamp, c.items.clone()));
        if let Some((was, items)) = cached
            && stamp()? == Some(was)
        {
            return Ok(items);
        }
        let entries = read()?;
        if entries.len() < CACHE_MIN_ENTRIES {
            return Ok(Arc::new(build(entries)));
        }
        // Large: read again between two `stat`s, so the listing is known to be the one of
        // that state; kept only if the directory did not change meanwhile, nor shortly before.
        let Some(before) = stamp()? else {
            return Ok(Arc::default());
        };
        let items = Arc::new(build(read()?));
        let after = stamp()?;
        let mut map = self.lock();
        if after == Some(before) && before.settled(self.settle) {
            map.insert(
                dir.to_owned(),
                Cached {
                    stamp: before,
                    items: items.clone(),
                },
            );
        } else {
            map.remove(dir);
        }
        Ok(items)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Cached>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sorts first among a directory's items when the directory is a repository (holds manifests
/// or blob links); no name contains NUL.
const REPO_MARK: &str = "\0";

/// A directory of the repository tree as items: [`REPO_MARK`] if it is a repository, then
/// `c` and `c/` for every child directory `c` (names starting with `_` are the repository's
/// own data, not children), sorted.
fn tree_items(entries: Vec<(String, bool)>) -> Vec<String> {
    let mut items = Vec::with_capacity(entries.len() * 2);
    let mut repo = false;
    for (name, is_dir) in entries {
        if name.starts_with('_') {
            repo |= name == "_manifests" || name == "_layers";
        } else if is_dir {
            items.push(format!("{name}/"));
            items.push(name);
        }
    }
    if repo {
        items.push(REPO_MARK.to_owned());
    }
    items.sort_unstable();
    items
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Up to `limit` repository names under `root` (the `repositories` folder) that sort after
/// `after`, in lexical order.
pub(super) fn repositories_page(
    cache: &DirCache,
    root: &Path,
    after: Option<&str>,
    limit: usize,
) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut walk = Walk {
        cache,
        limit,
        read: HashMap::new(),
    };
    walk.dir(root, "", after, &mut out)?;
    Ok(out)
}

/// One page's walk.
struct Walk<'a> {
    cache: &'a DirCache,
    limit: usize,
    /// Listings of children read to tell whether they are repositories, kept until their
    /// subtree item comes (the same page, a few items later): each directory read once.
    read: HashMap<PathBuf, Arc<Vec<String>>>,
}

impl Walk<'_> {
    fn listing(&mut self, dir: &Path) -> io::Result<Arc<Vec<String>>> {
        match self.read.remove(dir) {
            Some(items) => Ok(items),
            None => self.cache.sorted(dir, tree_items),
        }
    }

    /// Appends to `out` the names under `dir` (whose names start with `prefix`) after `after`
    /// (relative to `dir`), until `out` has `limit`. Recursion depth is bounded by the length
    /// of a repository name (one level per segment).
    fn dir(
        &mut self,
        dir: &Path,
        prefix: &str,
        after: Option<&str>,
        out: &mut Vec<String>,
    ) -> io::Result<()> {
        if out.len() >= self.limit {
            return Ok(());
        }
        let items = self.listing(dir)?;
        let start = match after {
            None => 0,
            Some(a) => {
                let i = items.partition_point(|k| k.as_str() <= a);
                // `a` may lie inside the subtree just before: its names after `a` come first.
                if let Some(sub_key) = i.checked_sub(1).map(|j| &items[j])
                    && let Some(sub) = sub_key.strip_suffix('/')
                    && let Some(rest) = a.strip_prefix(sub_key.as_str())
                {
                    self.dir(&dir.join(sub), &join(prefix, sub), Some(rest), out)?;
                }
                i
            }
        };
        for key in &items[start..] {
            if out.len() >= self.limit {
                break;
            }
            if key == REPO_MARK {
                continue;
            }
            match key.strip_suffix('/') {
                Some(sub) => self.dir(&dir.join(sub), &join(prefix, sub), None, out)?,
                None => {
                    let child = dir.join(key);
                    let child_items = self.cache.sorted(&child, tree_items)?;
                    let full = join(prefix, key);
                    if child_items.first().is_some_and(|k| k == REPO_MARK)
                        && full.parse::<RepositoryName>().is_ok()
                    {
                        out.push(full);
                    }
                    self.read.insert(child, child_items);
                }
            }
        }
        Ok(())
    }
}

/// Up to `limit` tags in `tags_dir` that sort after `after`, sorted.
pub(super) fn tags_page(
    cache: &DirCache,
    tags_dir: &Path,
    after: Option<&str>,
    limit: usize,
) -> io::Result<Vec<String>> {
    let items = cache.sorted(tags_dir, |entries| {
        let mut names: Vec<String> = entries
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.parse::<Tag>().is_ok())
            .collect();
        names.sort_unstable();
        names
    })?;
    let start = after.map_or(0, |a| items.partition_point(|t| t.as_str() <= a));
    Ok(items[start..].iter().take(limit).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_items_sort_subtrees_after_names_with_lower_characters() {
        let entries = ["ab", "a", "a-b", "_manifests", "a.c"]
            .iter()
            .map(|n| (n.to_string(), true))
            .chain([("file".to_owned(), false)])
            .collect();
        assert_eq!(
            tree_items(entries),
            [
                REPO_MARK, "a", "a-b", "a-b/", "a.c", "a.c/", "a/", "ab", "ab/"
            ]
        );
    }

    fn fill(dir: &Path, n: usize) {
        for i in 0..n {
            fs::write(dir.join(format!("t{i:03}")), b"").unwrap();
        }
    }

    #[test]
    fn a_directory_changed_within_the_settle_time_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path(), CACHE_MIN_ENTRIES);
        let cache = DirCache::default();
        let page = tags_page(&cache, dir.path(), Some("t061"), 10).unwrap();
        assert_eq!(page, ["t062", "t063"]);
        assert_eq!(cache.lock().len(), 0, "just written: not settled");
    }

    #[test]
    fn a_cached_listing_is_replaced_once_its_directory_changes() {
        let dir = tempfile::tempdir().unwrap();
        fill(dir.path(), CACHE_MIN_ENTRIES);
        let cache = DirCache {
            map: Mutex::default(),
            settle: Duration::from_millis(50),
        };
        // Past the settle time (and several timestamp ticks) since the last change.
        std::thread::sleep(Duration::from_millis(200));
        let page = tags_page(&cache, dir.path(), None, 2).unwrap();
        assert_eq!(page, ["t000", "t001"]);
        assert_eq!(cache.lock().len(), 1);
        // Removing a file through the cache's back: the next page must not show it.
        fs::remove_file(dir.path().join("t000")).unwrap();
        assert_eq!(
            tags_page(&cache, dir.path(), None, 2).unwrap(),
            ["t001", "t002"]
        );
        fs::write(dir.path().join("t0005"), b"").unwrap();
        assert_eq!(
            tags_page(&cache, dir.path(), Some("t000"), 2).unwrap(),
            ["t0005", "t001"]
        );
        // A small directory is never cached.
        let small = tempfile::tempdir().unwrap();
        fill(small.path(), 3);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            tags_page(&cache, small.path(), Some("t000"), 5).unwrap(),
            ["t001", "t002"]
        );
        assert!(!cache.lock().contains_key(small.path()));
        // The large one, listed again right after its change, is not kept either.
        assert!(!cache.lock().contains_key(dir.path()));
    }

    #[test]
    fn pages_follow_lexical_order_of_full_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "a", "a-b", "a/b", "a/b/c", "a.c/x", "ab", "b/a-b", "b/a/b", "b/ab",
        ];
        for n in names {
            fs::create_dir_all(dir.path().join(n).join("_manifests")).unwrap();
        }
        // A namespace without content of its own is not a repository.
        fs::create_dir_all(dir.path().join("ns/only")).unwrap();
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        let cache = DirCache::default();
        assert_eq!(
            repositories_page(&cache, dir.path(), None, 100).unwrap(),
            sorted
        );
        for limit in 1..4 {
            let mut got: Vec<String> = Vec::new();
            for _ in 0..names.len() + 1 {
                let page =
                    repositories_page(&cache, dir.path(), got.last().map(String::as_str), limit)
                        .unwrap();
                if page.is_empty() {
                    break;
                }
                got.extend(page);
            }
            assert_eq!(got, sorted, "pages of {limit}");
        }
        // `last` need not be a repository, nor a valid name.
        assert_eq!(
            repositories_page(&cache, dir.path(), Some("a/"), 2).unwrap(),
            ["a/b", "a/b/c"]
        );
        assert_eq!(
            repositories_page(&cache, dir.path(), Some("a/b/c/z"), 2).unwrap(),
            ["ab", "b/a-b"]
        );
        assert_eq!(
            repositories_page(&cache, dir.path(), Some("b/a."), 9).unwrap(),
            ["b/a/b", "b/ab"]
        );
    }
}
