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

    /// Waits for the thread's turn (first come, first served). Hold one turn at a time,
    /// or take several at once with [`Self::take_all`]: taking a second one later could
    /// deadlock against another task holding them the other way.
    pub(super) async fn take(&self, thread_id: ThreadId) -> MutexGuard<'_, ()> {
        self.stripes[stripe_of(thread_id)].lock().await
    }

    /// Waits for the turns of all these threads (a batch of sends). Stripes are taken in
    /// ascending order, each once, so two tasks taking overlapping sets never wait for
    /// each other in a cycle, nor for a task holding a single turn.
    pub(super) async fn take_all(
        &self,
        threads: impl IntoIterator<Item = ThreadId>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = threads.into_iter().map(stripe_of).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut turns = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            turns.push(self.stripes[stripe].lock().await);
        }
        turns
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
