//! Member lists of large threads, cached per node and checked against the database on
//! every use, so a 10,000-member group does not ship 10,000 ids per message.
//!
//! Every membership change bumps `threads.members_version` under the thread row's lock.
//! A cached list is used only when its version equals the version just read from the
//! database, so a change made on any node is seen at once: the cache saves bytes, it is
//! never trusted for correctness. Small threads are read inline and never cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pigeon_proto::{ThreadId, UserId};

/// Threads with at most this many members have their member list read in the same query
/// as the thread's head; larger ones go through the cache.
pub(super) const INLINE_MEMBERS: i32 = 64;

/// Member ids kept at most, over all cached threads (16 bytes each): 16 MiB.
const MAX_CACHED_IDS: usize = 1 << 20;

/// The cache of one store.
#[derive(Default)]
pub(super) struct MemberCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    lists: HashMap<ThreadId, (i64, Arc<[UserId]>)>,
    ids: usize,
}

impl MemberCache {
    /// Returns the cached list when it is of exactly this version.
    pub(super) fn get(&self, thread_id: ThreadId, version: i64) -> Option<Arc<[UserId]>> {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match inner.lists.get(&thread_id) {
            Some((cached, members)) if *cached == version => Some(members.clone()),
            _ => None,
        }
    }

    /// Keeps a list read at `version`, replacing an older one. When full, starts over.
    pub(super) fn put(&self, thread_id: ThreadId, version: i64, members: Arc<[UserId]>) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if matches!(inner.lists.get(&thread_id), Some((cached, _)) if *cached > version) {
            return;
        }
        if inner.ids + members.len() > MAX_CACHED_IDS {
            inner.lists.clear();
            inner.ids = 0;
        }
        inner.ids += members.len();
        if let Some((_, old)) = inner.lists.insert(thread_id, (version, members)) {
            inner.ids -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_version_is_served() {
        let cache = MemberCache::default();
        let thread = ThreadId::new();
        let members: Arc<[UserId]> = vec![UserId::new(), UserId::new()].into();
        cache.put(thread, 3, members.clone());
        assert_eq!(cache.get(thread, 3), Some(members));
        assert_eq!(cache.get(thread, 4), None);
        assert_eq!(cache.get(ThreadId::new(), 3), None);
        cache.put(thread, 2, vec![UserId::new()].into());
        assert!(
            cache.get(thread, 3).is_some(),
            "an older list never replaces a newer one"
        );
    }
}
