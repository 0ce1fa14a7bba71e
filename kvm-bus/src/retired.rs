//! Unpublished tables waiting for a grace period, freed by the updater.
//!
//! Every update publishes a new [`IoBus`] and unpublishes the old one,
//! which readers may still be using. Handing the old table to `call_srcu`
//! (what Linux does) means the domain's callback worker frees it, on
//! another thread and CPU: each free then takes the allocator's lock of
//! the arena the updater allocates from, and the worker frees a whole
//! batch at once, every few milliseconds, while the updater keeps
//! allocating. Measured on a 2-CPU VM (`benches/examples/lookup.rs
//! bench-reg`, `bench-report`'s registration loop, old and new build run
//! in turns): a `register_dev` into a bus of 0 to 49 devices took 870 ns
//! (median of 8 runs) with the old tables freed by the worker, 590 ns with
//! them kept here and freed by the updater.
//!
//! So the updater keeps the tables it unpublished here (a list of its own,
//! next to the slots lock), in unpublish order, and frees them itself once a grace period
//! that some other party completed has made that safe (its own
//! unregistration, which waits for one; the callback worker's): never
//! waiting, never asking for a grace period (in the fast flavor each one
//! interrupts every running vCPU). Updates free at most
//! [`RECLAIM_PER_UPDATE`] each; an unregistration, after its wait, frees
//! every table its grace period covered (a removal's own table waits for
//! that, [`AfterRemoval`]); once more than [`UNTRIMMED`] bytes wait, a
//! trim on the callback worker frees them when updates stop
//! ([`RetiredList`]). What waits here is bounded
//! by [`BUDGET`] bytes: past it, the oldest tables go to `call_srcu` as
//! before.
//!
//! A retired table is only ever dropped (its device pointers are
//! non-owning and nothing follows them), so keeping it does not extend the
//! life of any device.

use crate::bus::IoBus;
use srcu::Stale;
use std::collections::VecDeque;
use std::sync::atomic::{
    fence, AtomicBool,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Most bytes of retired tables kept waiting on the updater's side. A
/// 16-device table is about 1.2 KiB, a 50-device one about 2.8 KiB (a
/// burst of ~90 registrations fits), a 1000-device one about 60 KiB.
pub(crate) const BUDGET: usize = 256 << 10;

/// Bytes of retired tables that updates keep without a trim queued. An
/// update whose table still fits keeps it and queues nothing; the one
/// that would pass this carries the trim. A trim is a `call_srcu`: after a
/// quiet spell it wakes the idle callback worker, a futex wake that costs
/// the waking thread 6-12 µs on a 2-vCPU Firecracker guest when the
/// worker's CPU is idle (an IPI; measured alone, a condvar notify of a
/// sleeping thread), and in the fast flavor its grace period interrupts
/// every running vCPU three times. Isolated updates (a guest's BAR move,
/// a run-time hot plug, each after a quiet spell) thus queue one trim per
/// 16 KiB of tables (about 14 tables of a 16-device bus, 5 of a 50-device
/// one; a table bigger than this carries one at once): 14 of 201
/// isolated BAR moves on a 16-device bus (`move_range_after_quiet_ns` in
/// `bench-report`). While updates stop, up to this much of dead tables
/// stays: no grace period is started for them, so the next update frees
/// none; the first removal to complete, or the update that passes this
/// bound (its trim), frees them.
pub(crate) const UNTRIMMED: usize = 16 << 10;

/// An update count no update reaches: a trim given it frees nothing
/// itself (`trim`).
const NO_UPDATE: u64 = u64::MAX;

/// Most tables a registration or move frees (one is retired per update,
/// so a backlog shrinks as soon as grace periods complete).
pub(crate) const RECLAIM_PER_UPDATE: usize = 2;

/// The retired tables of one [`Buses`](crate::Buses), oldest first.
#[derive(Default)]
pub(crate) struct Retired {
    tables: VecDeque<(Stale<IoBus>, usize)>,
    bytes: usize,
    /// Updates so far (that got the list): a trim frees nothing while
    /// they go on (the updater frees on its own thread), only once they
    /// have stopped.
    updates: u64,
}

impl Retired {
    /// Keeps `old`, unpublished just now, with `bytes` of memory. Past the
    /// budget, the oldest tables are dropped: freed by `call_srcu`.
    pub(crate) fn push(&mut self, old: Stale<IoBus>, bytes: usize) {
        self.tables.push_back((old, bytes));
        self.bytes += bytes;
        while self.bytes > BUDGET {
            match self.tables.pop_front() {
                Some((oldest, b)) => {
                    self.bytes -= b;
                    drop(oldest); // the deferred free
                }
                None => break,
            }
        }
    }

    /// Frees up to `most` of the oldest tables whose grace period has
    /// completed. Tables were unpublished in order, so the first one still
    /// pending ends the scan. Returns how many were freed.
    pub(crate) fn reclaim(&mut self, most: usize) -> usize {
        let mut freed = 0;
        while freed < most {
            let Some((oldest, b)) = self.tables.pop_front() else {
                break;
            };
            match oldest.try_take() {
                Ok(table) => {
                    self.bytes -= b;
                    drop(table); // here, on the thread that allocated it
                    freed += 1;
                }
                Err(pending) => {
                    self.tables.push_front((pending, b));
                    break;
                }
            }
        }
        freed
    }

    /// Takes the most recently retired table out of the list.
    fn pop_newest(&mut self) -> Option<Stale<IoBus>> {
        let (newest, b) = self.tables.pop_back()?;
        self.bytes -= b;
        Some(newest)
    }

    /// What is kept.
    pub(crate) fn counts(&self) -> RetiredTables {
        RetiredTables {
            tables: self.tables.len(),
            bytes: self.bytes,
        }
    }
}

/// The retired list of one [`Buses`](crate::Buses), shared with its trim
/// callbacks.
///
/// A list that only updates emptied would keep its tables for as long as
/// no update comes: a VM that registers its devices at boot and never
/// again would hold up to [`BUDGET`] of dead tables for its lifetime. So
/// the table whose keeping would take the list past [`UNTRIMMED`] (with
/// no trim queued) is not kept: it carries a trim (`Stale::then`), which
/// runs on the callback worker after that table's grace period (so after
/// the grace period of every table retired before it). If updates have
/// stopped meanwhile, it frees what has completed; while tables remain,
/// the newest carries the next trim. Memory past [`UNTRIMMED`] is
/// therefore freed a few worker cycles (milliseconds) after the last
/// update, and during a burst the updater frees everything itself but one
/// table per trim; up to [`UNTRIMMED`] may stay while no update or
/// removal comes. A removal's table carries no trim: the
/// removal's own completion frees it ([`AfterRemoval`]), so a removal
/// queues no callback unless it is dropped before it completes.
///
/// Nobody blocks on the list's mutex: updates and trims only `try_lock` it
/// (an update that finds it taken hands its old table to `call_srcu`
/// instead; a trim that finds it taken leaves the next trim to whoever
/// holds it, through `trim_missed`, fences T and U), and an
/// unregistration or `Buses::retired_tables` retries for a bounded time,
/// so a `fork` taken while a trim held it cannot leave a child waiting
/// forever. (In a child whose parent's worker held a trim's carrier at the
/// fork, `trim_queued` stays set: the child keeps up to [`BUDGET`] of
/// tables after its updates stop, freed at its next unregistration. The
/// same holds for a removal's table whose `Removal` stayed with a thread
/// the child does not have, or whose completion callback was in the
/// parent's worker's batch; and for a `Removal` that is `mem::forget`ten.)
pub(crate) struct RetiredList {
    list: Mutex<Retired>,
    /// A trim is queued: updates keep their tables (as they do without one
    /// while the list stays within [`UNTRIMMED`]).
    trim_queued: AtomicBool,
    /// A trim (or a holder re-queuing one) found the list taken: whoever
    /// holds it queues the next trim after letting go (`release`).
    trim_missed: AtomicBool,
}

impl RetiredList {
    pub(crate) fn new() -> Arc<RetiredList> {
        Arc::new(RetiredList {
            list: Mutex::new(Retired::default()),
            trim_queued: AtomicBool::new(false),
            trim_missed: AtomicBool::new(false),
        })
    }

    fn try_list(&self) -> Option<MutexGuard<'_, Retired>> {
        match self.list.try_lock() {
            Ok(g) => Some(g),
            // Nothing panics while holding it (dropping a table runs no
            // user code); recover anyway.
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The list, or, if it is taken, the duty to queue the next trim left
    /// to its holder: `trim_missed`, which the holder's [`release`]
    /// checks.
    ///
    /// [`release`]: RetiredList::release
    fn list_or_leave_trim(&self) -> Option<MutexGuard<'_, Retired>> {
        if let Some(list) = self.try_list() {
            return Some(list);
        }
        self.trim_missed.store(true, SeqCst);
        // T: pairs with fence U in `release` (store buffering): either this
        // second try sees the list let go, or its holder, after letting
        // go, sees the flag.
        fence(SeqCst);
        self.try_list()
    }

    /// Lets the list go; then, if a trim found it taken meanwhile, queues
    /// the next trim in its place.
    fn release(self: &Arc<Self>, list: MutexGuard<'_, Retired>) {
        drop(list);
        loop {
            // U: pairs with fence T in `list_or_leave_trim`.
            fence(SeqCst);
            if !self.trim_missed.load(Relaxed) || !self.trim_missed.swap(false, SeqCst) {
                return;
            }
            let Some(mut list) = self.list_or_leave_trim() else {
                return; // taken again: the duty is its holder's now
            };
            let carrier = self.carrier(&mut list);
            drop(list);
            if let Some((table, seen)) = carrier {
                self.queue_trim(table, seen);
            }
        }
    }

    /// The newest pending table, to carry the next trim, unless a trim is
    /// queued already or nothing is pending.
    fn carrier(&self, list: &mut Retired) -> Option<(Stale<IoBus>, u64)> {
        if list.tables.is_empty() || self.trim_queued.swap(true, SeqCst) {
            return None;
        }
        let newest = list.pop_newest()?;
        Some((newest, list.updates))
    }

    /// An update: reclaims up to [`RECLAIM_PER_UPDATE`] tables, then keeps
    /// `old` (unpublished just now, `bytes` of memory), or, if no trim is
    /// queued and the list would pass [`UNTRIMMED`], makes it carry the
    /// next trim.
    pub(crate) fn retire(self: &Arc<Self>, old: Option<Stale<IoBus>>, bytes: usize) {
        self.update(old, bytes, true);
    }

    /// A removal's update: as [`retire`](RetiredList::retire), except
    /// that `old` never carries a trim. The removal completes after a
    /// grace period that starts after this unpublish, so after `old`'s own:
    /// its completion frees `old` ([`AfterRemoval`]). A trim is a
    /// `call_srcu`, whose wake-up of an idle callback worker costs the
    /// caller a futex wake and, where the worker's CPU is idle, an IPI: 6-12
    /// µs on a 2-vCPU Firecracker guest, where the rest of a
    /// `start_unregister` took 0.2 µs. A removal started from a device
    /// handler pays it on the vCPU's exit path; an `unregister_dev`, which
    /// waits for that grace period anyway, pays it for nothing.
    pub(crate) fn retire_for_removal(
        self: &Arc<Self>,
        old: Option<Stale<IoBus>>,
        bytes: usize,
    ) -> AfterRemoval {
        // If a trim held the list, the removal's completion still frees
        // what its grace period covered (with a count no update reaches:
        // it then frees nothing itself, only queues the next trim if
        // needed).
        let seen = self.update(old, bytes, false).unwrap_or(NO_UPDATE);
        AfterRemoval {
            list: Arc::downgrade(self),
            seen,
        }
    }

    /// The update of [`retire`](RetiredList::retire) and
    /// [`retire_for_removal`](RetiredList::retire_for_removal): reclaims,
    /// then keeps `old` or (`may_carry`) makes it carry the next trim.
    /// Returns the list's update count after this update, or `None` if a
    /// trim held the list: `old` then goes to `call_srcu`, the usual
    /// deferred free (that trim queues the next one if tables remain).
    fn update(
        self: &Arc<Self>,
        old: Option<Stale<IoBus>>,
        bytes: usize,
        may_carry: bool,
    ) -> Option<u64> {
        let Some(mut list) = self.try_list() else {
            drop(old);
            return None;
        };
        list.updates += 1;
        list.reclaim(RECLAIM_PER_UPDATE);
        let seen = list.updates;
        let mut carrier = None;
        if let Some(old) = old {
            // (A load first: the swap, a locked instruction, only when no
            // trim is queued and the list is full, once per trim.)
            if !may_carry
                || self.trim_queued.load(Relaxed)
                || list.bytes + bytes <= UNTRIMMED
                || self.trim_queued.swap(true, SeqCst)
            {
                list.push(old, bytes);
            } else {
                carrier = Some((old, seen));
            }
        }
        self.release(list);
        if let Some((table, seen)) = carrier {
            self.queue_trim(table, seen);
        }
        Some(seen)
    }

    /// The list, waiting out a trim that holds it (a few microseconds);
    /// `None` only if it stays taken (a `fork`ed child whose parent's
    /// worker held it).
    fn list_briefly(&self) -> Option<MutexGuard<'_, Retired>> {
        for _ in 0..10_000 {
            if let Some(list) = self.try_list() {
                return Some(list);
            }
            std::thread::yield_now();
        }
        None
    }

    /// Frees every table whose grace period has completed (after an
    /// unregistration's wait: all that it covered).
    pub(crate) fn reclaim_all(self: &Arc<Self>) {
        if let Some(mut list) = self.list_briefly() {
            list.reclaim(usize::MAX);
            self.release(list);
        }
    }

    /// What is kept.
    pub(crate) fn counts(self: &Arc<Self>) -> RetiredTables {
        let Some(list) = self.list_briefly() else {
            return RetiredTables::default();
        };
        let counts = list.counts();
        self.release(list);
        counts
    }

    /// Queues a trim, carried by `carrier`, for the state after `seen`
    /// updates.
    fn queue_trim(self: &Arc<Self>, carrier: Stale<IoBus>, seen: u64) {
        let weak = Arc::downgrade(self);
        carrier.then(move |table| {
            drop(table);
            trim(&weak, seen, true);
        });
    }
}

/// What a removal's completion owes the retired list: the table its
/// unpublish retired waits there without a trim
/// ([`RetiredList::retire_for_removal`]), for the removal's grace period.
pub(crate) struct AfterRemoval {
    list: Weak<RetiredList>,
    /// The list's update count after the removal's own update.
    seen: u64,
}

impl AfterRemoval {
    /// Owes nothing (the removal's table went to `call_srcu`).
    pub(crate) fn nothing() -> AfterRemoval {
        AfterRemoval {
            list: Weak::new(),
            seen: 0,
        }
    }

    /// On the thread that waited for the removal's grace period: frees
    /// every table that grace period covered, the removal's own among
    /// them.
    pub(crate) fn reclaim_now(mut self) {
        if let Some(list) = core::mem::take(&mut self.list).upgrade() {
            list.reclaim_all();
        }
    }

    /// On the callback worker, after the removal's grace period (a
    /// removal completed in the background): what a trim does, without
    /// taking over the flag of a trim that may be queued.
    pub(crate) fn after_grace_period(mut self) {
        trim(&core::mem::take(&mut self.list), self.seen, false);
    }
}

impl Drop for AfterRemoval {
    /// Dropped without completing (a `wait` whose grace period panicked):
    /// the removal's table must not stay without a trim. What a trim does
    /// with nothing to reclaim yet: queues one if none is (or leaves it to
    /// the list's holder). Nothing if completed, owed nothing, or the
    /// `Buses` is gone (the `Weak` is empty or dead).
    fn drop(&mut self) {
        trim(&self.list, NO_UPDATE, false);
    }
}

/// The trim: on the callback worker, after the grace period of the table
/// that carried it (`queued`) or of a removal ([`AfterRemoval`]). If no
/// update came since (after `seen`), it frees every table whose grace
/// period has completed; otherwise the updater is at work and frees them
/// itself. While tables remain, the newest carries the next trim, unless
/// one is queued. If the list is taken, its holder queues the next trim
/// when it lets go.
fn trim(weak: &Weak<RetiredList>, seen: u64, queued: bool) {
    let Some(shared) = weak.upgrade() else {
        return; // the `Buses` is gone, and its list with it
    };
    if queued {
        // Cleared first: from here on an update or a holder may queue the
        // next trim.
        shared.trim_queued.store(false, SeqCst);
    }
    let Some(mut list) = shared.list_or_leave_trim() else {
        return;
    };
    if list.updates == seen {
        list.reclaim(usize::MAX);
    }
    let carrier = shared.carrier(&mut list);
    shared.release(list);
    if let Some((table, seen)) = carrier {
        shared.queue_trim(table, seen);
    }
}

/// The unpublished tables a [`Buses`](crate::Buses) keeps until a grace
/// period lets its updater free them (from
/// [`Buses::retired_tables`](crate::Buses::retired_tables)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetiredTables {
    /// How many tables.
    pub tables: usize,
    /// Their memory, in bytes: at most 256 KiB.
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables are freed only after a grace period, oldest first, and at
    /// most `most` per call; past the budget the oldest go to `call_srcu`
    /// (a table bigger than the budget goes at once).
    #[test]
    fn reclaim_waits_for_grace_periods_and_the_budget_holds() {
        let srcu = srcu::Srcu::new();
        let mut r = Retired::default();
        r.push(srcu.retire(IoBus::empty()), 100);
        r.push(srcu.retire(IoBus::empty()), 100);
        assert_eq!(r.reclaim(usize::MAX), 0, "no grace period yet");
        srcu.synchronize();
        r.push(srcu.retire(IoBus::empty()), 100);
        assert_eq!(r.reclaim(1), 1, "at most `most`");
        assert_eq!(
            r.counts(),
            RetiredTables {
                tables: 2,
                bytes: 200
            }
        );
        assert_eq!(r.reclaim(usize::MAX), 1, "the newest waits for its own");
        srcu.barrier();
        let ran = srcu.stats().callbacks_run;
        for _ in 0..6 {
            r.push(srcu.retire(IoBus::empty()), BUDGET / 4);
        }
        assert_eq!(
            r.counts(),
            RetiredTables {
                tables: 4,
                bytes: BUDGET
            }
        );
        r.push(srcu.retire(IoBus::empty()), BUDGET + 1);
        assert_eq!(r.counts(), RetiredTables::default());
        // The 100-byte table, 6 quarters and the big one: dropped, each
        // handed to `call_srcu`.
        srcu.barrier();
        assert_eq!(srcu.stats().callbacks_run - ran, 8);
    }

    /// A removal whose update found the list taken (a trim holds it) still
    /// frees, after its wait, every kept table its grace period covered,
    /// as `unregister_many` documents. (From a review: its `AfterRemoval`
    /// was `nothing()`, so `wait` freed nothing and the tables stayed until
    /// the next trim; `retired_tables_inside_a_read_section` failed 5
    /// times in 8000 runs of the pair, never on the code before.)
    #[test]
    fn a_removal_that_finds_the_list_taken_still_frees_what_it_covered() {
        let srcu = srcu::Srcu::new();
        let shared = RetiredList::new();
        // A trim is queued (its carrier's grace period not yet passed), so
        // two registrations keep their tables.
        shared.trim_queued.store(true, SeqCst);
        shared.retire(Some(srcu.retire(IoBus::empty())), 100);
        shared.retire(Some(srcu.retire(IoBus::empty())), 100);
        assert_eq!(shared.counts().tables, 2);
        // The removal's update, while that trim holds the list.
        let held = shared.list.lock().unwrap();
        let after = shared.retire_for_removal(Some(srcu.retire(IoBus::empty())), 100);
        drop(held);
        // `Removal::wait`: its grace period, then `reclaim_now`.
        srcu.synchronize();
        after.reclaim_now();
        assert_eq!(
            shared.counts(),
            RetiredTables::default(),
            "the removal's grace period covered both kept tables"
        );
    }

    /// A trim that finds the list taken leaves the next trim to the holder,
    /// which queues it when it lets go: the tables are still freed with no
    /// update to come. Here the test thread is the holder, as an updater
    /// past its check of `trim_queued` (it saw a trim queued and pushed its
    /// table) while the trim runs. Without fences T/U and `trim_missed`,
    /// the table stayed with no trim queued. (From a review.)
    #[test]
    fn a_trim_that_finds_the_list_taken_is_queued_by_the_holder() {
        let srcu = srcu::Srcu::new();
        let shared = RetiredList::new();
        // First update, of a table past `UNTRIMMED`: it carries a trim.
        shared.retire(Some(srcu.retire(IoBus::empty())), UNTRIMMED + 1);
        assert!(shared.trim_queued.load(SeqCst));
        // Second update, up to its push: kept.
        let mut list = shared.list.lock().unwrap();
        list.updates += 1;
        list.push(srcu.retire(IoBus::empty()), 100);
        // The queued trim runs now, while the list is held.
        srcu.barrier();
        assert!(shared.trim_missed.load(SeqCst), "the trim left its duty");
        shared.release(list); // queues the trim (which may run at once)
        let mut rounds = 0;
        while shared.counts() != RetiredTables::default() {
            rounds += 1;
            assert!(rounds < 20, "{:?}", shared.counts());
            srcu.barrier();
        }
    }
}
