//! Which domains the current thread is reading: the check that turns a
//! self-deadlock (`synchronize` or `barrier` from inside a read section of
//! the same domain) into a clear panic, in release builds too, and the
//! query [`crate::Srcu::in_read_section`] that callers such as kvm-bus use
//! to refuse a blocking update before changing anything.
//!
//! # How it stays exact and cheap
//!
//! Every live domain takes a *tracking slot* `0..TRACKED` from a global
//! allocator when it is created and gives it back when it is dropped. Each
//! thread has an array of `TRACKED + 1` pairs of counters (sections
//! entered, sections left) in a constant-initialised, destructor-free
//! thread-local (so it is usable in thread-local destructors too, and costs
//! one `fs`-relative add on x86_64): `read_lock` adds one to its domain's
//! `entered`, the guard's drop adds one to its `left`. A thread is inside a
//! section of domain `d` exactly when the two counters of `d`'s slot differ
//! (the difference, wrapping, is the number of open sections).
//!
//! * A [`crate::ReadGuard`] is `!Send`: it is counted on the thread that
//!   holds it, so the answer is exact. To move a section to another thread,
//!   [`crate::ReadGuard::into_sendable`] uncounts it here and returns a
//!   [`crate::SendableReadGuard`], which the receiving thread
//!   [`adopt`](crate::SendableReadGuard::adopt)s (counted there) before it
//!   can read through it.
//! * A [`crate::SendableReadGuard`] in flight is counted on no thread: a
//!   thread that holds one without adopting it and calls `synchronize`
//!   waits for itself, and only the stall hook reports it.
//! * More than `TRACKED` domains alive at once: the extra ones share the
//!   last slot, which is never consulted (no false positives); for them the
//!   check is off and the stall hook is the only report.

#[cfg(not(loom))]
mod imp {
    use std::cell::Cell;
    use std::sync::Mutex;

    /// Domains tracked exactly at the same time.
    pub(crate) const TRACKED: usize = 255;

    /// The slot of domains beyond `TRACKED`: counted (so the hot path needs
    /// no branch) but never consulted.
    pub(crate) const UNTRACKED: u8 = TRACKED as u8;

    /// One domain's sections on this thread: entered and left, counted
    /// apart (wrapping) so that `read_lock` and the drop each increment
    /// their own word. A single depth word that `read_lock` increments and
    /// the drop decrements chains the two read-modify-writes of every
    /// section through store forwarding, which made the tracking the
    /// slowest part of a fast read section; split, each word sees one
    /// increment per section, like the domain's own lock/unlock counters.
    #[repr(C)]
    struct Sections {
        entered: Cell<u32>,
        left: Cell<u32>,
    }

    thread_local! {
        static SECTIONS: [Sections; TRACKED + 1] = const {
            [const {
                Sections {
                    entered: Cell::new(0),
                    left: Cell::new(0),
                }
            }; TRACKED + 1]
        };
    }

    /// Free tracking slots (a stack); `None` until first used.
    static FREE: Mutex<Option<Vec<u8>>> = Mutex::new(None);

    /// A tracking slot for a new domain.
    pub(crate) fn alloc_slot() -> u8 {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        let free = free.get_or_insert_with(|| (0..UNTRACKED).rev().collect());
        free.pop().unwrap_or(UNTRACKED)
    }

    /// Gives the slot of a dropped domain back. No thread can still count
    /// a section in it: guards borrow the domain's handle.
    pub(crate) fn free_slot(slot: u8) {
        if slot != UNTRACKED {
            let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
            free.get_or_insert_with(Vec::new).push(slot);
        }
    }

    /// One more section of the domain with `slot` on this thread.
    #[inline(always)]
    pub(crate) fn enter(slot: u8) {
        SECTIONS.with(|s| {
            let c = &s[slot as usize].entered;
            c.set(c.get().wrapping_add(1));
        });
    }

    /// One section fewer.
    #[inline(always)]
    pub(crate) fn leave(slot: u8) {
        SECTIONS.with(|s| {
            let c = &s[slot as usize].left;
            c.set(c.get().wrapping_add(1));
        });
    }

    /// Sections of the domain with `slot` open on this thread (0 for
    /// untracked domains).
    pub(crate) fn depth(slot: u8) -> u32 {
        if slot == UNTRACKED {
            return 0;
        }
        SECTIONS.with(|s| {
            let s = &s[slot as usize];
            s.entered.get().wrapping_sub(s.left.get())
        })
    }
}

/// Under loom, no tracking (models run many threads per execution and the
/// check is not what they verify).
#[cfg(loom)]
mod imp {
    pub(crate) const UNTRACKED: u8 = 255;
    pub(crate) fn alloc_slot() -> u8 {
        UNTRACKED
    }
    pub(crate) fn free_slot(_slot: u8) {}
    #[inline(always)]
    pub(crate) fn enter(_slot: u8) {}
    #[inline(always)]
    pub(crate) fn leave(_slot: u8) {}
    pub(crate) fn depth(_slot: u8) -> u32 {
        0
    }
}

pub(crate) use imp::{alloc_slot, depth, enter, free_slot, leave, UNTRACKED};

/// Panics if this thread is inside a read section of the domain with
/// `slot`: `what` would wait for that section, i.e. for itself, forever.
#[inline]
pub(crate) fn assert_not_reading(slot: u8, what: &str) {
    let n = depth(slot);
    if n != 0 {
        self_deadlock(what, n);
    }
}

#[cold]
#[inline(never)]
fn self_deadlock(what: &str, n: u32) -> ! {
    panic!(
        "srcu: {what}() called inside a read section of the same domain on this thread \
         ({n} section(s) open); it would wait for itself forever"
    )
}
