//! The worker's table stores: every request's table URI is checked against
//! `storage.allowed_prefixes` before a store is built for it (so nothing outside them is
//! read or written), and the stores built are kept in a bounded least-recently-used cache
//! (requests name arbitrary URIs, so an unbounded cache would grow with every one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use freshet_common::error::Result;
use freshet_common::prefixes::AllowedPrefixes;
use freshet_common::storage::{StorageOptions, table_store, table_url};
use object_store::ObjectStore;

use crate::Worker;

/// Stores kept at most; a worker serves few tables, so this is generous.
pub const MAX_CACHED_STORES: usize = 64;

/// The allowed prefixes and the store cache.
pub struct Stores {
    allowed: RwLock<AllowedPrefixes>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// uri -> (store, last use)
    entries: HashMap<String, (Arc<dyn ObjectStore>, u64)>,
    clock: u64,
}

impl Default for Stores {
    fn default() -> Self {
        Stores {
            allowed: RwLock::new(AllowedPrefixes::default()),
            cache: Mutex::new(Cache::default()),
        }
    }
}

impl Stores {
    /// The store of `uri` (table `table`), refused unless the URI is allowed.
    pub fn get(
        &self,
        table: &str,
        uri: &str,
        options: &StorageOptions,
    ) -> Result<Arc<dyn ObjectStore>> {
        // Before anything else: building a store for a local path creates its directory.
        self.allowed.read().expect("lock").check(table, uri)?;
        {
            let mut c = self.cache.lock().expect("lock");
            c.clock += 1;
            let now = c.clock;
            if let Some((s, used)) = c.entries.get_mut(uri) {
                *used = now;
                return Ok(s.clone());
            }
        }
        let store = table_store(table, &table_url(table, uri)?, options)?;
        let mut c = self.cache.lock().expect("lock");
        if c.entries.len() >= MAX_CACHED_STORES && !c.entries.contains_key(uri) {
            // Evict the least recently used; a linear scan over at most 64 entries.
            if let Some(oldest) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                c.entries.remove(&oldest);
            }
        }
        let now = c.clock;
        c.entries.insert(uri.to_string(), (store.clone(), now));
        Ok(store)
    }

    /// Stores cached now.
    pub fn cached(&self) -> usize {
        self.cache.lock().expect("lock").entries.len()
    }
}

impl Worker {
    /// Restricts the table URIs the worker accepts (from `storage.allowed_prefixes`).
    pub fn set_allowed_prefixes(&self, allowed: AllowedPrefixes) {
        *self.stores.allowed.write().expect("lock") = allowed;
    }

    /// Table stores cached now (bounded by [`MAX_CACHED_STORES`]).
    pub fn cached_stores(&self) -> usize {
        self.stores.cached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_refused_uris_build_no_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = Stores::default();
        let opts = StorageOptions::default();
        for i in 0..MAX_CACHED_STORES + 10 {
            s.get("t", &format!("memory:///t{i}"), &opts).unwrap();
        }
        assert_eq!(s.cached(), MAX_CACHED_STORES);
        let allowed = dir.path().join("lake");
        *s.allowed.write().unwrap() =
            AllowedPrefixes::new(&[allowed.display().to_string()]).unwrap();
        let outside = dir.path().join("elsewhere");
        let e = s
            .get("t", &outside.display().to_string(), &opts)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(!outside.exists(), "a refused URI must not be created");
        s.get("t", &allowed.join("t").display().to_string(), &opts)
            .unwrap();
    }
}
