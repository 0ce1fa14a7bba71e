//! Sleepable RCU (SRCU) for userspace, with per-CPU counters.
//!
//! Readers enter a section with [`Srcu::read_lock`], which costs two
//! non-locked per-CPU adds in restartable sequences and no fence in the
//! [`Fast`] flavor (3-4.3 ns for `read_lock` + drop on a 2-vCPU Xeon VM,
//! 1.0-1.3x the two bare adds, depending on how busy the host is), and one
//! locked add plus one non-locked add in the [`Classic`] flavor (10-12.5
//! ns there), and may block
//! or sleep inside it. Updaters unpublish data and wait
//! for pre-existing readers with [`Srcu::synchronize`], or defer the free with
//! [`Srcu::call_srcu`]. This is the design of Linux's `kernel/rcu/srcutree.c`
//! (the two-index flip, split lock/unlock counters summed per index), brought
//! to userspace with rseq and `membarrier(2)`.
//!
//! ```
//! use srcu::{Srcu, SrcuCell, UpdateLock};
//! use std::sync::Arc;
//!
//! let srcu = Arc::new(Srcu::new());
//! let lock = Arc::new(UpdateLock::new(()));
//! let config = Arc::new(SrcuCell::new(&srcu, &lock, Some(String::from("v1"))));
//!
//! let reader = {
//!     let (srcu, config) = (srcu.clone(), config.clone());
//!     std::thread::spawn(move || {
//!         let guard = srcu.read_lock();
//!         let v = config.dereference(&guard).unwrap();
//!         assert!(v == "v1" || v == "v2"); // old or new, never freed memory
//!     })
//! };
//! let old = config.assign(String::from("v2"), &mut lock.lock());
//! drop(old); // freed by call_srcu after a grace period
//! reader.join().unwrap();
//! srcu.barrier(); // all deferred frees done
//! ```
//!
//! # When to use it (and when not)
//!
//! * Use it when reads are hot, many threads read at once, readers may block
//!   (a device handler that takes a lock or does I/O), and updates are rare:
//!   a VMM's I/O bus, routing tables, configuration.
//! * An `RwLock` is simpler when read sections are long and updates must be
//!   immediate and frequent; `arc-swap` is simpler when a reader only needs a
//!   snapshot and updates should not wait at all; `crossbeam-epoch` is the
//!   right tool for lock-free data structures with many small frees, but its
//!   readers must not block (a pinned thread holds back every collection).
//!
//! # Flavors
//!
//! See [`Flavor`]. The flavor is a type parameter (`Srcu<Classic>`, the
//! default, or `Srcu<Fast>`), so [`ReadGuard::mb_after_read_lock`] compiles
//! to nothing in the classic flavor.
//!
//! # Memory ordering
//!
//! Every barrier is lettered as in srcutree.c; the list, with each pairing,
//! is in the (private) `barriers` module, reproduced in the crate's README.
//! In short: `synchronize` returns only after every section that began
//! before it has ended; a section that began after `synchronize` was called
//! sees every store the caller made before calling it (when it reads it
//! through the section); `call_srcu` callbacks run after such a grace period.
//!
//! # Platform
//!
//! rseq is used on x86_64 Linux with glibc 2.35 or newer (it registers an
//! rseq area for every thread); elsewhere, or when it is not registered, the
//! counters use atomic read-modify-writes ([`Srcu::counter_path`] says
//! which). The fast flavor needs `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
//! (Linux 4.14+) and falls back to the classic barriers without it
//! ([`Srcu::reader_mode`]).

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod barriers;
mod callbacks;
mod cell;
mod domain;
mod flavor;
mod fork;
mod grace_period;
mod guard;
mod held;
mod membarrier;
mod nap;
mod percpu;
mod rseq;
mod stall;
mod stats;
mod sync;
mod update;

pub use cell::{SrcuCell, Stale};
pub use domain::{Builder, Srcu};
pub use flavor::{Classic, CounterPath, Fast, Flavor, ReaderMode};
pub use grace_period::GpCookie;
pub use guard::{ReadGuard, SendableReadGuard};
pub use stall::StallReport;
pub use stats::SrcuStats;
pub use update::{UpdateGuard, UpdateLock};

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[doc(hidden)]
pub mod __private {
    //! For the crate's own litmus and teeth tests only; not a stable API.
    use crate::{Flavor, Srcu};

    /// One drain check of index `idx` (sum unlocks, A, sum locks).
    pub fn drained<F: Flavor>(srcu: &Srcu<F>, idx: usize) -> bool {
        let heavy = srcu.inner.fast;
        srcu.inner.counters.drained(idx, || {
            crate::barriers::a(heavy);
        })
    }

    /// An empty read section of `srcu` without the per-thread section
    /// tracking (`held.rs`): `read_lock`'s counter update and the guard's
    /// drop's, nothing else. What the tracking costs is the difference
    /// from `drop(srcu.read_lock())` (`bench-report`'s reference row).
    #[inline(always)]
    pub fn untracked_section<F: Flavor>(srcu: &Srcu<F>) {
        srcu.read_unlock(srcu.read_lock_ticket());
    }

    /// Sections of `srcu` begun so far, summed over every counter slot and
    /// both indices (wrapping; exact when no section is being entered).
    pub fn sections_begun<F: Flavor>(srcu: &Srcu<F>) -> usize {
        srcu.inner.counters.locks_total()
    }

    /// The index new readers use now.
    pub fn current_index<F: Flavor>(srcu: &Srcu<F>) -> usize {
        srcu.inner.counters.current_idx()
    }

    /// Callers blocked on another caller's grace period, and whether one
    /// is being driven.
    pub fn waiters<F: Flavor>(srcu: &Srcu<F>) -> (u32, bool) {
        srcu.inner.waiters()
    }

    /// Makes the next `n` `membarrier(PRIVATE_EXPEDITED)` calls of the
    /// process fail as if a seccomp filter returned `EPERM` (fault
    /// injection for the tests of the fallback barrier).
    pub fn inject_membarrier_failures(n: u64) {
        #[cfg(all(target_os = "linux", not(loom)))]
        crate::membarrier::INJECT_FAILURES.store(n, core::sync::atomic::Ordering::Relaxed);
        #[cfg(not(all(target_os = "linux", not(loom))))]
        let _ = n;
    }

    /// The physical floor of the fast flavor's read section: the two bare
    /// per-CPU rseq increments that `read_lock` and the guard's drop make
    /// (the current CPU's lock word, then its unlock word), with exactly
    /// the crate's sequence, on a private counter array, and nothing around
    /// them (no index load, no mode check, no section tracking, no guard).
    /// For bench-report's `read_rseq_pair_floor_ns`.
    pub struct RseqPairFloor(crate::percpu::PairFloor);

    impl RseqPairFloor {
        /// `None` where the crate does not count with rseq.
        pub fn new() -> Option<RseqPairFloor> {
            crate::percpu::PairFloor::new().map(RseqPairFloor)
        }

        /// One pair of increments.
        #[inline(always)]
        pub fn pair(&self) {
            self.0.pair();
        }

        /// The increments made so far, summed over the CPUs.
        pub fn total(&self) -> u64 {
            self.0.total()
        }
    }

    /// One bare `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the call a
    /// fast grace period makes three of (bench-report's physical floor).
    /// False if the process could not register for it or the call failed.
    pub fn bare_membarrier() -> bool {
        crate::membarrier::register() && crate::membarrier::bare()
    }

    /// True if both indices are balanced (no lost increment).
    pub fn balanced<F: Flavor>(srcu: &Srcu<F>) -> bool {
        srcu.readers() == 0
    }
}
