//! [`SrcuStats`]: what a domain has cost, for VMM authors to watch in
//! production and for tests to assert on (counts, not timings).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one domain, updated with relaxed atomics off the read path
/// (readers never touch them).
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) grace_periods: AtomicU64,
    pub(crate) expedited_requests: AtomicU64,
    pub(crate) scans: AtomicU64,
    pub(crate) membarriers: AtomicU64,
    pub(crate) membarrier_fallbacks: AtomicU64,
    pub(crate) waits: AtomicU64,
    pub(crate) wait_wall_ns: AtomicU64,
    pub(crate) wait_cpu_ns: AtomicU64,
    pub(crate) wait_naps: AtomicU64,
    pub(crate) wait_nap_stretches: AtomicU64,
    pub(crate) longest_grace_period_ns: AtomicU64,
    pub(crate) driver_handoffs: AtomicU64,
    pub(crate) driver_panics: AtomicU64,
    pub(crate) callbacks_run: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) worker_starts: AtomicU64,
}

impl Stats {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn max(counter: &AtomicU64, v: u64) {
        if v > counter.load(Relaxed) {
            counter.fetch_max(v, Relaxed);
        }
    }

    /// For counters written only by the grace-period driver (one thread
    /// at a time; the hand-over goes through the state mutex, which orders
    /// successive drivers): a load and a store, no locked instruction on
    /// the grace-period path.
    #[inline]
    pub(crate) fn add_by_driver(counter: &AtomicU64, n: u64) {
        counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub(crate) fn snapshot(&self) -> SrcuStats {
        SrcuStats {
            grace_periods: self.grace_periods.load(Relaxed),
            expedited_requests: self.expedited_requests.load(Relaxed),
            scans: self.scans.load(Relaxed),
            membarriers: self.membarriers.load(Relaxed),
            membarrier_fallbacks: self.membarrier_fallbacks.load(Relaxed),
            waits: self.waits.load(Relaxed),
            wait_wall_ns: self.wait_wall_ns.load(Relaxed),
            wait_cpu_ns: self.wait_cpu_ns.load(Relaxed),
            wait_naps: self.wait_naps.load(Relaxed),
            wait_nap_stretches: self.wait_nap_stretches.load(Relaxed),
            longest_grace_period_ns: self.longest_grace_period_ns.load(Relaxed),
            driver_handoffs: self.driver_handoffs.load(Relaxed),
            driver_panics: self.driver_panics.load(Relaxed),
            callbacks_run: self.callbacks_run.load(Relaxed),
            callback_panics: self.callback_panics.load(Relaxed),
            worker_starts: self.worker_starts.load(Relaxed),
        }
    }
}

/// A snapshot of a domain's statistics; from [`crate::Srcu::stats`].
///
/// Every field counts since the domain was created; subtract two snapshots
/// to measure an interval ([`SrcuStats::since`]).
///
/// ```
/// let srcu = srcu::Srcu::new_fast();
/// let before = srcu.stats();
/// srcu.synchronize(); // no reader: an idle grace period
/// let d = srcu.stats().since(&before);
/// assert_eq!(d.grace_periods, 1);
/// if srcu.reader_mode() == srcu::ReaderMode::Membarrier {
///     assert_eq!(d.membarriers, 3); // the floor: see `membarriers`
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SrcuStats {
    /// Grace periods completed.
    pub grace_periods: u64,
    /// Calls that asked for an expedited grace period.
    pub expedited_requests: u64,
    /// Full drain checks of an index (sum unlocks, barrier A, sum locks).
    /// Cheap pre-checks without barrier A are not counted.
    pub scans: u64,
    /// `membarrier(PRIVATE_EXPEDITED)` calls (fast flavor): each one
    /// interrupts every CPU running a thread of the process, i.e. every
    /// running vCPU. An idle grace period issues 3 (A of the first scan, D
    /// after the flip, A of the second scan; E rides on the first A, see
    /// `barriers.rs`), which is the floor of the two-scan algorithm; a
    /// grace period that waits for a reader adds about one per reader
    /// departure it notices, never one per poll.
    pub membarriers: u64,
    /// Heavy barriers that fell back to the `mprotect` IPI because
    /// `membarrier` failed after registration (a seccomp filter, say).
    pub membarrier_fallbacks: u64,
    /// Scans that found readers and had to wait.
    pub waits: u64,
    /// Wall time spent in those waits, in nanoseconds.
    pub wait_wall_ns: u64,
    /// CPU time the waiting threads burnt in those waits (thread CPU
    /// clock), in nanoseconds: spinning for the first microseconds, then
    /// sleeping with back-off.
    pub wait_cpu_ns: u64,
    /// Naps those waits took (sleeps between polls, after the first 50 µs
    /// of spinning).
    pub wait_naps: u64,
    /// Times a wait doubled its longest nap because a nap cost more than
    /// 3 % of its length in CPU time (hosts where sleeping is costly; at
    /// most 2 per wait).
    pub wait_nap_stretches: u64,
    /// The longest grace period so far, in nanoseconds, from the moment it
    /// started waiting for readers to its end (idle grace periods, which
    /// never wait, are not timed: they cost a few microseconds at most).
    pub longest_grace_period_ns: u64,
    /// Times a driver stopped at its own target and handed the remaining
    /// grace periods to a waiter (bounded latency for every caller).
    pub driver_handoffs: u64,
    /// Grace periods abandoned because the driving thread panicked (a
    /// stall hook, say); the state was restored and the next caller
    /// restarted the grace period.
    pub driver_panics: u64,
    /// `call_srcu` callbacks run.
    pub callbacks_run: u64,
    /// Callbacks that panicked (reported on stderr; the others still run).
    pub callback_panics: u64,
    /// Times the callback worker was started (more than 1 after a restart:
    /// a panic in the worker's grace period, or `fork`).
    pub worker_starts: u64,
}

impl SrcuStats {
    /// The counts accumulated since `earlier` (the longest grace period is
    /// kept as is: it is a maximum, not a count).
    pub fn since(&self, earlier: &SrcuStats) -> SrcuStats {
        SrcuStats {
            grace_periods: self.grace_periods - earlier.grace_periods,
            expedited_requests: self.expedited_requests - earlier.expedited_requests,
            scans: self.scans - earlier.scans,
            membarriers: self.membarriers - earlier.membarriers,
            membarrier_fallbacks: self.membarrier_fallbacks - earlier.membarrier_fallbacks,
            waits: self.waits - earlier.waits,
            wait_wall_ns: self.wait_wall_ns - earlier.wait_wall_ns,
            wait_cpu_ns: self.wait_cpu_ns - earlier.wait_cpu_ns,
            wait_naps: self.wait_naps - earlier.wait_naps,
            wait_nap_stretches: self.wait_nap_stretches - earlier.wait_nap_stretches,
            longest_grace_period_ns: self.longest_grace_period_ns,
            driver_handoffs: self.driver_handoffs - earlier.driver_handoffs,
            driver_panics: self.driver_panics - earlier.driver_panics,
            callbacks_run: self.callbacks_run - earlier.callbacks_run,
            callback_panics: self.callback_panics - earlier.callback_panics,
            worker_starts: self.worker_starts - earlier.worker_starts,
        }
    }
}

/// CPU time of the calling thread, in nanoseconds.
#[cfg(not(loom))]
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(loom)]
pub(crate) fn thread_cpu_ns() -> u64 {
    0
}
