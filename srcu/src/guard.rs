//! [`ReadGuard`]: a read section, ended by drop.

use crate::domain::Srcu;
use crate::flavor::{Classic, Flavor};
use crate::held::Held;

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
/// The guard is `Send`: it may be moved to another thread and dropped there
/// (lock and unlock are counted separately, per CPU). A panic inside the
/// section ends it during unwinding; the domain stays usable.
#[must_use = "the read section ends when the guard is dropped"]
pub struct ReadGuard<'a, F: Flavor = Classic> {
    srcu: &'a Srcu<F>,
    idx: usize,
    held: Held,
}

impl<'a, F: Flavor> ReadGuard<'a, F> {
    #[inline(always)]
    pub(crate) fn new(srcu: &'a Srcu<F>, idx: usize) -> Self {
        ReadGuard {
            srcu,
            idx,
            held: Held::enter(srcu.inner.id()),
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
        self.idx
    }

    /// Identity of the domain (compared by cells).
    #[inline(always)]
    pub(crate) fn domain_id(&self) -> usize {
        self.srcu.inner.id()
    }
}

impl<F: Flavor> Drop for ReadGuard<'_, F> {
    #[inline]
    fn drop(&mut self) {
        self.srcu.read_unlock(self.idx);
        self.held.leave();
    }
}

impl<F: Flavor> core::fmt::Debug for ReadGuard<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReadGuard").field("idx", &self.idx).finish()
    }
}
