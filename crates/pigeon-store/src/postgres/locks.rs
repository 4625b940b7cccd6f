//! Per-thread turns inside one process: a sender holds its thread's turn from taking the
//! next seq until its commit hook has run, so hooks of one thread run in seq order.
//!
//! Across nodes the thread row's lock orders the seqs; inside a node this turn also orders
//! what happens after COMMIT, which the row lock (released by COMMIT) cannot. The turns
//! are a fixed array of stripes indexed by a hash of the thread id: nothing to create or
//! clean up per thread, and no memory that grows with the number of threads. Two threads
//! on one stripe merely take turns with each other.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use pigeon_proto::ThreadId;
use tokio::sync::{Mutex, MutexGuard};

/// Stripes: enough that busy threads rarely share one, few enough to cost nothing (a
/// `tokio::sync::Mutex<()>` is a few words).
const STRIPES: usize = 1024;

/// The per-thread turns of one store.
pub(super) struct ThreadTurns {
    stripes: Box<[Mutex<()>]>,
}

impl ThreadTurns {
    pub(super) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Waits for the thread's turn (first come, first served). Hold one turn at a time:
    /// taking a second could deadlock against another task holding them the other way.
    pub(super) async fn take(&self, thread_id: ThreadId) -> MutexGuard<'_, ()> {
        self.stripes[stripe_of(thread_id)].lock().await
    }
}

fn stripe_of(thread_id: ThreadId) -> usize {
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(thread_id);
    // The modulo keeps the value below STRIPES, so it fits in usize.
    usize::try_from(hash % STRIPES as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_always_gets_the_same_stripe_and_threads_spread() {
        let thread = ThreadId::new();
        assert_eq!(stripe_of(thread), stripe_of(thread));
        let used: std::collections::HashSet<usize> =
            (0..200).map(|_| stripe_of(ThreadId::new())).collect();
        assert!(
            used.len() > 150,
            "200 threads landed on {} stripes",
            used.len()
        );
    }
}
