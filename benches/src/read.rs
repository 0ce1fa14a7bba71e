//! Section 1: read sections of `srcu` and of the primitives a VMM author
//! would pick instead.
//!
//! Every peer implements [`ReadPeer`]; [`for_each_peer`] hands each one to
//! a [`ReadVisitor`], so the criterion bench and the report measure exactly
//! the same code (monomorphised, no dynamic dispatch in the timed loop).

use crossbeam_epoch as epoch;
use srcu::{Classic, Fast, Flavor, Srcu, SrcuCell, UpdateLock};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

pub use floor::RseqPairFloor;

/// A read-side primitive under test.
pub trait ReadPeer: Sync {
    /// Key used in JSON (`read_<KEY>_ns`) and benchmark ids.
    const KEY: &'static str;
    /// Human-readable name for tables.
    const LABEL: &'static str;
    /// Enter and leave an empty read section.
    fn lock_unlock(&self);
    /// Enter, load the protected `u64` through the primitive, leave.
    fn lock_deref_unlock(&self) -> u64;
}

/// Receives every peer in turn.
pub trait ReadVisitor {
    /// Called once per peer.
    fn visit<P: ReadPeer>(&mut self, peer: &P);
}

/// `srcu` of flavor `F` with an [`SrcuCell`] holding the value.
///
/// The domain comes first (`repr(C)`): `read_lock`'s sequence compares
/// against a bound at the start of the handle, which is then the peer's
/// own address, so the compiler spends no instruction (and, in the
/// two-thread loop, no register) computing it. (Fields drop in order, the
/// domain first; the cell's drop frees its value directly and needs no
/// grace period.)
#[repr(C)]
pub struct SrcuPeer<F: Flavor> {
    srcu: Srcu<F>,
    cell: SrcuCell<u64>,
    _lock: UpdateLock,
}

impl<F: Flavor> SrcuPeer<F> {
    /// A domain of flavor `F` and a cell holding 42.
    pub fn new() -> Self {
        let srcu = Srcu::<F>::builder().build();
        let lock = UpdateLock::new(());
        let cell = SrcuCell::new(&srcu, &lock, Some(42));
        SrcuPeer {
            cell,
            _lock: lock,
            srcu,
        }
    }

    /// The domain (for reporting its reader mode and counter path).
    pub fn srcu(&self) -> &Srcu<F> {
        &self.srcu
    }
}

impl<F: Flavor> Default for SrcuPeer<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadPeer for SrcuPeer<Classic> {
    const KEY: &'static str = "srcu";
    const LABEL: &'static str = "srcu classic";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.srcu.read_lock());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        let g = self.srcu.read_lock();
        *self.cell.dereference(&g).unwrap()
    }
}

impl ReadPeer for SrcuPeer<Fast> {
    const KEY: &'static str = "srcu_fast";
    const LABEL: &'static str = "srcu fast";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.srcu.read_lock());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        let g = self.srcu.read_lock();
        *self.cell.dereference(&g).unwrap()
    }
}

/// `parking_lot::RwLock<u64>`, read side.
pub struct ParkingLotRwLock(parking_lot::RwLock<u64>);

impl ReadPeer for ParkingLotRwLock {
    const KEY: &'static str = "parking_lot_rwlock";
    const LABEL: &'static str = "parking_lot::RwLock read";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.0.read());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        *self.0.read()
    }
}

/// `std::sync::RwLock<u64>`, read side.
pub struct StdRwLock(std::sync::RwLock<u64>);

impl ReadPeer for StdRwLock {
    const KEY: &'static str = "std_rwlock";
    const LABEL: &'static str = "std::sync::RwLock read";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.0.read().unwrap());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        *self.0.read().unwrap()
    }
}

/// `parking_lot::Mutex<u64>`.
pub struct ParkingLotMutex(parking_lot::Mutex<u64>);

impl ReadPeer for ParkingLotMutex {
    const KEY: &'static str = "parking_lot_mutex";
    const LABEL: &'static str = "parking_lot::Mutex";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.0.lock());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        *self.0.lock()
    }
}

/// `crossbeam_epoch::pin` and an `Atomic<u64>` loaded under the guard.
pub struct CrossbeamEpoch(epoch::Atomic<u64>);

impl ReadPeer for CrossbeamEpoch {
    const KEY: &'static str = "crossbeam_epoch";
    const LABEL: &'static str = "crossbeam_epoch::pin";
    #[inline]
    fn lock_unlock(&self) {
        drop(epoch::pin());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        let g = epoch::pin();
        let p = self.0.load(Ordering::Acquire, &g);
        // SAFETY: the pointer was created from an `Owned` in `for_each_peer`
        // and is never replaced or freed while `self` lives.
        unsafe { *p.deref() }
    }
}

impl Drop for CrossbeamEpoch {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no thread holds a reference; the pointer came
        // from `Owned::new` and is freed exactly once, here.
        unsafe {
            drop(
                self.0
                    .swap(
                        epoch::Shared::null(),
                        Ordering::Relaxed,
                        epoch::unprotected(),
                    )
                    .into_owned(),
            )
        };
    }
}

/// `(ref)` srcu fast's section without its per-thread section tracking
/// (`srcu::__private::untracked_section`): between the floor and the real
/// section, it shows what the tracking (two thread-local increments, for
/// the exact self-deadlock check and `Srcu::in_read_section`) costs, and
/// what the rest of `read_lock` (index load, mode test) does.
#[repr(transparent)]
pub struct UntrackedFastPeer(SrcuPeer<Fast>);

impl ReadPeer for UntrackedFastPeer {
    const KEY: &'static str = "srcu_fast_untracked";
    const LABEL: &'static str = "(ref) srcu fast without section tracking";
    #[inline]
    fn lock_unlock(&self) {
        srcu::__private::untracked_section(self.0.srcu());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        // No guard to dereference with: the section around a load, as the
        // floor's.
        srcu::__private::untracked_section(self.0.srcu());
        black_box(42)
    }
}

/// `arc_swap::ArcSwap<u64>::load`.
pub struct ArcSwapPeer(arc_swap::ArcSwap<u64>);

impl ReadPeer for ArcSwapPeer {
    const KEY: &'static str = "arc_swap";
    const LABEL: &'static str = "arc_swap::ArcSwap::load";
    #[inline]
    fn lock_unlock(&self) {
        drop(self.0.load());
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        **self.0.load()
    }
}

/// Reference point from issue 6: two lock-prefixed atomic adds on one
/// shared word (the floor of any design that counts readers in one place).
pub struct LockedAddPair(AtomicU64);

impl ReadPeer for LockedAddPair {
    const KEY: &'static str = "locked_add_pair";
    const LABEL: &'static str = "(ref) 2 locked adds, shared word";
    #[inline]
    fn lock_unlock(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.0.fetch_add(1, Ordering::Release);
    }
    #[inline]
    fn lock_deref_unlock(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst);
        let v = black_box(42);
        self.0.fetch_add(1, Ordering::Release);
        v
    }
}

/// Hands every peer to `v`, srcu classic first (the baseline of ratios).
/// The rseq floor ([`RseqPairFloor`]) comes right after srcu fast, when the
/// C library registers rseq for its threads, then srcu fast without its
/// section tracking ([`UntrackedFastPeer`]).
pub fn for_each_peer(v: &mut impl ReadVisitor) {
    v.visit(&SrcuPeer::<Classic>::new());
    v.visit(&SrcuPeer::<Fast>::new());
    if let Some(floor) = RseqPairFloor::new() {
        v.visit(&floor);
    }
    v.visit(&UntrackedFastPeer(SrcuPeer::new()));
    v.visit(&ParkingLotRwLock(parking_lot::RwLock::new(42)));
    v.visit(&StdRwLock(std::sync::RwLock::new(42)));
    v.visit(&ParkingLotMutex(parking_lot::Mutex::new(42)));
    v.visit(&CrossbeamEpoch(epoch::Atomic::new(42)));
    v.visit(&ArcSwapPeer(arc_swap::ArcSwap::from_pointee(42)));
    v.visit(&LockedAddPair(AtomicU64::new(0)));
}

/// Which read operation to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOp {
    /// Enter and leave an empty section.
    LockUnlock,
    /// Enter, dereference, leave.
    LockDerefUnlock,
}

impl ReadOp {
    /// Both operations.
    pub const ALL: [ReadOp; 2] = [ReadOp::LockUnlock, ReadOp::LockDerefUnlock];

    /// Short name for ids.
    pub fn name(self) -> &'static str {
        match self {
            ReadOp::LockUnlock => "lock_unlock",
            ReadOp::LockDerefUnlock => "lock_deref_unlock",
        }
    }
}

/// Runs `op` of `peer` once (the body of every timed loop).
#[inline(always)]
pub fn run_op<P: ReadPeer>(peer: &P, op: ReadOp) {
    match op {
        ReadOp::LockUnlock => peer.lock_unlock(),
        ReadOp::LockDerefUnlock => {
            black_box(peer.lock_deref_unlock());
        }
    }
}

/// Thread-CPU ns per `op` on one thread, one batch of `iters`.
#[inline(never)]
pub fn one_thread_ns<P: ReadPeer>(peer: &P, op: ReadOp, iters: u64) -> f64 {
    match op {
        ReadOp::LockUnlock => crate::harness::ns_per_op(iters, || peer.lock_unlock()),
        ReadOp::LockDerefUnlock => crate::harness::ns_per_op(iters, || {
            black_box(peer.lock_deref_unlock());
        }),
    }
}

/// Per-thread wall-clock ns per `op` with `threads` threads on the same
/// peer for `dur`, and how much of it they were on a CPU.
pub fn threads_ns<P: ReadPeer>(
    peer: &P,
    op: ReadOp,
    threads: usize,
    dur: std::time::Duration,
) -> crate::harness::Concurrent {
    match op {
        ReadOp::LockUnlock => crate::harness::concurrent_for(threads, dur, || peer.lock_unlock()),
        ReadOp::LockDerefUnlock => crate::harness::concurrent_for(threads, dur, || {
            black_box(peer.lock_deref_unlock());
        }),
    }
}

/// The physical floor of the fast flavor's read section: the two bare rseq
/// per-CPU increments `read_lock` and the guard's drop perform (the lock
/// word, then the unlock word, of the current CPU's slot), and nothing
/// around them: no index load, no held-section bookkeeping, no guard. It is
/// srcu's own sequence (`srcu::__private::RseqPairFloor`), not a copy.
mod floor {
    use super::ReadPeer;
    use std::hint::black_box;

    /// `(ref)` peer: two rseq per-CPU adds per section.
    pub struct RseqPairFloor(srcu::__private::RseqPairFloor);

    impl RseqPairFloor {
        /// `None` unless glibc registers rseq for its threads (then srcu
        /// also counts with rseq).
        pub fn new() -> Option<Self> {
            srcu::__private::RseqPairFloor::new().map(RseqPairFloor)
        }

        /// Sum of every word (what the increments added up to).
        pub fn total(&self) -> u64 {
            self.0.total()
        }
    }

    impl ReadPeer for RseqPairFloor {
        const KEY: &'static str = "rseq_pair_floor";
        const LABEL: &'static str = "(ref) 2 bare rseq per-CPU adds (srcu fast's sequence)";
        #[inline]
        fn lock_unlock(&self) {
            self.0.pair();
        }
        #[inline]
        fn lock_deref_unlock(&self) -> u64 {
            // The floor has no dereference: the pair around a load.
            self.0.pair();
            black_box(42)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every increment lands exactly once, also with threads preempting
        /// each other (the restart is armed).
        #[test]
        fn floor_counts_exactly() {
            let Some(f) = RseqPairFloor::new() else {
                eprintln!("no rseq registration: floor not measured");
                return;
            };
            let base = f.total();
            let per = 200_000u64;
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..per {
                            f.lock_unlock();
                        }
                    });
                }
            });
            assert_eq!(f.total() - base, 4 * 2 * per);
        }
    }
}
