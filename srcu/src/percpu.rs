//! The per-CPU counters and the two ways of bumping them.
//!
//! One cache-padded [`Slot`] per possible CPU, plus [`NR_SHARED`] extra
//! slots. Each holds `lock[2]` and `unlock[2]`; a read section increments
//! `lock[idx]` of some slot on entry and `unlock[idx]` of some (maybe
//! another) slot on exit, so only sums mean anything: index `idx` has no
//! readers exactly when `Σ unlock[idx] == Σ lock[idx]` (wrapping), read in
//! that order with barrier A between.
//!
//! Who writes what (this is what keeps non-locked adds from losing updates):
//!
//! | path | per-CPU slots `[0, nr_cpus)` | shared slots |
//! |---|---|---|
//! | [`CounterPath::Rseq`] | rseq adds on the current CPU's slot (fast flavor: both counters; classic: `unlock`), `lock add` on `lock` (classic) | atomic RMW by threads whose rseq area is unusable |
//! | [`CounterPath::Atomic`] | atomic RMW on a hinted slot | atomic RMW on a hinted slot |
//!
//! So an rseq-written word is never written by an atomic RMW, and vice
//! versa. The path is chosen once per domain, at creation.

use crate::flavor::CounterPath;
use crate::rseq::{self, RseqOffset};
use crate::sync::{fence, AtomicUsize};
use core::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
use crossbeam_utils::CachePadded;

/// Extra slots written only with atomic RMWs.
/// (Under loom none: fewer atomics keep the models small.)
pub(crate) const NR_SHARED: usize = if cfg!(loom) { 0 } else { 4 };

/// One CPU's counters.
#[repr(C)]
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) lock: [AtomicUsize; 2],
    pub(crate) unlock: [AtomicUsize; 2],
}

const LOCK_OFFSET: usize = 0;
const UNLOCK_OFFSET: usize = 2 * core::mem::size_of::<usize>();

// The rseq sequence computes `base + cpu << 7`.
#[cfg(all(target_arch = "x86_64", not(loom)))]
const _: () = assert!(core::mem::size_of::<CachePadded<Slot>>() == 128);

/// All counters of one domain.
pub(crate) struct Counters {
    slots: Box<[CachePadded<Slot>]>,
    nr_cpus: u32,
    path: CounterPath,
    rseq: Option<RseqOffset>,
}

impl Counters {
    pub(crate) fn new(force_atomic: bool) -> Self {
        Self::with_cpus(possible_cpus(), force_atomic)
    }

    pub(crate) fn with_cpus(nr_cpus: usize, force_atomic: bool) -> Self {
        let nr_cpus = nr_cpus.clamp(1, u32::MAX as usize / 2);
        let rseq = if force_atomic { None } else { rseq::detect() };
        let slots = (0..nr_cpus + NR_SHARED)
            .map(|_| CachePadded::new(Slot::default()))
            .collect();
        Counters {
            slots,
            nr_cpus: nr_cpus as u32,
            path: if rseq.is_some() {
                CounterPath::Rseq
            } else {
                CounterPath::Atomic
            },
            rseq,
        }
    }

    pub(crate) fn path(&self) -> CounterPath {
        self.path
    }

    /// Presets every counter (wrap-around tests).
    pub(crate) fn preset(&self, value: usize) {
        for s in self.slots.iter() {
            for i in 0..2 {
                s.lock[i].store(value, Relaxed);
                s.unlock[i].store(value, Relaxed);
            }
        }
    }

    #[inline(always)]
    fn field_base(&self, offset: usize) -> *mut u64 {
        // Pointer arithmetic only; dereferenced by the rseq sequence.
        (self.slots.as_ptr() as *mut u8).wrapping_add(offset) as *mut u64
    }

    /// A slot for an atomic RMW: the current CPU's if known, else a
    /// per-thread hash. Any slot is correct; this only spreads contention.
    #[inline]
    fn atomic_slot(&self) -> &Slot {
        if self.rseq.is_some() {
            // Threads whose rseq area works never reach here for
            // rseq-written words; the others use the shared slots.
            return &self.slots[self.nr_cpus as usize + thread_hint() % NR_SHARED.max(1)];
        }
        let n = self.slots.len();
        &self.slots[thread_hint() % n]
    }

    /// `read_lock`'s increment followed by barrier B (classic), or with B
    /// as a compiler barrier only (`fast`, whose partner is membarrier).
    ///
    /// The inlined fast path covers the rseq path; everything else is in
    /// the out-of-line [`Counters::inc_lock_slow`].
    #[inline(always)]
    pub(crate) fn inc_lock(&self, idx: usize, fast: bool) {
        debug_assert!(idx < 2);
        if let Some(rseq) = self.rseq {
            if fast || cfg!(srcu_teeth = "b") {
                let base = self.field_base(LOCK_OFFSET + idx * core::mem::size_of::<usize>());
                // SAFETY: `rseq` came from `detect`; `base + c * 128` for
                // `c < nr_cpus` is `slots[c].lock[idx]`, written only by
                // this sequence on the rseq path (table above).
                if unsafe { rseq::percpu_inc(rseq, base, self.nr_cpus) } {
                    return;
                }
            } else {
                // Classic: a locked add on this CPU's slot (atomic, so a
                // migration in between is harmless); it is barrier B.
                let cpu = rseq::cpu_id(rseq);
                if cpu < self.nr_cpus {
                    // SAFETY: `cpu < nr_cpus <= slots.len()`.
                    let slot = unsafe { self.slots.get_unchecked(cpu as usize) };
                    Self::atomic_inc_lock_full(slot, idx);
                    return;
                }
            }
        }
        self.inc_lock_slow(idx, fast);
    }

    /// Atomic path, or a CPU number beyond the per-CPU slots.
    #[cold]
    #[inline(never)]
    fn inc_lock_slow(&self, idx: usize, fast: bool) {
        let slot = self.atomic_slot();
        if fast {
            // B: compiler barrier only; the grace period's membarrier is
            // its partner.
            slot.lock[idx].fetch_add(1, Relaxed);
            core::sync::atomic::compiler_fence(SeqCst);
        } else {
            Self::atomic_inc_lock_full(slot, idx);
        }
    }

    /// Increment plus barrier B (full), paired with A and E.
    #[inline(always)]
    fn atomic_inc_lock_full(slot: &Slot, idx: usize) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        {
            if cfg!(srcu_teeth = "b") {
                slot.lock[idx].fetch_add(1, Relaxed);
                return;
            }
            // SAFETY: the pointer comes from a live `AtomicUsize`.
            unsafe { rseq::locked_inc(slot.lock[idx].as_ptr() as *mut u64) };
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        {
            slot.lock[idx].fetch_add(1, Relaxed);
            if !cfg!(srcu_teeth = "b") {
                fence(SeqCst); // B: pairs with A and E.
            }
        }
    }

    /// `read_unlock`'s barrier C and increment.
    #[inline(always)]
    pub(crate) fn inc_unlock(&self, idx: usize) {
        debug_assert!(idx < 2);
        if let Some(rseq) = self.rseq {
            let base = self.field_base(UNLOCK_OFFSET + idx * core::mem::size_of::<usize>());
            // C: the asm is a compiler barrier and x86_64 stores are
            // releases (classic); in the fast flavor membarrier in A/D is
            // the partner.
            // SAFETY: as in `inc_lock`; `unlock[idx]` words of per-CPU
            // slots are written only by this sequence on the rseq path.
            if unsafe { rseq::percpu_inc(rseq, base, self.nr_cpus) } {
                return;
            }
        }
        self.inc_unlock_slow(idx);
    }

    #[cold]
    #[inline(never)]
    fn inc_unlock_slow(&self, idx: usize) {
        // C: release, paired with the acquire that fence A gives the
        // updater's relaxed sum (see barriers.rs).
        let order = if cfg!(srcu_teeth = "c") {
            Relaxed
        } else {
            Release
        };
        self.atomic_slot().unlock[idx].fetch_add(1, order);
    }

    fn sum(&self, pick: impl Fn(&Slot) -> &AtomicUsize) -> usize {
        self.slots
            .iter()
            .fold(0usize, |acc, s| acc.wrapping_add(pick(s).load(Relaxed)))
    }

    /// True if no reader is inside a section that used `idx`: sum the
    /// unlocks, barrier A (`barrier_a`), sum the locks, compare. Wrapping
    /// arithmetic, so counters may overflow freely.
    pub(crate) fn drained(&self, idx: usize, barrier_a: impl FnOnce()) -> bool {
        let unlocks = self.sum(|s| &s.unlock[idx]);
        barrier_a(); // A: pairs with B and C.
        let locks = self.sum(|s| &s.lock[idx]);
        locks == unlocks
    }

    /// A hint only: the same sums without barrier A. "Not drained" means
    /// "poll again later"; "drained" must be confirmed by [`drained`]
    /// (`Counters::drained`) before anything relies on it. Relaxed loads
    /// of the same words eventually see the latest increments (coherence),
    /// so a drained index is eventually peeked as drained. Under loom it
    /// always says "drained", so the models check every real scan.
    pub(crate) fn peek_drained(&self, idx: usize) -> bool {
        if cfg!(loom) {
            return true;
        }
        let unlocks = self.sum(|s| &s.unlock[idx]);
        let locks = self.sum(|s| &s.lock[idx]);
        locks == unlocks
    }

    /// Readers inside sections of `idx`, approximately (for stall reports).
    pub(crate) fn readers(&self, idx: usize) -> usize {
        let unlocks = self.sum(|s| &s.unlock[idx]);
        fence(SeqCst);
        let locks = self.sum(|s| &s.lock[idx]);
        locks.wrapping_sub(unlocks)
    }
}

/// A per-thread number for hashing threads onto slots.
#[inline(always)]
fn thread_hint() -> usize {
    #[cfg(not(loom))]
    {
        use std::cell::Cell;
        std::thread_local!(static HINT: Cell<usize> = const { Cell::new(usize::MAX) });
        HINT.with(|h| {
            let v = h.get();
            if v != usize::MAX {
                return v;
            }
            let v = first_hint();
            h.set(v);
            v
        })
    }
    #[cfg(loom)]
    {
        loom::thread_local!(static HINT: usize = next_loom_hint());
        HINT.with(|h| *h)
    }
}

#[cfg(loom)]
fn next_loom_hint() -> usize {
    // Deterministic per execution (loom replays schedules): the digits of
    // the loom thread id, so threads spread over the slots.
    let id = format!("{:?}", loom::thread::current().id());
    id.bytes()
        .filter(u8::is_ascii_digit)
        .fold(0usize, |a, b| a * 10 + (b - b'0') as usize)
}

#[cfg(not(loom))]
#[cold]
fn first_hint() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu >= 0 {
        return cpu as usize;
    }
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, Relaxed)
}

/// Number of possible CPUs (not just online ones: CPUs can come online).
pub(crate) fn possible_cpus() -> usize {
    #[cfg(loom)]
    {
        2
    }
    #[cfg(not(loom))]
    {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        if n > 0 {
            n as usize
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}
