//! [`ReadGuard`]: a read section, ended by drop.

use crate::domain::Srcu;
use crate::flavor::{Classic, Flavor};
use crate::percpu::ReadTicket;
use core::marker::PhantomData;

/// A read section of an [`Srcu`] domain; dropping it calls `read_unlock`.
///
/// References obtained through the guard (from
/// [`SrcuCell::dereference`](crate::SrcuCell::dereference)) borrow it, so
/// they cannot outlive the section:
///
/// ```compile_fail
/// let srcu = srcu::Srcu::new();
/// let lock = srcu::UpdateLock::new(());
/// let cell = srcu::SrcuCell::new(&srcu, &lock, Some(5));
/// let r = {
///     let g = srcu.read_lock();
///     cell.dereference(&g).unwrap()
/// }; // `g` dropped here while `r` still borrows it
/// println!("{r}");
/// ```
///
/// The guard is neither `Send` nor `Sync`: it is counted on the thread
/// that holds it, which is what lets [`Srcu::synchronize`] (and
/// [`Srcu::in_read_section`]) know exactly whether the calling thread is
/// inside a section of the domain. To end a section on another thread,
/// convert it with [`into_sendable`](ReadGuard::into_sendable):
///
/// ```compile_fail
/// let srcu = srcu::Srcu::new();
/// let g = srcu.read_lock();
/// std::thread::scope(|s| { s.spawn(move || drop(g)); }); // ReadGuard is !Send
/// ```
///
/// A panic inside the section ends it during unwinding; the domain stays
/// usable.
#[must_use = "the read section ends when the guard is dropped"]
pub struct ReadGuard<'a, F: Flavor = Classic> {
    srcu: &'a Srcu<F>,
    /// What the drop needs (from `read_lock`): the section's counter
    /// words, the rseq offset and bound, the tracking slot. Carried here
    /// so the drop reloads nothing from the domain.
    ticket: ReadTicket,
    /// `!Send + !Sync`: the section is counted on this thread.
    _here: PhantomData<*const ()>,
}

impl<'a, F: Flavor> ReadGuard<'a, F> {
    /// Wraps a section whose lock increment was just made, counting it on
    /// this thread.
    #[inline(always)]
    pub(crate) fn new(srcu: &'a Srcu<F>, ticket: ReadTicket) -> Self {
        crate::held::enter(ticket.held_slot);
        ReadGuard {
            srcu,
            ticket,
            _here: PhantomData,
        }
    }

    /// Uncounts the section on this thread and returns it in a form that
    /// can be sent to another thread (which must
    /// [`adopt`](SendableReadGuard::adopt) it to read through it, or may
    /// simply drop it). The section itself continues without a gap.
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let g = srcu.read_lock();
    /// let moved = g.into_sendable();
    /// assert!(!srcu.in_read_section()); // this thread no longer holds it
    /// std::thread::scope(|s| {
    ///     s.spawn(|| {
    ///         let g = moved.adopt();
    ///         assert!(g.srcu().in_read_section()); // the receiver does
    ///     });
    /// });
    /// assert_eq!(srcu.readers(), 0);
    /// ```
    pub fn into_sendable(self) -> SendableReadGuard<'a, F> {
        let this = core::mem::ManuallyDrop::new(self);
        crate::held::leave(this.ticket.held_slot);
        SendableReadGuard {
            srcu: this.srcu,
            idx: this.index(),
        }
    }

    /// The kernel's `smp_mb__after_srcu_read_lock()`.
    ///
    /// After it, every memory access that follows is ordered after every
    /// access that came before `read_lock`, including plain loads (of guest
    /// memory, say) done before the section began. Use it when a reader
    /// acts on something it observed *before* entering the section and must
    /// then see everything the updater published before that observation
    /// (barrier M in `barriers.rs`).
    ///
    /// [`Classic`]: a no-op, because `read_lock` already executed a full
    /// barrier (B) after its increment. [`Fast`](crate::Fast): a real full
    /// fence (a locked `or` on x86_64, ~5 ns).
    #[inline(always)]
    pub fn mb_after_read_lock(&self) {
        // A fast domain in fallback mode (no membarrier) executed B in
        // `read_lock` already, like a classic one.
        if F::FAST && self.srcu.inner.fast {
            crate::barriers::reader_full();
        }
    }

    /// The domain this section belongs to.
    pub fn srcu(&self) -> &'a Srcu<F> {
        self.srcu
    }

    /// The counter index this section uses (0 or 1). For tests and
    /// diagnostics.
    pub fn index(&self) -> usize {
        self.srcu.inner.counters.ticket_idx(self.ticket)
    }

    /// Identity of the domain (compared by cells).
    #[inline(always)]
    pub(crate) fn domain_id(&self) -> usize {
        self.srcu.inner.id()
    }
}

impl<F: Flavor> Drop for ReadGuard<'_, F> {
    #[inline(always)]
    fn drop(&mut self) {
        self.srcu.read_unlock(self.ticket);
        crate::held::leave(self.ticket.held_slot);
    }
}

/// A read section on its way to another thread; from
/// [`ReadGuard::into_sendable`].
///
/// It is `Send` but gives no access to protected data: the receiving
/// thread calls [`adopt`](SendableReadGuard::adopt) to turn it back into a
/// [`ReadGuard`] counted on that thread. Dropping it ends the section. While
/// a section is in this form it is counted on no thread, so a thread that
/// holds one (without adopting it) and calls `synchronize` on the same
/// domain waits for itself; only the stall hook reports that.
#[must_use = "the read section ends when the guard is dropped"]
pub struct SendableReadGuard<'a, F: Flavor = Classic> {
    srcu: &'a Srcu<F>,
    idx: usize,
}

impl<'a, F: Flavor> SendableReadGuard<'a, F> {
    /// Continues the section as a [`ReadGuard`] of the current thread.
    pub fn adopt(self) -> ReadGuard<'a, F> {
        let this = core::mem::ManuallyDrop::new(self);
        ReadGuard::new(this.srcu, this.srcu.inner.counters.ticket(this.idx))
    }
}

impl<F: Flavor> Drop for SendableReadGuard<'_, F> {
    fn drop(&mut self) {
        let ticket = self.srcu.inner.counters.ticket(self.idx);
        self.srcu.read_unlock(ticket);
    }
}

impl<F: Flavor> core::fmt::Debug for SendableReadGuard<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendableReadGuard")
            .field("idx", &self.idx)
            .finish()
    }
}

impl<F: Flavor> core::fmt::Debug for ReadGuard<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("idx", &self.index())
            .finish()
    }
}
