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
//! | [`CounterPath::Rseq`] | rseq adds on the current CPU's slot (fast flavor with membarrier: both counters; classic and fast without membarrier: `unlock`), `lock add` on `lock` (classic, fast without membarrier) | atomic RMW (threads whose rseq area is unusable, CPUs beyond the slots) |
//! | [`CounterPath::Atomic`] | atomic RMW on a hinted slot | atomic RMW on a hinted slot |
//!
//! So an rseq-written word is never written by an atomic RMW, and vice
//! versa. The path is chosen once per domain, at creation, together with
//! the flavor's barrier B, as one [`ReadMode`] byte.
//!
//! # The read fast path, instruction by instruction
//!
//! `read_lock` loads the index as the address of its counter words
//! (`cur`, the kernel's `srcu_ctrp`: no index arithmetic), makes one test
//! of the mode (of the rseq offset it loads anyway: an rseq mode? which
//! one is the sequence's bound, [`ReadConsts`]), then the counter update;
//! everything else is out of
//! line (`inc_lock_slow`, `inc_unlock_slow`). The rseq sequence leaves
//! through an `asm goto` to the fallback and reads its bound with its
//! compare, and `read_lock` hands the guard a [`ReadTicket`] with all that
//! its drop needs, so the drop reloads nothing, not even the domain's
//! address (only its slow path needs the domain), and tests nothing
//! before its sequence: a section on the atomic path carries its thread's
//! stand-in rseq area ([`rseq::stand_in`]), whose `cpu_id` sends the
//! sequence to the fallback. Section tracking (`held.rs`, for the exact
//! self-deadlock check) is one `fs`-relative increment on each side, to
//! two different words.
//!
//! The domain's constant read-side fields (rseq offset, bound, mode,
//! tracking slot) are read from the handle's own copy ([`ReadConsts`]),
//! so that only the index is behind the handle's pointer to the shared
//! state, and the bound's address is the handle's.
//!
//! `drop(srcu.read_lock())` of a fast domain as the non-inlined function
//! of `examples/fastpath_asm.rs` (x86_64, rustc 1.95, release), 34
//! instructions run, 23 without the wrapper's prologue and epilogue (it
//! was 35 and 24, 40 and 29, and 55 and 48 before that; the classic
//! flavor's is 32 and 21, was 33 and 22, and 40 and 29):
//!
//! ```text
//! push r15 / r14 / r12 / rbx / rax   ; prologue of the wrapper
//! mov   r14,[rdi+0x10]               ; inner = srcu.inner
//! mov   rbx,[r14+0x30]               ; words = counters.cur (the index)
//! mov   rcx,[rdi+0x8]                ; rseq offset: the handle's copy
//! test  rcx,rcx                      ; THE mode test (an rseq mode?
//! je    slow_lock                    ;   which one: the bound, below)
//! lea   rax,[rip+rseq_cs_1]          ; COUNTER UPDATE 1 (rseq):
//! mov   fs:[rcx+0x8],rax             ;   arm rseq_cs
//! mov   eax,fs:[rcx+0x4]             ;   cpu_id
//! cmp   eax,[rdi]                    ;   < lock_bound? (the handle's
//! jae   slow_lock                    ;   first word, 0 unless fenceless)
//! shl   rax,0x7                      ;   * 128
//! add   qword [rbx+rax],0x1          ;   commit: this CPU's lock[idx]
//! movzx r15d,byte [rdi+0x4]          ; TRACKING: the domain's slot
//! mov   r12,0xfffffffffffff7c0       ;   (TLS offset of the counts)
//! inc   dword fs:[r12+r15*8]         ;   entered += 1
//! lea   rax,[rip+rseq_cs_2]          ; COUNTER UPDATE 2 (rseq), with the
//! mov   fs:[rcx+0x8],rax             ;   ticket's area, bound and words,
//! mov   eax,fs:[rcx+0x4]             ;   and no test of the path first
//! cmp   eax,[rdi]                    ;   (an atomic section's area is
//! jae   slow_unlock                  ;   its thread's stand-in: jae)
//! shl   rax,0x7
//! add   qword [rbx+rax+0x10],0x1     ;   commit: this CPU's unlock[idx]
//! inc   dword fs:[r12+r15*8+0x4]     ; TRACKING: left += 1
//! add rsp / pop rbx / r12 / r14 / r15; ret
//! ```
//!
//! 14 of the 23 are the two counter updates, exactly the sequence
//! `__private::RseqPairFloor::pair` runs (the floor); 4 are the tracking.
//! Inlined into `bench-report`'s timing loops the section is 22
//! instructions per iteration on one thread (the floor's loop: 18; it was
//! 25) and 23 on two (the floor's: 20; it was 28, with the closure's
//! environment spilled to the stack for want of registers). There the
//! domain is the first field of its struct (`benches/src/read.rs`): the
//! bound's address is then the struct's own.
//!
//! What matters more than the count is the chain of dependent loads
//! before the first commit: the floor's is its rseq offset, then `cpu_id`
//! through it. With the offset read through the handle's pointer to the
//! shared state, the section's chain was one load longer; that is hidden
//! while the core overlaps consecutive sections, and not when both
//! hyperthreads of a core run (two readers, or another tenant on the
//! sibling). Alternating `bench-report --quick` runs of the two builds on
//! a 2-vCPU KVM guest (Xeon, 2.1 GHz), 3 each: fast section at two threads
//! 1.53, 1.82, 1.61x the floor before, 1.27, 1.31, 1.35x after; at one
//! thread the figures move with the host's phase either way (1.0-1.6x).
//!
//! Where the time goes depends on the core. `fastpath_asm parts` times
//! the floor, the section without its tracking
//! (`__private::untracked_section`) and the real section in rotation, each
//! loop reloading the domain's fields every iteration as a caller with one
//! section per VM exit does (minimum of 30 batches). On a 2-vCPU AMD EPYC
//! (Zen 3) guest, three runs: the floor 1.76-1.81 ns; fast without tracking
//! 1.12-1.15x the floor (the index load and the mode test); fast 1.44-1.47x;
//! classic without tracking 1.19-1.20x; classic 1.36-1.39x. There each
//! store a section adds costs about 0.3 ns, whatever it stores (the
//! tracking's two increments cost the same as two plain stores to the
//! same words), so the tracking's two stores add 0.3x the floor to the
//! fast section, which already stores four times (two `rseq_cs` arms, two
//! commits), and less to classic's, whose locked add costs there about
//! what fast's lock-side sequence does: on that core the classic section
//! is no slower than the fast one. Exact tracking needs a store on each
//! side (guards may be dropped in any order, so neither side can restore
//! a value the other saved); it stays, for the self-deadlock check and
//! [`crate::Srcu::in_read_section`].
//!
//! Valgrind implements no rseq, so under callgrind the counters take the
//! atomic path: `drop(read_lock())` there costs 127 instructions (fast)
//! and 125 (classic) per section (120 and 118 before the handle's copy of
//! the constants; 2 of the 7 are the call of the empty `#[cold]` function
//! on the lock side's out-of-line path that keeps the rseq path's layout
//! straight), most of them `thread_hint` and its
//! modulo in `atomic_slot` (callgrind, `fastpath_asm calls 100000`,
//! inclusive cost of the wrapper per call; was 118 and 115, and 109 and
//! 108 before that: the stand-in's address and the unlock's sequence,
//! which now runs up to its compare there too, cost a few).

use crate::flavor::CounterPath;
use crate::rseq::{self, RseqOffset};
use crate::sync::{fence, AtomicPtr, AtomicUsize};
use core::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
use crossbeam_utils::CachePadded;

/// Marks the path that calls it as unlikely, for block placement:
/// `core::hint::cold_path`, which is stable only from Rust 1.95, above this
/// crate's minimum. A call to a `#[cold]` function says the same to the
/// compiler; this one is empty and runs only on the lock side's
/// out-of-line path (where the sequence's `asm goto` exit and the mode test
/// meet; without it the compiler laid that path between the commit and the
/// code after it, a taken jump a section).
#[cold]
#[inline(never)]
fn cold_path() {}

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

/// Everything the end of a read section needs that is not in a register
/// anyway, computed by `read_lock` and carried in its guard, so the
/// guard's drop reloads nothing from the domain (the rseq asm is a
/// compiler barrier: any field read before it would be loaded again after
/// it; the bound is read by the sequence's compare itself):
///
/// * `words`: the address of `slots[0].lock[idx]` (the kernel's
///   `srcu_read_lock_fast` returns the same: its `srcu_ctrp`). CPU `c`'s
///   lock word is at `+ c * 128`, its unlock word `UNLOCK_OFFSET` further,
///   which the sequence folds into its `add`: no index arithmetic at
///   unlock.
/// * `rseq`: the rseq area the unlock's sequence runs with. On the rseq
///   path the domain's (glibc's, the same in every thread); on the atomic
///   path the calling thread's [`rseq::stand_in`], whose `cpu_id` is above
///   every bound. So the unlock is the sequence with no test of the path
///   before it: an atomic section always leaves through its out-of-range
///   exit, having written only the stand-in's `rseq_cs`.
///
/// Made only in this module, by [`Counters::inc_lock`] and
/// [`Counters::ticket`], from the counters it is later used with (the
/// guard keeps the domain and its ticket together), and on the thread
/// that ends the section: a [`crate::ReadGuard`] is `!Send`, and a
/// section that changes threads gets a new ticket there
/// ([`crate::SendableReadGuard`]). `words` is only ever dereferenced by
/// the rseq sequence, inside the domain's `slots` (which outlive every
/// guard), and only on the rseq path.
#[derive(Clone, Copy)]
pub(crate) struct ReadTicket {
    words: *mut u64,
    rseq: RseqOffset,
    /// The address of the bound the sequence's compare reads: the handle's
    /// `lock_bound` ([`ReadConsts`]) for a ticket made by `read_lock` (0 in
    /// the modes whose unlock then retries out of line, or takes the
    /// atomic path), the counters' `nr_cpus` for one made by
    /// [`Counters::ticket`].
    nr_cpus: *const u32,
    /// The domain's slot in the per-thread section counts (`held.rs`).
    pub(crate) held_slot: u8,
}

// `ReadTicket` is neither `Send` nor `Sync` (its raw pointers see to
// that): on the atomic path it carries its thread's stand-in rseq area, an
// offset valid on that thread only, so the compiler keeps it there. A
// section that changes threads gets a new ticket on the new thread
// (`crate::SendableReadGuard`).

// The sequence's displacements are the fields' offsets.
#[cfg(not(loom))]
const _: () = assert!(
    core::mem::offset_of!(Slot, lock) == LOCK_OFFSET
        && core::mem::offset_of!(Slot, unlock) == UNLOCK_OFFSET
);

// The rseq sequence computes `base + cpu << 7`.
#[cfg(all(target_arch = "x86_64", not(loom)))]
const _: () = assert!(core::mem::size_of::<CachePadded<Slot>>() == 128);

/// How a domain's readers update the counters: whether the rseq path is
/// usable and whether barrier B is a fence, decided once at creation. The
/// read side's fast paths do not read it: it is folded into the handle's
/// [`ReadConsts`] (its rseq offset and lock-side bound); the out-of-line
/// paths and `Srcu::counter_path` do.
///
/// Bit 0: B is a fence (classic, or fast without membarrier). Bit 1: the
/// atomic path (no rseq).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Fast flavor with membarrier: both counters by rseq adds, no fence.
    RseqFenceless = 0,
    /// Lock word by a `lock add` on the current CPU's slot (it is barrier
    /// B), unlock word by an rseq add.
    RseqFenced = 1,
    /// Atomic RMWs; B is a compiler barrier (membarrier is its partner).
    AtomicFenceless = 2,
    /// Atomic RMWs; B is a full barrier.
    AtomicFenced = 3,
}

impl ReadMode {
    const ATOMIC: u8 = 2;

    #[inline(always)]
    fn is_rseq(self) -> bool {
        self as u8 & Self::ATOMIC == 0
    }
}

/// What `read_lock` needs from the domain besides the index: copies of
/// the constant read-side fields of its [`Counters`], kept in every handle
/// ([`crate::Srcu`]) rather than only behind its pointer to the shared
/// state.
///
/// Why: the rseq sequence's critical path is a chain of dependent loads
/// (the rseq offset, then `cpu_id` through it, then the counter's add).
/// Read from the shared state, the offset is one load further (the
/// handle's pointer first). That costs nothing while the core overlaps
/// consecutive sections, and about half the floor's time when it cannot,
/// with both hyperthreads of a core busy (two readers, or another tenant
/// on the sibling): two threads in `bench-report` ran their sections at
/// 1.5-1.8x the floor, 1.27-1.35x with the copies here (module docs). The
/// index itself is shared (the flip changes it) and stays behind the
/// handle's pointer.
///
/// The values never change while the handle lives (`held_slot` changes
/// only at the handle's drop), so the copies are exact, and the mode
/// needs no byte of its own: it is folded into `rseq` and `lock_bound`
/// (below), which the fast path loads anyway, so that its one test of the
/// mode is a test of a register. Every [`ReadTicket`] made by `read_lock`
/// points at the handle's `lock_bound`; the guard that carries it borrows
/// the handle (and `__private::untracked_section` ends its ticket's
/// section within the same borrow). `lock_bound` comes first, and these
/// constants first in the handle (both `repr(C)`), so that the address the
/// sequence's compare reads is the handle's own: no instruction computes
/// it.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct ReadConsts {
    /// The bound of the lock side's fast path: `nr_cpus` if the domain's
    /// mode is its flavor's fast one ([`ReadMode::RseqFenceless`] for the
    /// fast flavor, [`ReadMode::RseqFenced`] for classic), else 0, which
    /// sends every lock to the out-of-line path through the sequence's own
    /// compare (after it armed `rseq_cs` of a real rseq area: harmless).
    lock_bound: u32,
    held_slot: u8,
    /// glibc's rseq offset in the rseq modes; 0 (never a valid offset:
    /// the thread control block is there) in the atomic ones, which the
    /// fast path tests before anything reaches `fs`.
    rseq: RseqOffset,
}

// The compare's address is the handle's own only if the bound is the
// first word (see `Srcu`'s field order too, in `domain.rs`).
const _: () = assert!(core::mem::offset_of!(ReadConsts, lock_bound) == 0);

/// All counters of one domain.
pub(crate) struct Counters {
    /// `srcu_idx` as the readers see it: the address of
    /// `slots[0].lock[idx]` for the index `idx` new readers use (the
    /// kernel's `srcu_ctrp`), so `read_lock` loads its counter words with
    /// one instruction. Only the driver of the grace period writes it
    /// ([`Counters::flip_to`], between barriers E and D).
    cur: AtomicPtr<u64>,
    /// Read by the out-of-line paths (`read_lock`'s fast path reads the
    /// handle's [`ReadConsts`], into which it is folded).
    mode: ReadMode,
    /// The number of per-CPU slots (the shared ones follow them); the bound
    /// of the sequences of tickets made by [`Counters::ticket`] and of the
    /// out-of-line unlock's retry (`read_lock`'s tickets carry the handle's
    /// copy, [`ReadConsts::lock_bound`]).
    nr_cpus: u32,
    /// Meaningful only when `mode.is_rseq()` (then it came from `detect`).
    /// Otherwise 0, a placeholder that must never reach a sequence
    /// (`fs:[8]` is glibc's `dtv`): tickets get it only through
    /// [`Counters::ticket_rseq`] or a branch on an rseq mode, and the
    /// handle's copy ([`ReadConsts`]) is that branch: its 0 is the atomic
    /// modes' mark.
    rseq: RseqOffset,
    /// The domain's slot in `held.rs`, handed to each guard in its ticket
    /// (fixed while the handle lives; see `Inner::held_slot`).
    held_slot: u8,
    /// `nr_cpus` per-CPU slots, then `NR_SHARED` shared ones.
    slots: Box<[CachePadded<Slot>]>,
}

impl Counters {
    /// `fenceless`: readers execute no barrier B (fast flavor whose process
    /// registered with membarrier). `held_slot`: the domain's tracking
    /// slot (`held.rs`).
    pub(crate) fn new(force_atomic: bool, fenceless: bool, held_slot: u8) -> Self {
        Self::with_cpus(possible_cpus(), force_atomic, fenceless, held_slot)
    }

    pub(crate) fn with_cpus(
        nr_cpus: usize,
        force_atomic: bool,
        fenceless: bool,
        held_slot: u8,
    ) -> Self {
        let nr_cpus = nr_cpus.clamp(1, u32::MAX as usize / 2);
        let rseq = if force_atomic { None } else { rseq::detect() };
        let slots = (0..nr_cpus + NR_SHARED)
            .map(|_| CachePadded::new(Slot::default()))
            .collect();
        let mode = match (rseq.is_some(), fenceless) {
            (true, true) => ReadMode::RseqFenceless,
            (true, false) => ReadMode::RseqFenced,
            (false, true) => ReadMode::AtomicFenceless,
            (false, false) => ReadMode::AtomicFenced,
        };
        let mut c = Counters {
            cur: AtomicPtr::new(core::ptr::null_mut()),
            mode,
            nr_cpus: nr_cpus as u32,
            rseq: rseq.unwrap_or(RseqOffset(0)),
            held_slot,
            slots,
        };
        // The slots are on the heap: the address stays when `c` moves.
        c.cur = AtomicPtr::new(c.words(0));
        c
    }

    /// The copies a handle of flavor `fast_flavor` keeps (see
    /// [`ReadConsts`]).
    pub(crate) fn read_consts(&self, fast_flavor: bool) -> ReadConsts {
        let fast_mode = if fast_flavor {
            ReadMode::RseqFenceless
        } else {
            ReadMode::RseqFenced
        };
        ReadConsts {
            lock_bound: if self.mode == fast_mode {
                self.nr_cpus
            } else {
                0
            },
            held_slot: self.held_slot,
            // 0 in the atomic modes (`with_cpus`).
            rseq: self.rseq,
        }
    }

    /// The counter words new readers use (relaxed: pairs with barriers D
    /// and E around the flip; a reader that loads the old words is covered
    /// by the grace period's first scan).
    #[inline(always)]
    fn current_words(&self) -> *mut u64 {
        self.cur.load(Relaxed)
    }

    /// The index new readers use.
    pub(crate) fn current_idx(&self) -> usize {
        self.words_idx(self.current_words())
    }

    /// Makes new readers use index `idx` (the flip). Only the driver of the
    /// grace period calls it, between barriers E and D.
    pub(crate) fn flip_to(&self, idx: usize) {
        self.cur.store(self.words(idx & 1), Relaxed);
    }

    pub(crate) fn path(&self) -> CounterPath {
        if self.mode.is_rseq() {
            CounterPath::Rseq
        } else {
            CounterPath::Atomic
        }
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

    /// The counter words of index `idx` (`slots[0].lock[idx]`).
    #[inline(always)]
    fn words(&self, idx: usize) -> *mut u64 {
        debug_assert!(idx < 2);
        self.field_base(LOCK_OFFSET + idx * core::mem::size_of::<AtomicUsize>())
    }

    /// The rseq area for the tickets of this thread: the domain's on the
    /// rseq path, else this thread's stand-in (see [`ReadTicket`]).
    #[inline]
    fn ticket_rseq(&self) -> RseqOffset {
        if self.mode.is_rseq() {
            debug_assert_ne!(self.rseq.0, 0, "an rseq mode has glibc's offset");
            self.rseq
        } else {
            rseq::stand_in()
        }
    }

    /// The ticket of a section of index `idx`, for the calling thread (for
    /// a section that changes threads: [`crate::SendableReadGuard`]).
    #[inline]
    pub(crate) fn ticket(&self, idx: usize) -> ReadTicket {
        ReadTicket {
            words: self.words(idx & 1),
            rseq: self.ticket_rseq(),
            nr_cpus: &raw const self.nr_cpus,
            held_slot: self.held_slot,
        }
    }

    /// The index of a section (the inverse of [`Counters::ticket`]).
    #[inline]
    pub(crate) fn ticket_idx(&self, t: ReadTicket) -> usize {
        self.words_idx(t.words)
    }

    /// The index of counter words.
    #[inline]
    fn words_idx(&self, words: *mut u64) -> usize {
        let off = words.addr().wrapping_sub(self.slots.as_ptr().addr());
        // `& 1` also tells the compiler the index is in bounds.
        ((off - LOCK_OFFSET) / core::mem::size_of::<AtomicUsize>()) & 1
    }

    /// A slot for an atomic RMW: the current CPU's if known, else a
    /// per-thread hash. Any slot is correct; this only spreads contention.
    #[inline]
    fn atomic_slot(&self) -> &Slot {
        if self.mode.is_rseq() {
            // Threads whose rseq area works never reach here for
            // rseq-written words; the others use the shared slots.
            return &self.slots[self.nr_cpus as usize + thread_hint() % NR_SHARED.max(1)];
        }
        let n = self.slots.len();
        &self.slots[thread_hint() % n]
    }

    /// `read_lock`: loads the current counter words (the index), makes the
    /// increment followed by barrier B: a full barrier (classic;
    /// `fast_flavor` is the compile-time `F::FAST`), or a compiler barrier
    /// only (fast flavor in [`ReadMode::RseqFenceless`], whose partner is
    /// membarrier).
    ///
    /// Inlined: one test of the mode (a nonzero rseq offset; the bound
    /// tells the rest), then the flavor's counter update on the rseq path. Everything else (the atomic path, a CPU beyond the
    /// per-CPU slots, a fast domain without membarrier) is the out-of-line
    /// [`Counters::inc_lock_slow`]. Returns the section's ticket.
    ///
    /// `read` is the copy of this domain's constants in the caller's
    /// handle ([`Counters::read_consts`]), which must outlive the ticket
    /// (it points at its `lock_bound`). `counters` finds these counters again
    /// for the out-of-line path only (the caller passes `||
    /// &srcu.inner.counters`): handed `&self`, the compiler computed its
    /// address on the inlined path too, one instruction per section that
    /// only the slow path uses.
    #[inline(always)]
    pub(crate) fn inc_lock<'a>(
        &self,
        read: &ReadConsts,
        fast_flavor: bool,
        counters: impl FnOnce() -> &'a Counters,
    ) -> ReadTicket {
        debug_assert!(read.lock_bound == self.nr_cpus || read.lock_bound == 0);
        debug_assert_eq!(read.rseq.0 != 0, self.mode.is_rseq());
        // Loaded once, before the asm (a compiler barrier), and kept in
        // registers for the ticket. Pairs with barriers D and E around the
        // flip (see `current_words`).
        let words = self.current_words();
        let rseq = read.rseq;
        // An address, not a load: the sequence's compare reads the bound.
        let lock_bound = &raw const read.lock_bound;
        // The ticket's bound is the handle's `lock_bound` on every path, so
        // that no instruction chooses it: `nr_cpus` wherever the lock side
        // runs the sequence, and 0 in the atomic modes (whose tickets carry
        // the stand-in area: the unlock goes out of line anyway) and in a
        // fast domain without membarrier (whose unlock then retries its
        // sequence out of line, with the counters' own bound).
        let rseq = 'rseq: {
            // THE mode test: an rseq mode. (Which one: `lock_bound`.)
            if rseq.0 != 0 {
                if fast_flavor {
                    // SAFETY: a nonzero `rseq` came from `detect`;
                    // `lock_bound` is a field of the handle; it is 0
                    // unless the mode is `RseqFenceless`, and then `words
                    // + c * 128` for `c < lock_bound` (= `nr_cpus`) is
                    // `slots[c].lock[idx]`, written only by this sequence
                    // in this mode (table above).
                    if unsafe { rseq::percpu_inc::<LOCK_OFFSET>(rseq, words, lock_bound) } {
                        break 'rseq rseq;
                    }
                } else if cfg!(srcu_teeth = "b") {
                    // Teeth: B removed, the lock word by the (fenceless)
                    // rseq add. Only the teeth builds write it this way.
                    // SAFETY: as above (`lock_bound` is `nr_cpus` in
                    // `RseqFenced`, classic's only rseq mode); in this
                    // build the per-CPU lock words are written only by
                    // this sequence.
                    if unsafe { rseq::percpu_inc::<LOCK_OFFSET>(rseq, words, lock_bound) } {
                        break 'rseq rseq;
                    }
                } else {
                    // Classic (whose only rseq mode is `RseqFenced`): a
                    // locked add on this CPU's slot (atomic, so a
                    // migration in between is harmless); it is barrier B.
                    // Below 2^32: compared as a `u32` (against the bound
                    // in memory), used as a `usize` (see `cpu_id`).
                    let cpu = rseq::cpu_id(rseq);
                    if (cpu as u32) < read.lock_bound {
                        // `words + cpu * 128` is `slots[cpu].lock[idx]`.
                        #[cfg(all(target_arch = "x86_64", not(loom)))]
                        // SAFETY: `cpu < nr_cpus <= slots.len()` and
                        // `words` is `slots[0].lock[idx]`, so the address
                        // is that of a live `AtomicUsize`.
                        unsafe {
                            rseq::locked_inc_at(words, cpu << 7)
                        };
                        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
                        {
                            // SAFETY: `cpu < nr_cpus <= slots.len()`.
                            let slot = unsafe { self.slots.get_unchecked(cpu) };
                            Self::atomic_inc_lock_full(slot, self.words_idx(words));
                        }
                        break 'rseq rseq;
                    }
                }
            }
            // Out of line and out of the way: without the hint the
            // compiler may lay this call between the sequence's commit and
            // the code after it, which then costs a taken jump a section.
            cold_path();
            counters().inc_lock_slow(words)
        };
        ReadTicket {
            words,
            rseq,
            nr_cpus: lock_bound,
            held_slot: read.held_slot,
        }
    }

    /// Everything but the inlined paths of [`Counters::inc_lock`]: the
    /// atomic path, a CPU number beyond the per-CPU slots, and a fast
    /// domain in [`ReadMode::RseqFenced`] (no membarrier). Returns the rseq
    /// area for the section's ticket (see [`ReadTicket`]).
    #[cold]
    #[inline(never)]
    fn inc_lock_slow(&self, words: *mut u64) -> RseqOffset {
        let idx = self.words_idx(words);
        if self.mode == ReadMode::AtomicFenced {
            Self::atomic_inc_lock_full(self.atomic_slot(), idx);
            return rseq::stand_in();
        }
        if self.mode == ReadMode::RseqFenced {
            // A fast domain without membarrier arrives here directly; a
            // classic one only with a CPU beyond the slots.
            let cpu = rseq::cpu_id(self.rseq);
            let slot = if cpu < self.nr_cpus as usize {
                // SAFETY: `cpu < nr_cpus <= slots.len()`.
                unsafe { self.slots.get_unchecked(cpu) }
            } else {
                self.atomic_slot()
            };
            Self::atomic_inc_lock_full(slot, idx);
            return self.rseq;
        }
        // Fenceless: B is a compiler barrier only; the grace period's
        // membarrier is its partner.
        self.atomic_slot().lock[idx].fetch_add(1, Relaxed);
        core::sync::atomic::compiler_fence(SeqCst);
        // The stand-in on the atomic path; the domain's area when
        // RseqFenceless, on a CPU beyond the slots.
        self.ticket_rseq()
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

    /// `read_unlock`'s barrier C and increment: the rseq add on the
    /// section's unlock word, with the area its ticket carries, and no
    /// test of the path first: on the atomic path the area is the thread's
    /// stand-in, whose `cpu_id` sends the sequence to its out-of-range
    /// exit, like a CPU beyond the slots. Both go to the out-of-line
    /// atomic path, the only user of the domain: `counters` finds it (the
    /// caller passes `|| &srcu.inner.counters`), so that the fast path does
    /// not load the domain's address again after `read_lock`'s asm (a
    /// compiler barrier).
    #[inline(always)]
    pub(crate) fn inc_unlock<'a>(t: ReadTicket, counters: impl FnOnce() -> &'a Counters) {
        // C: the asm is a compiler barrier and x86_64 stores are releases
        // (classic); in the fast flavor membarrier in A/D is the partner.
        // SAFETY: `t` was made from the counters `counters` returns (the
        // guard, or `__private::untracked_section` within one borrow of
        // the handle, keeps them together), which outlive it, on this thread
        // (`ReadTicket`). Either the mode is rseq
        // and `t.rseq` came from `detect`: then `t.words + c * 128 +
        // UNLOCK_OFFSET` for `c < nr_cpus` is `slots[c].unlock[idx]`, and
        // those words of per-CPU slots are written only by this sequence
        // on the rseq path (table above). Or the mode is atomic and
        // `t.rseq` is this thread's `stand_in`: its `cpu_id` (`u32::MAX`)
        // is not below `nr_cpus` (at most `u32::MAX / 2`), so the sequence
        // writes nothing but the stand-in's `rseq_cs`. `t.nr_cpus` is the
        // address of a bound at most `nr_cpus` of those counters: their own
        // `nr_cpus`, or the `lock_bound` of the handle that the guard
        // borrows (`nr_cpus` or 0).
        if unsafe { rseq::percpu_inc::<UNLOCK_OFFSET>(t.rseq, t.words, t.nr_cpus) } {
            return;
        }
        counters().inc_unlock_slow(t.words);
    }

    /// The end of a section whose sequence took its out-of-line exit: on
    /// the rseq path, once more with these counters' own bound (a ticket
    /// made by `read_lock` carries the handle's `lock_bound`, which is 0 in
    /// a fast domain without membarrier, whose unlock words are still
    /// per-CPU rseq words); else, or on a CPU beyond the slots, an atomic
    /// add on a shared slot.
    #[cold]
    #[inline(never)]
    fn inc_unlock_slow(&self, words: *mut u64) {
        if self.mode.is_rseq() {
            // C: as in `inc_unlock` (the same sequence).
            // SAFETY: in an rseq mode `self.rseq` came from `detect`, and
            // `words` is `slots[0].lock[idx]` of these counters (the
            // ticket was made from them), so `words + c * 128 +
            // UNLOCK_OFFSET` for `c < nr_cpus` is `slots[c].unlock[idx]`,
            // written only by this sequence in the rseq modes (table
            // above).
            if unsafe {
                rseq::percpu_inc::<UNLOCK_OFFSET>(self.rseq, words, &raw const self.nr_cpus)
            } {
                return;
            }
        }
        let idx = self.words_idx(words);
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
    /// "poll again later"; "drained" must be confirmed by
    /// [`drained`](Counters::drained) before anything relies on it. Relaxed loads
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

    /// Sections begun so far on both indices (the lock words' sum,
    /// wrapping; for tests).
    pub(crate) fn locks_total(&self) -> usize {
        self.sum(|s| &s.lock[0])
            .wrapping_add(self.sum(|s| &s.lock[1]))
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

/// The two bare per-CPU increments of a fast read section (`lock[0]` then
/// `unlock[0]` of the current CPU's slot, with exactly the sequence
/// [`Counters::inc_lock`] and [`Counters::inc_unlock`] use) on a private
/// array, and nothing around them: the floor that the fast flavor's
/// `read_lock` + drop is measured against. On a CPU beyond the slots it
/// takes the atomic fallback, as srcu does.
pub(crate) struct PairFloor(Counters);

impl PairFloor {
    /// A private counter array; `None` where srcu would not count with
    /// rseq (no glibc rseq registration), so there is no floor to measure.
    pub(crate) fn new() -> Option<PairFloor> {
        let c = Counters::new(false, true, crate::held::UNTRACKED);
        c.mode.is_rseq().then_some(PairFloor(c))
    }

    /// One pair: `lock[0]` then `unlock[0]` of the current CPU's slot.
    #[inline(always)]
    pub(crate) fn pair(&self) {
        let c = &self.0;
        let (rseq, nr_cpus, words) = (c.rseq, &raw const c.nr_cpus, c.words(0));
        // SAFETY: as in `Counters::inc_lock` (`c` is in rseq mode, so
        // `c.rseq` came from `detect`); the fallback writes only a shared
        // slot.
        if !unsafe { rseq::percpu_inc::<LOCK_OFFSET>(rseq, words, nr_cpus) } {
            c.slots[c.nr_cpus as usize].lock[0].fetch_add(1, Relaxed);
        }
        // SAFETY: as above, for the `unlock[0]` words.
        if !unsafe { rseq::percpu_inc::<UNLOCK_OFFSET>(rseq, words, nr_cpus) } {
            c.slots[c.nr_cpus as usize].unlock[0].fetch_add(1, Relaxed);
        }
    }

    /// Every increment made so far (a lost one would show here).
    pub(crate) fn total(&self) -> u64 {
        self.0
            .slots
            .iter()
            .map(|s| {
                s.lock[0]
                    .load(Relaxed)
                    .wrapping_add(s.unlock[0].load(Relaxed)) as u64
            })
            .fold(0u64, u64::wrapping_add)
    }
}
