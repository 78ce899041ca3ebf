//! What nix evaluated at a commit never changes, so a builder remembers it: the host list and
//! each host's toplevel `.drv` per (repo, commit), and the output path each `.drv` built to. A
//! repeat build of the same commit (a timer, a retry, CI after a merge that was already built)
//! then skips evaluation entirely, and skips nix too while the builder's own GC root still holds
//! that output.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// Entries kept before the cache starts over.
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub struct EvalCache {
    inner: Mutex<Inner>,
    /// Woken when a repo's latest host list changes, so the registry announces it at once.
    hosts_changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// Host list of the last commit evaluated, per repo (what the registry announces).
    latest_hosts: HashMap<String, Vec<String>>,
    hosts: HashMap<(String, String), Vec<String>>,
    drvs: HashMap<(String, String, String), String>,
    /// `.drv` → the output path nix built it to.
    outs: HashMap<String, String>,
}

impl EvalCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    pub fn hosts(&self, repo: &str, rev: &str) -> Option<Vec<String>> {
        self.lock()
            .hosts
            .get(&(repo.to_owned(), rev.to_owned()))
            .cloned()
    }

    pub fn put_hosts(&self, repo: &str, rev: &str, hosts: Vec<String>) {
        let mut inner = self.lock();
        inner.make_room();
        let before = inner.latest_hosts.insert(repo.to_owned(), hosts.clone());
        inner
            .hosts
            .insert((repo.to_owned(), rev.to_owned()), hosts.clone());
        drop(inner);
        if before.as_ref() != Some(&hosts) {
            self.hosts_changed.notify_one();
        }
    }

    /// Waits until a repo's latest host list changes (at once when it changed since the last
    /// wait ended).
    pub async fn hosts_changed(&self) {
        self.hosts_changed.notified().await;
    }

    /// The host list of the last commit evaluated, per repo.
    pub fn latest_hosts(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.lock().latest_hosts.clone().into_iter().collect()
    }

    /// The host's `.drv`, if evaluated before and still in the store (it may have been
    /// garbage-collected since).
    pub fn drv(&self, repo: &str, rev: &str, host: &str) -> Option<String> {
        let key = (repo.to_owned(), rev.to_owned(), host.to_owned());
        self.lock()
            .drvs
            .get(&key)
            .filter(|drv| Path::new(drv.as_str()).exists())
            .cloned()
    }

    pub fn put_drv(&self, repo: &str, rev: &str, host: &str, drv: &str) {
        let mut inner = self.lock();
        inner.make_room();
        inner.drvs.insert(
            (repo.to_owned(), rev.to_owned(), host.to_owned()),
            drv.to_owned(),
        );
    }
}

impl EvalCache {
    /// The output path `drv` was built to, if this builder built it before.
    pub fn out_path(&self, drv: &str) -> Option<String> {
        self.lock().outs.get(drv).cloned()
    }

    pub fn put_out_path(&self, drv: &str, out_path: &str) {
        let mut inner = self.lock();
        inner.make_room();
        inner.outs.insert(drv.to_owned(), out_path.to_owned());
    }
}

impl Inner {
    fn make_room(&mut self) {
        if self.hosts.len() + self.drvs.len() + self.outs.len() >= MAX_ENTRIES {
            self.hosts.clear();
            self.drvs.clear();
            self.outs.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_commit_and_forgets_collected_drvs() {
        let cache = EvalCache::default();
        cache.put_hosts("demo", "abc", vec!["web".into()]);
        assert_eq!(cache.hosts("demo", "abc"), Some(vec!["web".into()]));
        assert_eq!(cache.hosts("demo", "def"), None);
        let present = std::env::temp_dir().join("eval-cache-test.drv");
        std::fs::write(&present, "").expect("write");
        let present = present.display().to_string();
        cache.put_drv("demo", "abc", "web", &present);
        cache.put_drv(
            "demo",
            "abc",
            "db",
            "/nix/store/00000000000000000000000000000000-gone.drv",
        );
        assert_eq!(cache.drv("demo", "abc", "web"), Some(present));
        assert_eq!(cache.drv("demo", "abc", "db"), None);
    }
}
