//! Grace periods: the state machine, waiting for readers, and the three ways
//! to ask for one (blocking, expedited, polled).
//!
//! # The state machine
//!
//! Readers increment `lock[idx]` of the current index `idx = srcu_idx & 1`
//! and later `unlock[idx]`. One grace period is:
//!
//! ```text
//!  F                         (caller's stores before the scans)
//!  SCAN1: wait until index !idx is drained    -- stragglers that read the
//!                                                old index before the last flip
//!  E; flip: srcu_idx += 1; D
//!  SCAN2: wait until index idx (now inactive) is drained
//!  G                         (scans before the caller's frees)
//! ```
//!
//! New readers keep arriving on the *new* index, so SCAN2 only waits for
//! sections that were already running: the grace period makes progress under
//! any read load (this is the two-index flip of srcutree). "Drained" is
//! `Σ unlock == Σ lock` with barrier A between the sums (`percpu.rs`).
//!
//! # Sharing
//!
//! Grace periods are numbered. A caller needs the first one that *starts*
//! after its call: `completed + 1` if none is running, `completed + 2` if one
//! is. It raises `requested` to that number; if nobody is driving, it drives
//! (runs grace periods until `completed >= requested`), otherwise it waits.
//! So any number of concurrent callers share grace periods, and the callback
//! worker shares them with `synchronize` callers too. A cookie of the polled
//! API is simply that number.
//!
//! # Waiting
//!
//! Readers do not signal the updater (that would cost them), so a driver
//! polls the counters: twice back to back (sections are short), then a few
//! spins, then sleeps that double from 20 µs up to 1 ms, so a long section
//! costs the driver almost no CPU. `synchronize_expedited` never sleeps.

use crate::barriers;
use crate::domain::{Inner, Srcu};
use crate::flavor::Flavor;
use crate::stall::StallReport;
use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard};
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

/// A grace-period number from [`Srcu::start_poll`]; pass it to
/// [`Srcu::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpCookie(pub(crate) u64);

struct State {
    completed: u64,
    in_progress: bool,
    requested: u64,
    driving: bool,
    /// Waiters that asked for an expedited grace period.
    expedite: u32,
    /// Callers blocked waiting for somebody else's grace period (for
    /// diagnostics and tests).
    waiting: u32,
}

impl State {
    /// The first grace period that starts after now: the next one if none
    /// is running, else the one after the running one.
    fn next_to_start(&self) -> u64 {
        self.completed + 1 + self.in_progress as u64
    }
}

pub(crate) struct GracePeriods {
    state: Mutex<State>,
    done: Condvar,
    /// Mirror of `state.completed` for lock-free polling. Stored with
    /// release after barrier G, loaded with acquire by `poll`.
    completed: AtomicU64,
}

impl GracePeriods {
    pub(crate) fn new() -> Self {
        GracePeriods {
            state: Mutex::new(State {
                completed: 0,
                in_progress: false,
                requested: 0,
                driving: false,
                expedite: 0,
                waiting: 0,
            }),
            done: Condvar::new(),
            completed: AtomicU64::new(0),
        }
    }

    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Acquire)
    }

    /// The number of the first grace period that starts after now, recorded
    /// as requested.
    fn request(st: &mut State) -> u64 {
        let target = st.next_to_start();
        st.requested = st.requested.max(target);
        target
    }

    /// The highest grace period anybody asked for.
    pub(crate) fn requested(&self) -> u64 {
        self.state.lock().requested
    }

    /// True if somebody must be woken to drive (nobody is driving and a
    /// grace period is wanted).
    pub(crate) fn needs_driver(&self) -> bool {
        let st = self.state.lock();
        !st.driving && st.requested > st.completed
    }
}

impl Inner {
    /// Blocks until grace period `target` has completed, driving it if
    /// nobody else does.
    pub(crate) fn wait_for_gp(&self, target: u64) {
        let gp = &self.gp;
        let mut st = gp.state.lock();
        if st.completed >= target {
            return;
        }
        st.requested = st.requested.max(target);
        if !st.driving {
            self.drive(st);
            return;
        }
        drop(st);
        // Brief spin: a driver often finishes within microseconds.
        for _ in 0..64 {
            if gp.completed.load(Acquire) >= target {
                return;
            }
            crate::sync::spin_hint();
        }
        let mut st = gp.state.lock();
        while st.completed < target {
            if !st.driving {
                // The driver stopped short of our target (it only runs to
                // the `requested` it saw): take over.
                self.drive(st);
                return;
            }
            st.waiting += 1;
            gp.done.wait(&mut st);
            st.waiting -= 1;
        }
    }

    /// Callers blocked on another caller's grace period, and whether a
    /// grace period is being driven.
    pub(crate) fn waiters(&self) -> (u32, bool) {
        let st = self.gp.state.lock();
        (st.waiting, st.driving)
    }

    /// An expedited grace period: drivers spin and yield instead of
    /// sleeping while this waits.
    pub(crate) fn synchronize_expedited_inner(&self) {
        let target = {
            let mut st = self.gp.state.lock();
            st.expedite += 1;
            GracePeriods::request(&mut st)
        };
        self.wait_for_gp(target);
        self.gp.state.lock().expedite -= 1;
    }

    /// Waits for a grace period that starts after now (driving it if
    /// nobody does): `synchronize`, minus the debug check.
    pub(crate) fn synchronize_inner(&self) {
        let target = self.request_gp();
        self.wait_for_gp(target);
    }

    /// Requests a grace period starting after now and returns its number.
    pub(crate) fn request_gp(&self) -> u64 {
        let mut st = self.gp.state.lock();
        GracePeriods::request(&mut st)
    }

    /// Runs grace periods until `completed >= requested`, then gives up
    /// the driver role. Called with the state locked and `driving` false.
    fn drive<'a>(&'a self, mut st: MutexGuard<'a, State>) {
        st.driving = true;
        while st.completed < st.requested {
            st.in_progress = true;
            let number = st.completed + 1;
            drop(st);
            self.run_one(number);
            st = self.gp.state.lock();
            st.in_progress = false;
            st.completed += 1;
            // Release: pairs with the acquire in `poll`/the spin above, after
            // barrier G inside `run_one`.
            self.gp.completed.store(st.completed, Release);
            self.gp.done.notify_all();
        }
        st.driving = false;
        self.gp.done.notify_all();
    }

    /// One full grace period (see the module docs).
    fn run_one(&self, number: u64) {
        let heavy = self.fast;
        barriers::f_g(); // F: caller's unpublishing stores before the scans.
        let idx = self.idx.load(Relaxed); // only the driver writes it
        self.wait_drained(1 ^ (idx & 1), number);
        barriers::e(heavy); // E: pairs with B and C.
        self.idx.store(idx.wrapping_add(1), Relaxed); // the flip
        barriers::d(heavy); // D: pairs with C.
        self.wait_drained(idx & 1, number);
        barriers::f_g(); // G: the scans before the caller's frees.
    }

    fn expedite_requested(&self) -> bool {
        self.gp.state.lock().expedite > 0
    }

    /// Polls until index `i` has no readers, spinning then sleeping.
    fn wait_drained(&self, i: usize, number: u64) {
        let heavy = self.fast;
        // srcutree checks twice in quick succession: sections are short.
        for _ in 0..2 {
            if self.counters.drained(i, heavy) {
                return;
            }
        }
        let start = Instant::now();
        let mut reported = false;
        let mut nap = Duration::from_micros(20);
        let mut spins = 0u32;
        loop {
            if self.counters.drained(i, heavy) {
                return;
            }
            spins += 1;
            let waited = start.elapsed();
            if !reported && waited >= self.stall_timeout {
                reported = true;
                let report = StallReport {
                    waited,
                    readers: self.counters.readers(i),
                    grace_period: number,
                };
                (self.stall_hook)(&report);
            }
            if spins < 16 {
                for _ in 0..32 {
                    crate::sync::spin_hint();
                }
            } else if spins < 24 || self.expedite_requested() {
                crate::sync::yield_now();
            } else {
                sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(not(loom))]
fn sleep(d: Duration) {
    std::thread::sleep(d);
}

#[cfg(loom)]
fn sleep(_d: Duration) {
    loom::thread::yield_now();
}

impl<F: Flavor> Srcu<F> {
    /// Waits until every read section that began before this call has
    /// ended.
    ///
    /// Makes progress however many new readers arrive; spins briefly, then
    /// sleeps while a long section runs. Concurrent callers (and
    /// [`call_srcu`](Srcu::call_srcu)'s worker) share grace periods.
    ///
    /// Ordering: everything the caller did before the call happens before
    /// anything a reader does after a `read_lock` that the grace period did
    /// not wait for; everything any waited-for reader did in its section
    /// happens before the return. So: unpublish, `synchronize`, free.
    ///
    /// # Panics
    ///
    /// In debug builds, if the calling thread holds a [`crate::ReadGuard`]
    /// of this domain (it would wait for itself forever). Release builds
    /// hang instead, and the stall hook reports it.
    pub fn synchronize(&self) {
        crate::held::assert_not_reading(self.inner.id(), "synchronize");
        self.inner.synchronize_inner();
    }

    /// Like [`synchronize`](Srcu::synchronize), with the lowest latency: the
    /// grace period never sleeps while it waits for readers (it spins and
    /// yields), and a driver already sleeping is told to stop sleeping.
    ///
    /// # Panics
    ///
    /// As [`synchronize`](Srcu::synchronize).
    pub fn synchronize_expedited(&self) {
        crate::held::assert_not_reading(self.inner.id(), "synchronize_expedited");
        self.inner.synchronize_expedited_inner();
    }

    /// Starts a grace period (if none that would do is pending) without
    /// waiting for it; [`poll`](Srcu::poll) tells when it has completed.
    /// The callback worker drives it.
    pub fn start_poll(&self) -> GpCookie {
        let target = self.inner.request_gp();
        crate::callbacks::kick(&self.inner);
        GpCookie(target)
    }

    /// A cookie for the grace period a `synchronize` starting now would
    /// wait for, without starting one.
    pub fn get_state(&self) -> GpCookie {
        let st = self.inner.gp.state.lock();
        GpCookie(st.next_to_start())
    }

    /// True once the grace period of `cookie` has completed: every read
    /// section that began before the `start_poll` that returned it has
    /// ended. Cheap (one load); never blocks.
    pub fn poll(&self, cookie: GpCookie) -> bool {
        // Acquire: pairs with the release store after barrier G.
        self.inner.gp.completed() >= cookie.0
    }

    /// Number of grace periods completed so far.
    pub fn completed_grace_periods(&self) -> u64 {
        self.inner.gp.completed()
    }
}
