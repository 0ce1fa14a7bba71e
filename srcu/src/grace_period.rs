//! Grace periods: the state machine, waiting for readers, and the three ways
//! to ask for one (blocking, expedited, polled).
//!
//! # The state machine
//!
//! Readers increment `lock[idx]` of the current index `idx` (which they
//! load as the address of its counter words, `Counters::cur`, the kernel's
//! `srcu_ctrp`) and later `unlock[idx]`. One grace period is:
//!
//! ```text
//!  F                         (caller's stores before the scans)
//!  SCAN1: wait until index !idx is drained    -- stragglers that read the
//!                                                old index before the last flip
//!  E; flip: idx = !idx (cur = &slots[0].lock[!idx]); D
//!  SCAN2: wait until index idx (now inactive) is drained
//!  G                         (scans before the caller's frees)
//! ```
//!
//! New readers keep arriving on the *new* index, so SCAN2 only waits for
//! sections that were already running: the grace period makes progress under
//! any read load (this is the two-index flip of srcutree). "Drained" is
//! `Σ unlock == Σ lock` with barrier A between the sums (`percpu.rs`).
//!
//! # Sharing, and handing the driving over
//!
//! Grace periods are numbered. A caller needs the first one that *starts*
//! after its call: `completed + 1` if none is running, `completed + 2` if one
//! is. It raises `requested` to that number; if nobody is driving, it drives
//! *until its own target has completed*, then stops and wakes the waiters,
//! one of which takes over if more grace periods are wanted. So any number
//! of concurrent callers share grace periods, and no caller is held for more
//! than its own (at most two) grace periods by a stream of later callers
//! (`driver_handoffs` in the statistics counts the hand-overs). The callback
//! worker shares grace periods the same way. A cookie of the polled API is
//! simply that number.
//!
//! # Faults
//!
//! If the driving thread unwinds out of a grace period (a stall hook that
//! panics, a failing system call), a drop guard restores the state:
//! `driving` and `in_progress` are cleared and waiters are woken, so the
//! next caller restarts that grace period from its first scan (a restarted
//! grace period is a complete one: the flip it may have done is harmless,
//! both indices are scanned again). `driver_panics` counts these.
//!
//! # Waiting, and what it costs the vCPUs
//!
//! Readers do not signal the updater (that would cost them), so a driver
//! polls the counters. Each poll first *peeks* (sums the index without
//! barrier A: no `membarrier`, no fence); only a peek that finds the index
//! drained is confirmed by the real check with barrier A. A reader holding
//! a section for a long time therefore costs no interrupt per poll: about
//! one `membarrier` per reader departure noticed. (A peek may say "busy"
//! when the index has just drained, which only delays the confirmation; it
//! can never confirm anything by itself.)
//!
//! Between polls the driver spins for the first 50 µs (sections are short),
//! then sleeps, doubling the nap from 20 µs up to 1 ms (500 µs while an
//! expedited grace period is wanted; stretched up to 4 ms, 1 ms expedited,
//! on hosts where a nap costs more than 3 % of its length in CPU time,
//! `nap.rs`). It never calls `sched_yield`: on a host whose CPUs are all
//! busy (running vCPUs), a yield hands the CPU to
//! another thread for a whole time slice, milliseconds, while a nap of
//! 20 µs returns in tens of microseconds. Beyond its first 100 µs a wait
//! thus costs a few percent of a CPU at most, expedited included
//! (`wait_cpu_ns` in the statistics).

use crate::barriers;
use crate::domain::{Inner, Srcu};
use crate::flavor::Flavor;
use crate::nap::{Naps, SPIN_FOR};
use crate::stall::StallReport;
use crate::stats::Stats;
use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard};
use core::sync::atomic::AtomicU32;
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
    /// The fork generation (`fork.rs`) of the driving thread: a driver
    /// recorded before a `fork` does not exist in the child.
    driver_fork: u64,
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

    /// True if a thread of this process is driving.
    fn driven(&self) -> bool {
        self.driving && self.driver_fork == crate::fork::generation()
    }
}

pub(crate) struct GracePeriods {
    state: Mutex<State>,
    done: Condvar,
    /// Mirror of `state.completed` for lock-free polling. Stored with
    /// release after barrier G, loaded with acquire by `poll`.
    completed: AtomicU64,
    /// Callers waiting for an expedited grace period: drivers nap shorter.
    expedite: AtomicU32,
}

impl GracePeriods {
    pub(crate) fn new() -> Self {
        GracePeriods {
            state: Mutex::new(State {
                completed: 0,
                in_progress: false,
                requested: 0,
                driving: false,
                driver_fork: 0,
                waiting: 0,
            }),
            done: Condvar::new(),
            completed: AtomicU64::new(0),
            expedite: AtomicU32::new(0),
        }
    }

    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Acquire)
    }

    /// `fork` support (`fork.rs`): takes the state lock and hands the
    /// guard to `keep`.
    #[cfg(all(unix, not(loom)))]
    pub(crate) fn lock_for_fork<'a>(&'a self, keep: &mut impl FnMut(crate::fork::Held<'a>)) {
        keep(Box::new(self.state.lock()));
    }

    /// The number of the first grace period that starts after now, recorded
    /// as requested.
    fn request(st: &mut State) -> u64 {
        let target = st.next_to_start();
        st.requested = st.requested.max(target);
        target
    }

    /// A grace period that somebody asked for and that has not completed
    /// (the callback worker drives or waits for it), if any.
    pub(crate) fn wanted(&self) -> Option<u64> {
        let st = self.state.lock();
        (st.requested > st.completed).then_some(st.requested)
    }
}

/// Restores the grace-period state if the driver unwinds out of a grace
/// period. Created with the state unlocked; its drop locks it.
struct DriverUnwind<'a>(&'a Inner);

impl Drop for DriverUnwind<'_> {
    fn drop(&mut self) {
        let gp = &self.0.gp;
        let mut st = gp.state.lock();
        st.in_progress = false;
        st.driving = false;
        Stats::add(&self.0.stats.driver_panics, 1);
        if st.waiting > 0 {
            gp.done.notify_all();
        }
    }
}

/// Decrements the expedite count however the wait ends.
struct Expedited<'a>(&'a AtomicU32);

impl Drop for Expedited<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Inner {
    /// Blocks until grace period `target` has completed, driving (up to
    /// `target` only) whenever nobody else does.
    pub(crate) fn wait_for_gp(&self, target: u64) {
        let st = self.gp.state.lock();
        self.wait_for_gp_locked(st, target);
    }

    /// [`wait_for_gp`](Inner::wait_for_gp) with the state already locked
    /// (one lock round trip fewer on the idle path).
    fn wait_for_gp_locked<'a>(&'a self, mut st: MutexGuard<'a, State>, target: u64) {
        let gp = &self.gp;
        st.requested = st.requested.max(target);
        let mut spun = false;
        while st.completed < target {
            if !st.driven() {
                // Nobody drives, or the driver stopped at its own target
                // (before ours): take over.
                self.drive(st, target);
                return;
            }
            if !spun {
                // Brief spin: a driver often finishes within microseconds.
                spun = true;
                drop(st);
                for _ in 0..64 {
                    if gp.completed.load(Acquire) >= target {
                        return;
                    }
                    crate::sync::spin_hint();
                }
                st = gp.state.lock();
                continue;
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
        (st.waiting, st.driven())
    }

    /// An expedited grace period: drivers nap shorter while this waits
    /// (`nap.rs`).
    pub(crate) fn synchronize_expedited_inner(&self) {
        self.gp.expedite.fetch_add(1, Relaxed);
        let _undo = Expedited(&self.gp.expedite);
        Stats::add(&self.stats.expedited_requests, 1);
        let mut st = self.gp.state.lock();
        let target = GracePeriods::request(&mut st);
        self.wait_for_gp_locked(st, target);
    }

    /// [`wait_for_gp`](Inner::wait_for_gp), asking drivers to nap less.
    pub(crate) fn wait_for_gp_expedited(&self, target: u64) {
        self.gp.expedite.fetch_add(1, Relaxed);
        let _undo = Expedited(&self.gp.expedite);
        Stats::add(&self.stats.expedited_requests, 1);
        self.wait_for_gp(target);
    }

    /// The first grace period that starts after now (not requested).
    pub(crate) fn next_gp_to_start(&self) -> u64 {
        self.gp.state.lock().next_to_start()
    }

    /// Makes sure grace period `target` is wanted (the worker drives it).
    pub(crate) fn request_gp_at_least(&self, target: u64) {
        let mut st = self.gp.state.lock();
        st.requested = st.requested.max(target);
    }

    /// Waits for a grace period that starts after now (driving it if
    /// nobody does): `synchronize`, minus the self-deadlock check.
    pub(crate) fn synchronize_inner(&self) {
        let mut st = self.gp.state.lock();
        let target = GracePeriods::request(&mut st);
        self.wait_for_gp_locked(st, target);
    }

    /// Requests a grace period starting after now and returns its number.
    pub(crate) fn request_gp(&self) -> u64 {
        let mut st = self.gp.state.lock();
        GracePeriods::request(&mut st)
    }

    /// Runs grace periods until `completed >= target`, then gives up the
    /// driver role and wakes the waiters (one takes over if more are
    /// wanted). Called with the state locked and nobody driving.
    fn drive<'a>(&'a self, mut st: MutexGuard<'a, State>, target: u64) {
        st.driving = true;
        st.driver_fork = crate::fork::generation();
        while st.completed < target {
            st.in_progress = true;
            let number = st.completed + 1;
            drop(st);
            let unwind = DriverUnwind(self);
            self.run_one(number);
            core::mem::forget(unwind);
            st = self.gp.state.lock();
            st.in_progress = false;
            st.completed += 1;
            // Release: pairs with the acquire in `poll`/the spin above, after
            // barrier G inside `run_one`.
            self.gp.completed.store(st.completed, Release);
        }
        st.driving = false;
        if st.requested > st.completed {
            Stats::add(&self.stats.driver_handoffs, 1);
        }
        // Waiters count themselves under the lock before they sleep, so
        // none is missed; with none, no futex system call (a condition
        // variable's notify is one even without waiters).
        if st.waiting > 0 {
            self.gp.done.notify_all();
        }
    }

    /// One full grace period (see the module docs).
    ///
    /// The clock is read only if a scan has to wait: an idle grace period
    /// (two scans that find nothing) costs its barriers and nothing else.
    fn run_one(&self, number: u64) {
        // F: the caller's unpublishing stores before the scans.
        barriers::f_g();
        // Only the driver flips the index.
        let idx = self.counters.current_idx();
        // SCAN1: stragglers that loaded the old index before the last flip
        // (`--cfg srcu_teeth="scan1"` removes it, for scripts/teeth.sh).
        let waited1 = if cfg!(srcu_teeth = "scan1") {
            None
        } else {
            self.wait_drained(1 ^ (idx & 1), number)
        };
        barriers::e(); // E: pairs with B and C (through A of that scan).
        self.counters.flip_to(idx ^ 1); // the flip
        self.heavy(barriers::d); // D: pairs with C.
        let waited2 = self.wait_drained(idx & 1, number);
        barriers::f_g(); // G: the scans before the caller's frees.
        Stats::add_by_driver(&self.stats.grace_periods, 1);
        if let Some(since) = waited1.or(waited2) {
            // From the first wait on: an idle grace period is far shorter
            // than any that waited, so the longest is measured right.
            Stats::max(
                &self.stats.longest_grace_period_ns,
                since.elapsed().as_nanos() as u64,
            );
        }
    }

    /// Runs a grace-period-side full barrier (`membarrier` in a fast
    /// domain) and counts it.
    fn heavy(&self, barrier: fn(bool) -> bool) {
        if self.fast {
            Stats::add_by_driver(&self.stats.membarriers, 1);
        }
        if barrier(self.fast) {
            Stats::add_by_driver(&self.stats.membarrier_fallbacks, 1);
        }
    }

    /// The real drain check of index `i`, with barrier A; counted.
    fn scan(&self, i: usize) -> bool {
        Stats::add_by_driver(&self.stats.scans, 1);
        self.counters.drained(i, || self.heavy(barriers::a))
    }

    /// A peek, then the real check only if the peek found `i` drained.
    fn poll_drained(&self, i: usize) -> bool {
        self.counters.peek_drained(i) && self.scan(i)
    }

    /// Polls until index `i` has no readers: spins, yields, then sleeps
    /// (module docs).
    /// Returns when the wait began, if it had to wait at all.
    fn wait_drained(&self, i: usize, number: u64) -> Option<Instant> {
        if self.poll_drained(i) {
            return None;
        }
        let start = Instant::now();
        let cpu_start = crate::stats::thread_cpu_ns();
        let mut reported = false;
        let mut naps = Naps::new();
        loop {
            if self.poll_drained(i) {
                break;
            }
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
            if cfg!(loom) {
                crate::sync::yield_now();
            } else if waited < SPIN_FOR {
                for _ in 0..32 {
                    crate::sync::spin_hint();
                }
            } else {
                let expedited = self.gp.expedite.load(Relaxed) > 0;
                let nap = naps.next(expedited);
                Stats::add_by_driver(&self.stats.wait_naps, 1);
                if naps.measures(nap, expedited) {
                    // What a nap at the cap costs this thread (`nap.rs`).
                    let (wall, cpu) = (Instant::now(), crate::stats::thread_cpu_ns());
                    sleep(nap);
                    let cpu = crate::stats::thread_cpu_ns().saturating_sub(cpu);
                    if naps.cost(expedited, wall.elapsed(), Duration::from_nanos(cpu)) {
                        Stats::add_by_driver(&self.stats.wait_nap_stretches, 1);
                    }
                } else {
                    sleep(nap);
                }
            }
        }
        let s = &self.stats;
        Stats::add_by_driver(&s.waits, 1);
        Stats::add_by_driver(&s.wait_wall_ns, start.elapsed().as_nanos() as u64);
        Stats::add_by_driver(
            &s.wait_cpu_ns,
            crate::stats::thread_cpu_ns().saturating_sub(cpu_start),
        );
        Some(start)
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
    /// If the calling thread holds a [`crate::ReadGuard`] of this domain
    /// (it would wait for itself forever; see
    /// [`Srcu::in_read_section`]), in release builds too. If the stall hook
    /// panics, that panic propagates here and the domain stays usable.
    pub fn synchronize(&self) {
        crate::held::assert_not_reading(self.inner.held_slot(), "synchronize");
        self.inner.synchronize_inner();
    }

    /// Like [`synchronize`](Srcu::synchronize), with lower latency once the
    /// readers have left: while it waits, the driver naps at most 500 µs
    /// between polls instead of 1 ms (1 ms instead of up to 4 ms on hosts
    /// where each nap costs more than 3 % of its length in CPU time: the
    /// caps stretch there, see
    /// [`SrcuStats::wait_nap_stretches`](crate::SrcuStats::wait_nap_stretches)).
    /// It never polls without sleeping beyond the first 100 µs, so a long reader costs neither a CPU nor a
    /// `membarrier` storm (see [`Srcu::stats`]).
    ///
    /// # Panics
    ///
    /// As [`synchronize`](Srcu::synchronize).
    pub fn synchronize_expedited(&self) {
        crate::held::assert_not_reading(self.inner.held_slot(), "synchronize_expedited");
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
        GpCookie(self.inner.next_gp_to_start())
    }

    /// Hands `value`, which the caller has just made unreachable for new
    /// readers (unpublished), to the domain: the returned [`Stale`](crate::Stale) can be
    /// waited for, polled, or dropped (freed after a grace period), exactly
    /// like a value replaced in an [`crate::SrcuCell`]. For data structures
    /// that unpublish something other than a cell's whole value (an entry
    /// removed from a table).
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let old = srcu.retire(vec![1, 2, 3]);
    /// assert_eq!(*old.synchronize(), vec![1, 2, 3]);
    /// ```
    pub fn retire<T: Send + 'static>(&self, value: T) -> crate::Stale<T> {
        crate::Stale::new(Box::new(value), &self.inner)
    }

    /// What the domain has cost so far: grace periods, scans, `membarrier`
    /// calls, CPU burnt while waiting, callbacks run, the longest grace
    /// period. See [`crate::SrcuStats`].
    pub fn stats(&self) -> crate::SrcuStats {
        self.inner.stats.snapshot()
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
