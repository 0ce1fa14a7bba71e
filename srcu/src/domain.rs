//! [`Srcu`]: one domain, its options, and the read-side entry point.

use crate::callbacks::Callbacks;
use crate::flavor::{Classic, CounterPath, Fast, Flavor, ReaderMode};
use crate::grace_period::GracePeriods;
use crate::guard::ReadGuard;
use crate::percpu::{Counters, ReadConsts, ReadTicket};
use crate::stall::{StallHook, StallReport};
use crate::sync::Arc;
use core::marker::PhantomData;
use core::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// The shared state of a domain. The handle ([`Srcu`]), the callback worker
/// and every [`crate::SrcuCell`] of the domain point at it.
pub(crate) struct Inner {
    /// Readers execute no fence; grace periods use membarrier.
    pub(crate) fast: bool,
    pub(crate) counters: Counters,
    pub(crate) gp: GracePeriods,
    pub(crate) cbs: Callbacks,
    pub(crate) stall_timeout: Duration,
    pub(crate) stall_hook: StallHook,
    /// This domain's slot in the per-thread section counts (`held.rs`);
    /// set to "untracked" when the handle is dropped and the slot freed
    /// (cells may keep `Inner` alive; no section can exist then).
    /// (Read sections use the plain copy in `counters`, which their
    /// tickets carry: it is fixed while the handle lives, since only the
    /// handle's drop changes this, when no section can exist.)
    held_slot: core::sync::atomic::AtomicU8,
    pub(crate) stats: crate::stats::Stats,
}

impl Inner {
    /// Identity of the domain, for checking that guards and cells match.
    #[inline(always)]
    pub(crate) fn id(&self) -> usize {
        self as *const Inner as usize
    }

    /// The tracking slot of `held.rs`. Relaxed: written once at creation
    /// (published with the `Arc`) and once at the handle's drop, when no
    /// section exists.
    #[inline(always)]
    pub(crate) fn held_slot(&self) -> u8 {
        self.held_slot.load(Relaxed)
    }
}

/// A sleepable-RCU domain.
///
/// Readers call [`read_lock`](Srcu::read_lock) and hold the returned
/// [`ReadGuard`] for as long as they use SRCU-protected data, sleeping or
/// blocking inside if they like. Updaters unpublish an object and then call
/// [`synchronize`](Srcu::synchronize) (blocking) or
/// [`call_srcu`](Srcu::call_srcu) (deferred) before freeing it: both wait
/// for every read section that began before them. Independent domains never
/// wait for each other's readers.
///
/// `F` picks the flavor: [`Classic`] (default) or [`Fast`]; see [`Flavor`]
/// for when to pick which.
///
/// ```
/// use srcu::Srcu;
/// let srcu = Srcu::new();
/// {
///     let _g = srcu.read_lock();
///     // ... read SRCU-protected data; may sleep ...
/// }
/// srcu.synchronize(); // no reader from before this line remains
/// ```
///
/// Dropping the domain waits one grace period if callbacks are pending and
/// runs them all: nothing queued with `call_srcu` is lost.
#[repr(C)]
pub struct Srcu<F: Flavor = Classic> {
    /// Copies of the counters' constant read-side fields, in the handle
    /// itself, first (see [`ReadConsts`]).
    read: ReadConsts,
    pub(crate) inner: Arc<Inner>,
    _flavor: PhantomData<F>,
}

/// Options for a domain; from [`Srcu::builder`].
#[must_use]
pub struct Builder<F: Flavor = Classic> {
    force_atomic: bool,
    nr_cpus: Option<usize>,
    preset: Option<usize>,
    stall_timeout: Duration,
    stall_hook: Option<StallHook>,
    _flavor: PhantomData<F>,
}

impl<F: Flavor> Builder<F> {
    /// Use atomic read-modify-writes for the counters even where rseq is
    /// available (the fallback path; for tests and for comparison).
    pub fn force_atomic_counters(mut self, yes: bool) -> Self {
        self.force_atomic = yes;
        self
    }

    /// The number of per-CPU slots (default: the number of possible CPUs).
    /// Threads on CPUs numbered at or above it use the shared slots.
    pub fn cpu_slots(mut self, n: usize) -> Self {
        self.nr_cpus = Some(n.max(1));
        self
    }

    /// Starts every counter at `value` instead of 0, to test wrap-around
    /// (e.g. `usize::MAX - 10`).
    pub fn preset_counters(mut self, value: usize) -> Self {
        self.preset = Some(value);
        self
    }

    /// How long a grace period may wait before the stall hook fires
    /// (default 10 s). The hook fires once per grace period.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Replaces the stall hook (default: one line on stderr).
    ///
    /// The hook runs on the thread that drives the stalled grace period:
    /// often the caller of `synchronize`, but it may be another caller
    /// waiting for the same grace period, or the callback worker (which
    /// drives grace periods that callers want and deferred frees need). A
    /// panic in the hook unwinds that thread, restores the grace-period
    /// state, and reaches the callers only if they are that thread.
    pub fn on_stall(mut self, hook: impl Fn(&StallReport) + Send + Sync + 'static) -> Self {
        self.stall_hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Creates the domain: allocates the per-CPU slots, and for the fast
    /// flavor registers the process with membarrier (once per process).
    pub fn build(self) -> Srcu<F> {
        let fast = F::FAST && crate::membarrier::register();
        let held_slot = crate::held::alloc_slot();
        let counters = match self.nr_cpus {
            Some(n) => Counters::with_cpus(n, self.force_atomic, fast, held_slot),
            None => Counters::new(self.force_atomic, fast, held_slot),
        };
        if let Some(v) = self.preset {
            counters.preset(v);
        }
        let read = counters.read_consts(F::FAST);
        let srcu = Srcu {
            read,
            inner: Arc::new(Inner {
                fast,
                counters,
                gp: GracePeriods::new(),
                cbs: Callbacks::new(),
                stall_timeout: self.stall_timeout,
                stall_hook: self.stall_hook.unwrap_or_else(crate::stall::default_hook),
                held_slot: core::sync::atomic::AtomicU8::new(held_slot),
                stats: crate::stats::Stats::default(),
            }),
            _flavor: PhantomData,
        };
        crate::fork::watch(&srcu.inner);
        srcu
    }
}

// `read_lock`'s bound is at the handle's own address (`ReadConsts`).
const _: () = assert!(core::mem::offset_of!(Srcu<Classic>, read) == 0);
const _: () = assert!(core::mem::offset_of!(Srcu<Fast>, read) == 0);

impl Srcu<Classic> {
    /// A classic-flavor domain with default options.
    pub fn new() -> Self {
        Self::builder().build()
    }
}

impl Srcu<Fast> {
    /// A fast-flavor domain with default options. Falls back to the classic
    /// barriers if membarrier is unavailable; [`Srcu::reader_mode`] says
    /// which is active.
    pub fn new_fast() -> Self {
        Self::builder().build()
    }
}

impl<F: Flavor> Default for Srcu<F> {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl<F: Flavor> Srcu<F> {
    /// Options for a new domain of flavor `F`.
    pub fn builder() -> Builder<F> {
        Builder {
            force_atomic: false,
            nr_cpus: None,
            preset: None,
            stall_timeout: Duration::from_secs(10),
            stall_hook: None,
            _flavor: PhantomData,
        }
    }

    /// Enters a read section; dropping the guard leaves it.
    ///
    /// Never blocks, allocates or makes a system call. Sections nest. The
    /// guard is `!Send`; a section moves to another thread through
    /// [`ReadGuard::into_sendable`].
    ///
    /// Ordering: in the classic flavor, every access after `read_lock` is
    /// ordered after it by a full barrier (B). In the fast flavor there is
    /// no fence; the grace period's membarrier provides the same guarantee
    /// to the updater. Use [`ReadGuard::mb_after_read_lock`] if the section
    /// must also be ordered after plain accesses that came before it.
    #[inline]
    pub fn read_lock(&self) -> ReadGuard<'_, F> {
        ReadGuard::new(self, self.read_lock_ticket())
    }

    /// `read_lock`'s counter update, without the section tracking that
    /// [`ReadGuard::new`] adds. The ticket points into this handle and
    /// into its counters: it must end its section through
    /// [`read_unlock`](Srcu::read_unlock) of this handle, on this thread,
    /// while this borrow lasts (a [`ReadGuard`] does all three; so does
    /// `__private::untracked_section`), or the section never ends.
    #[inline(always)]
    pub(crate) fn read_lock_ticket(&self) -> ReadTicket {
        // The index (its counter words, relaxed: pairs with barriers D and
        // E around the flip; a reader that reads a stale index is covered
        // by the grace period's first scan), one test of the domain's read
        // mode, then the counter update; the fast flavor's bound also
        // covers "membarrier unavailable" (`ReadConsts`).
        self.inner
            .counters
            .inc_lock(&self.read, F::FAST, || &self.inner.counters)
    }

    /// Leaves a read section with the ticket its `read_lock` returned (the
    /// guard's drop). The domain's address is loaded only on the slow
    /// path (see `Counters::inc_unlock`).
    #[inline(always)]
    pub(crate) fn read_unlock(&self, ticket: ReadTicket) {
        Counters::inc_unlock(ticket, || &self.inner.counters);
    }

    /// Which barriers readers execute: [`ReaderMode::Membarrier`] for a fast
    /// domain whose process could register with membarrier, otherwise
    /// [`ReaderMode::FullBarrier`].
    pub fn reader_mode(&self) -> ReaderMode {
        if self.inner.fast {
            ReaderMode::Membarrier
        } else {
            ReaderMode::FullBarrier
        }
    }

    /// How the counters are bumped: rseq on this CPU's slot, or atomics.
    pub fn counter_path(&self) -> CounterPath {
        self.inner.counters.path()
    }

    /// True if the calling thread is inside a read section of this domain
    /// (holds a [`ReadGuard`] of it). Exact for the first 255 domains alive
    /// at once (a per-thread counter per domain, kept in release builds
    /// too); beyond that, always false. A section converted with
    /// [`ReadGuard::into_sendable`] counts on no thread until adopted.
    ///
    /// `synchronize`, `synchronize_expedited`, `barrier` and
    /// `Stale::synchronize` panic when this is true (they would wait for
    /// the caller itself); callers that would rather fail softly, such as
    /// kvm-bus's `unregister_dev`, check it first.
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// assert!(!srcu.in_read_section());
    /// let g = srcu.read_lock();
    /// assert!(srcu.in_read_section());
    /// drop(g);
    /// assert!(!srcu.in_read_section());
    /// ```
    pub fn in_read_section(&self) -> bool {
        crate::held::depth(self.inner.held_slot()) != 0
    }

    /// Number of read sections in progress (approximate while readers come
    /// and go; exact when quiescent). For diagnostics and tests.
    pub fn readers(&self) -> usize {
        let c = &self.inner.counters;
        c.readers(0).wrapping_add(c.readers(1))
    }
}

// A panic anywhere (a stall hook, a callback, a failing system call, a
// reader's section) leaves the domain consistent: grace-period and callback
// state are restored on unwind (grace_period.rs, callbacks.rs) and a guard
// ends its section when dropped during unwinding. So a `&Srcu` may cross a
// `catch_unwind` boundary.
impl<F: Flavor> std::panic::RefUnwindSafe for Srcu<F> {}
impl<F: Flavor> std::panic::UnwindSafe for Srcu<F> {}

impl<F: Flavor> core::fmt::Debug for Srcu<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Srcu")
            .field("flavor", &F::NAME)
            .field("reader_mode", &self.reader_mode())
            .field("counter_path", &self.counter_path())
            .field("completed_grace_periods", &self.inner.gp.completed())
            .finish()
    }
}

impl<F: Flavor> Drop for Srcu<F> {
    fn drop(&mut self) {
        // No guard can outlive the handle (guards borrow it), so after the
        // worker has drained the queue nothing can be left waiting.
        self.inner.cbs.shutdown(&self.inner);
        // No guard can outlive the handle, so no thread counts a section in
        // this slot any more, unless a guard was leaked (`mem::forget`):
        // then some thread's count for the slot stays up for good, and a
        // later domain given the slot would see a section it does not have.
        // A leaked section also shows in the counters; such a slot is
        // retired instead of reused.
        let slot = self.inner.held_slot.swap(crate::held::UNTRACKED, Relaxed);
        if self.readers() == 0 {
            crate::held::free_slot(slot);
        }
    }
}
