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
pub struct SrcuPeer<F: Flavor> {
    cell: SrcuCell<u64>,
    _lock: UpdateLock,
    srcu: Srcu<F>,
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
/// C library registers rseq for its threads.
pub fn for_each_peer(v: &mut impl ReadVisitor) {
    v.visit(&SrcuPeer::<Classic>::new());
    v.visit(&SrcuPeer::<Fast>::new());
    if let Some(floor) = RseqPairFloor::new() {
        v.visit(&floor);
    }
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
/// word, then the unlock word, of the current CPU's 128-byte slot), and
/// nothing around them: no index load, no held-section bookkeeping, no
/// guard. A copy of srcu's sequence (`srcu/src/rseq.rs`, `percpu_inc`),
/// because srcu does not export it.
mod floor {
    use super::ReadPeer;
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// One CPU's words, laid out as srcu's `CachePadded<Slot>`: `lock[2]`
    /// at offset 0, `unlock[2]` at 16, 128 bytes per CPU.
    #[repr(C, align(128))]
    #[derive(Default)]
    struct Slot {
        lock: [AtomicU64; 2],
        unlock: [AtomicU64; 2],
    }

    const _: () = assert!(std::mem::size_of::<Slot>() == 128);
    const UNLOCK_OFFSET: usize = 16;

    /// `(ref)` peer: two rseq per-CPU adds per section.
    pub struct RseqPairFloor {
        slots: Box<[Slot]>,
        nr_cpus: u32,
        /// `__rseq_offset`: the thread's rseq area, from the thread pointer.
        rseq_offset: isize,
        /// Increments of threads whose rseq area was unusable (or whose
        /// CPU number was beyond the slots): an atomic add, as srcu does.
        fallback: AtomicU64,
    }

    impl RseqPairFloor {
        /// `None` unless glibc registers rseq for its threads (glibc 2.35+,
        /// x86_64, not disabled by its tunable) and the calling thread's
        /// registration worked: then srcu also counts with rseq.
        pub fn new() -> Option<Self> {
            let rseq_offset = rseq_offset()?;
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            let nr_cpus = (n.max(1) as usize).min(u32::MAX as usize / 2);
            let floor = RseqPairFloor {
                slots: (0..nr_cpus).map(|_| Slot::default()).collect(),
                nr_cpus: nr_cpus as u32,
                rseq_offset,
                fallback: AtomicU64::new(0),
            };
            // Registration can fail per thread (seccomp, a foreign clone);
            // glibc then leaves `cpu_id` at RSEQ_CPU_ID_REGISTRATION_FAILED.
            floor.inc(0);
            (floor.fallback.load(Relaxed) == 0).then_some(floor)
        }

        /// Sum of every word (what the increments added up to).
        pub fn total(&self) -> u64 {
            self.slots
                .iter()
                .flat_map(|s| s.lock.iter().chain(s.unlock.iter()))
                .map(|w| w.load(Relaxed))
                .sum::<u64>()
                + self.fallback.load(Relaxed)
        }

        #[inline(always)]
        fn inc(&self, offset: usize) {
            let base = (self.slots.as_ptr() as *mut u8).wrapping_add(offset) as *mut u64;
            // SAFETY: `rseq_offset` came from glibc and this thread's
            // registration was checked where possible (`new`; a thread
            // whose registration failed has `cpu_id` >= `nr_cpus` and takes
            // the fallback); `base + c * 128` for `c < nr_cpus` is a word
            // of `slots[c]`, written only by this sequence.
            if !unsafe { percpu_inc(self.rseq_offset, base, self.nr_cpus) } {
                self.slow();
            }
        }

        #[cold]
        #[inline(never)]
        fn slow(&self) {
            self.fallback.fetch_add(1, Relaxed);
        }
    }

    impl ReadPeer for RseqPairFloor {
        const KEY: &'static str = "rseq_pair_floor";
        const LABEL: &'static str = "(ref) 2 bare rseq per-CPU adds (srcu fast's sequence)";
        #[inline]
        fn lock_unlock(&self) {
            self.inc(0);
            self.inc(UNLOCK_OFFSET);
        }
        #[inline]
        fn lock_deref_unlock(&self) -> u64 {
            self.inc(0);
            let v = black_box(42);
            self.inc(UNLOCK_OFFSET);
            v
        }
    }

    /// glibc's `__rseq_offset` if it registers an rseq area of at least the
    /// 16 bytes used here for every thread, and the calling thread's
    /// registration worked.
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    fn rseq_offset() -> Option<isize> {
        // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only
        // looks symbols up; null means "not exported" (glibc < 2.35).
        let (size, off) = unsafe {
            (
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
            )
        };
        if size.is_null() || off.is_null() {
            return None;
        }
        // SAFETY: glibc defines `__rseq_size` as `const unsigned int` and
        // `__rseq_offset` as `const ptrdiff_t`, initialised before any user
        // code runs and never changed.
        let (size, off) = unsafe { (*(size as *const u32), *(off as *const isize)) };
        if size < 16 {
            return None;
        }
        let cpu: u32;
        // SAFETY: `off` is glibc's `__rseq_offset`, so `fs:[off + 4]` is
        // the `cpu_id` field of this thread's rseq area (registered, since
        // `__rseq_size` is not 0), which lives as long as the thread.
        unsafe {
            core::arch::asm!(
                "mov {cpu:e}, dword ptr fs:[{off} + 4]",
                off = in(reg) off,
                cpu = out(reg) cpu,
                options(nostack, readonly, preserves_flags),
            );
        }
        (cpu < u32::MAX - 1).then_some(off)
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
    fn rseq_offset() -> Option<isize> {
        None
    }

    /// srcu's `percpu_inc`, verbatim (minus its teeth variants): adds 1 to
    /// the `u64` at `base + cpu * 128`, `cpu` being the CPU the thread runs
    /// on at commit time, as a restartable sequence; `false`, having
    /// written nothing, if `cpu >= nr_cpus`.
    ///
    /// Labels: 2 retry (re-arm `rseq_cs`, which the kernel clears on
    /// abort), 3 the descriptor `struct rseq_cs { u32 version; u32 flags;
    /// u64 start_ip; u64 post_commit_offset; u64 abort_ip; }` (32-byte
    /// aligned, in `__rseq_cs`), 4 start, 5 post-commit, 6 abort handler
    /// (in `__rseq_failure`, preceded by glibc's signature 0x53053053
    /// after three bytes that make it decode as `ud1`), 7 out of range,
    /// 8 done.
    ///
    /// # Safety
    ///
    /// `rseq_offset` must be glibc's `__rseq_offset`; `base + c * 128` must
    /// be valid for writes of a `u64` for every `c < nr_cpus` and written
    /// by nothing but this sequence.
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    #[inline(always)]
    unsafe fn percpu_inc(rseq_offset: isize, base: *mut u64, nr_cpus: u32) -> bool {
        let ok: u32;
        // SAFETY: the caller's contract; the asm writes only this thread's
        // `rseq_cs` field and the counter word of the CPU it commits on.
        unsafe {
            core::arch::asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4f, (5f - 4f), 6f",
                ".popsection",
                "2:",
                "lea rax, [rip + 3b]",
                "mov qword ptr fs:[{off} + 8], rax",
                "4:",
                "mov eax, dword ptr fs:[{off} + 4]",
                "cmp eax, {nr:e}",
                "jae 7f",
                "shl rax, 7",
                "add qword ptr [{base} + rax], 1",
                "5:",
                "mov {ok:e}, 1",
                "jmp 8f",
                ".pushsection __rseq_failure, \"ax\"",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "6:",
                "jmp 2b",
                ".popsection",
                "7:",
                "xor {ok:e}, {ok:e}",
                "8:",
                off = in(reg) rseq_offset,
                base = in(reg) base,
                nr = in(reg) nr_cpus,
                ok = out(reg) ok,
                out("rax") _,
                options(nostack),
            );
        }
        ok != 0
    }

    #[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
    #[inline(always)]
    unsafe fn percpu_inc(_rseq_offset: isize, _base: *mut u64, _nr_cpus: u32) -> bool {
        false
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
