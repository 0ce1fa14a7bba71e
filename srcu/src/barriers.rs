//! Every memory barrier of the crate, in one place, lettered as in Linux's
//! `kernel/rcu/srcutree.c`.
//!
//! | letter | where | what it orders | pairs with |
//! |---|---|---|---|
//! | **A** | grace period, [`crate::percpu::Counters::drained`] | the sum of the unlock counters before the sum of the lock counters: if an unlock was counted, its lock is counted too | **B** and **C** (store-buffering pattern: either the GP sees the reader's lock increment, or the reader sees the updater's earlier stores) |
//! | **B** | reader, after the lock increment | the increment before every access of the read section | **A**, **E** |
//! | **C** | reader, before the unlock increment | every access of the read section before the increment | **A**, **D** |
//! | **D** | grace period, after the index flip | the flip before the scan of the old index | **C**: a reader whose unlock the scan missed sees the new index at its next `read_lock` |
//! | **E** | grace period, before the index flip | the scan that found the inactive index drained before the flip | **B** and **C**: a reader that uses the new index cannot have been seen by the earlier scans. Always a *local* fence: the flip is only executed after the A of a scan that found the sums equal (a control dependency on those loads), and that A already was the heavy barrier readers pair with; srcutree.c itself calls E redundant. This is what makes an idle fast grace period cost 3 `membarrier` calls (A, D, A) instead of 4. |
//! | **F** | grace period start | the caller's earlier stores (unpublishing an object) before the first counter scan | **B** (via **A**) |
//! | **G** | grace period end | the counter scans before everything the caller does after `synchronize` returns (freeing) | **C** |
//! | **M** | [`crate::ReadGuard::mb_after_read_lock`] | every access before `read_lock`, even a plain load of guest memory, before every access after it | the updater's store that the reader observed (**P**) |
//! | **P** | [`crate::SrcuCell`] publish (`replace`, `assign`) | initialisation of the new object before the pointer store (release) | **Q** |
//! | **Q** | [`crate::SrcuCell::dereference`] | the pointer load before loads through it (acquire) | **P** |
//!
//! ## How each flavor pays for them
//!
//! * **Classic**. B is a full barrier. On x86_64 the lock increment is a
//!   `lock add`, which *is* a full barrier (Intel SDM vol. 3, 8.2.2: locked
//!   instructions have a total order and are not reordered with loads or
//!   stores), so B costs nothing more; elsewhere it is `fence(SeqCst)` after a
//!   relaxed increment. C is a release: the read section's loads and stores
//!   must become visible before the unlock increment, which is exactly what a
//!   release store provides, and the updater acquires it with fence A (a
//!   relaxed load followed by a `SeqCst` fence synchronises with a release
//!   store it reads from). `tests/loom.rs` checks this weakening. On x86_64
//!   every store is a release, so C is free there. A, D, E, F, G are
//!   `fence(SeqCst)`.
//! * **Fast**. B and C are compiler barriers only (the asm blocks of the
//!   per-CPU increment are opaque to the compiler). Their partners A and D
//!   become `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every
//!   running thread of the process execute a full barrier, promoting the
//!   readers' compiler barriers to full barriers at that instant. If
//!   membarrier is unavailable, a fast domain uses the classic barriers
//!   (see [`crate::Srcu::reader_mode`]). If `membarrier` fails *after*
//!   registration (a seccomp filter installed later), the heavy barrier
//!   falls back to an `mprotect` TLB shootdown, which interrupts the same
//!   CPUs (see `membarrier.rs`). M is a real full fence.
//!
//! Polling for readers does not issue barrier A on every poll: a peek
//! without it decides whether the real check (with A) is worth making, so
//! a reader that holds a section for long costs no `membarrier` per poll
//! (see `grace_period.rs`).
//!
//! ## Proving the tests have teeth
//!
//! `scripts/teeth.sh` builds the crate with `--cfg srcu_teeth="<x>"`, which
//! removes barrier `<x>` (or the membarrier call, or the rseq restart), and
//! shows that loom, the litmus tests or the torture test then fail. Nothing
//! else may set that cfg.

use crate::sync::fence;
use core::sync::atomic::Ordering;

/// Barrier A: between summing the unlock and the lock counters. Returns
/// true if `membarrier` failed and the fallback barrier ran instead.
#[inline]
pub(crate) fn a(heavy: bool) -> bool {
    if cfg!(srcu_teeth = "a") {
        return false;
    }
    gp_full(heavy)
}

/// Barrier D: after the index flip. Returns as [`a`].
#[inline]
pub(crate) fn d(heavy: bool) -> bool {
    if cfg!(srcu_teeth = "d") {
        return false;
    }
    gp_full(heavy)
}

/// Barrier E: before the index flip. A local full fence in both flavors,
/// never a `membarrier`: see the table above (E rides on the A of the scan
/// that found the inactive index drained, which is the last barrier the
/// driver executed).
#[inline]
pub(crate) fn e() {
    if cfg!(srcu_teeth = "e") {
        return;
    }
    fence(Ordering::SeqCst);
}

/// Barriers F and G: grace-period entry and exit. Always a plain full
/// fence: the caller's thread is the one that must be ordered.
#[inline]
pub(crate) fn f_g() {
    fence(Ordering::SeqCst);
}

/// A full barrier on the grace-period side: `membarrier` when readers run
/// without fences (fast flavor), a `SeqCst` fence otherwise. True if the
/// `membarrier` failed and its fallback ran.
#[inline]
fn gp_full(heavy: bool) -> bool {
    if heavy {
        crate::membarrier::heavy_barrier()
    } else {
        fence(Ordering::SeqCst);
        false
    }
}

/// Barrier M (and the generic full barrier of non-x86_64 readers): a full
/// fence executed by the reader.
#[inline(always)]
pub(crate) fn reader_full() {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: a locked `or` of zero into the word at the stack pointer
    // leaves memory unchanged; the stack is this thread's own. A locked
    // instruction is a full barrier on x86_64 and cheaper than `mfence`;
    // the asm block (without `nomem`) is also a compiler barrier.
    unsafe {
        core::arch::asm!("lock or qword ptr [rsp], 0", options(nostack));
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    fence(Ordering::SeqCst);
}
