//! [`SrcuCell`]: an SRCU-protected pointer, and [`Stale`], a value that
//! readers may still see.

use crate::callbacks::{call_srcu_inner, drop_later};
use crate::domain::{Inner, Srcu};
use crate::flavor::Flavor;
use crate::guard::ReadGuard;
use crate::sync::Arc;
use crate::update::{UpdateGuard, UpdateLock};
use core::marker::PhantomData;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

#[cfg(loom)]
use loom::sync::atomic::AtomicPtr;
#[cfg(not(loom))]
use std::sync::atomic::AtomicPtr;

/// An SRCU-protected, possibly empty pointer to a `T` (an
/// `Option<Box<T>>` inside).
///
/// * Readers: [`dereference`](SrcuCell::dereference) under a
///   [`ReadGuard`] of the cell's domain (`srcu_dereference`). The reference
///   borrows both the guard and the cell.
/// * Updaters, holding the cell's [`UpdateLock`]:
///   [`dereference_protected`](SrcuCell::dereference_protected)
///   (`rcu_dereference_protected`), [`replace`](SrcuCell::replace) and
///   [`assign`](SrcuCell::assign) (`rcu_assign_pointer`), which hand back
///   the old value as a [`Stale`]: readers may still see it, so it can only
///   be freed after a grace period ([`Stale::synchronize`], or dropped:
///   freed by `call_srcu`).
/// * Destruction: [`get_mut`](SrcuCell::get_mut) and
///   [`into_inner`](SrcuCell::into_inner): exclusive access proves that no
///   reader holds a reference (every reference borrows the cell).
///
/// A cell belongs to one domain and one update lock, fixed at creation and
/// checked at run time (a guard of another domain or lock panics): checking
/// costs one compare per call, and makes misuse a panic instead of a
/// use-after-free.
///
/// ```
/// use srcu::{Srcu, SrcuCell, UpdateLock};
/// let srcu = Srcu::new();
/// let lock = UpdateLock::new(());
/// let cell = SrcuCell::new(&srcu, &lock, Some(1));
/// {
///     let g = srcu.read_lock();
///     assert_eq!(cell.dereference(&g), Some(&1));
/// }
/// let old = cell.assign(2, &mut lock.lock());
/// let old = old.unwrap().synchronize(); // waits for readers of `1`
/// assert_eq!(*old, 1);
/// ```
///
/// `dereference_protected` needs the proof:
///
/// ```compile_fail
/// let srcu = srcu::Srcu::new();
/// let lock = srcu::UpdateLock::new(());
/// let cell = srcu::SrcuCell::new(&srcu, &lock, Some(1));
/// let g = srcu.read_lock();
/// cell.dereference_protected(&g); // a ReadGuard is no UpdateGuard
/// ```
pub struct SrcuCell<T> {
    ptr: AtomicPtr<T>,
    domain: Arc<Inner>,
    lock_id: usize,
    _owns: PhantomData<Box<T>>,
}

// SAFETY: the cell owns a `Box<T>`; sending it sends the `T` (needs `Send`),
// and sharing it lets other threads read `&T` (needs `Sync`) and swap the
// value out and drop it elsewhere (needs `Send`).
unsafe impl<T: Send + Sync> Send for SrcuCell<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for SrcuCell<T> {}

fn into_raw<T>(v: Option<Box<T>>) -> *mut T {
    v.map_or(core::ptr::null_mut(), Box::into_raw)
}

impl<T: Send + Sync + 'static> SrcuCell<T> {
    /// A cell of `srcu`'s domain, updated under `lock`, holding `value`.
    pub fn new<F: Flavor, L>(srcu: &Srcu<F>, lock: &UpdateLock<L>, value: Option<T>) -> Self {
        SrcuCell {
            ptr: AtomicPtr::new(into_raw(value.map(Box::new))),
            domain: srcu.inner.clone(),
            lock_id: lock.id(),
            _owns: PhantomData,
        }
    }

    /// The current value, for a reader (`srcu_dereference`). The reference
    /// cannot outlive the read section nor the cell.
    ///
    /// Ordering (Q): the pointer load is an acquire, pairing with the
    /// release of the [`replace`](SrcuCell::replace) that stored it, so the
    /// object is seen fully initialised.
    ///
    /// # Panics
    ///
    /// If `guard` belongs to another domain than the cell.
    #[inline]
    pub fn dereference<'g, F: Flavor>(&'g self, guard: &'g ReadGuard<'_, F>) -> Option<&'g T> {
        if guard.domain_id() != self.domain.id() {
            wrong_domain();
        }
        // Q: pairs with P in `replace`.
        let p = self.ptr.load(Acquire);
        // SAFETY: `p` is null or came from `Box::into_raw` in `new`/`replace`.
        // It is freed only (a) after a grace period that started after it
        // was unpublished (`Stale`), and this section, of the same domain
        // (checked above), began before the unpublish if it loaded `p`, so
        // the grace period waits for `guard`; or (b) by `get_mut`,
        // `into_inner` or drop, which need the cell exclusively, impossible
        // while the returned reference borrows it.
        unsafe { p.as_ref() }
    }

    /// The current value, for an updater holding the cell's lock
    /// (`rcu_dereference_protected`). No barrier: the lock orders it after
    /// every update.
    ///
    /// The reference borrows `proof` shared, and every update
    /// ([`replace`](SrcuCell::replace), [`assign`](SrcuCell::assign),
    /// [`take`](SrcuCell::take)) borrows it mutably, so the reference
    /// cannot be kept across an update made under the same guard (after
    /// which the value could be freed):
    ///
    /// ```compile_fail,E0502
    /// let srcu = srcu::Srcu::new();
    /// let lock = srcu::UpdateLock::new(());
    /// let cell = srcu::SrcuCell::new(&srcu, &lock, Some(1));
    /// let mut g = lock.lock();
    /// let r = cell.dereference_protected(&g).unwrap();
    /// drop(cell.take(&mut g).unwrap().synchronize()); // frees what `r` sees
    /// println!("{r}");
    /// ```
    ///
    /// # Panics
    ///
    /// If `proof` is a guard of another lock than the cell's.
    pub fn dereference_protected<'a, L>(&'a self, proof: &'a UpdateGuard<'_, L>) -> Option<&'a T> {
        self.check_lock(proof);
        // SAFETY: only holders of the lock change the pointer, through
        // `replace`, which needs `&mut UpdateGuard`; `proof` is borrowed
        // shared for 'a, so no update under this guard (nor any other: the
        // lock is held) can run while the reference lives, and freeing
        // needs either such an update first or `&mut self`.
        unsafe { self.ptr.load(Relaxed).as_ref() }
    }

    /// Publishes `new` and returns the previous value as [`Stale`].
    ///
    /// Ordering (P): the store is a release, pairing with the acquire in
    /// [`dereference`](SrcuCell::dereference): a reader that sees the new
    /// pointer sees the object as initialised before this call.
    ///
    /// `proof` is borrowed mutably: no reference from
    /// [`dereference_protected`](SrcuCell::dereference_protected) under the
    /// same guard can be alive across the update.
    ///
    /// # Panics
    ///
    /// If `proof` is a guard of another lock than the cell's.
    pub fn replace<L>(&self, new: Option<T>, proof: &mut UpdateGuard<'_, L>) -> Option<Stale<T>> {
        self.check_lock(proof);
        // P: release (the acquire half orders nothing we rely on; swap is
        // one instruction on x86_64).
        let old = self.ptr.swap(into_raw(new.map(Box::new)), AcqRel);
        if old.is_null() {
            return None;
        }
        // SAFETY: `old` came from `Box::into_raw` and is now unreachable
        // for new readers; `Stale` frees it only after a grace period.
        let value = unsafe { Box::from_raw(old) };
        Some(Stale::new(value, &self.domain))
    }

    /// Publishes `value`; the previous value, if any, as [`Stale`].
    pub fn assign<L>(&self, value: T, proof: &mut UpdateGuard<'_, L>) -> Option<Stale<T>> {
        self.replace(Some(value), proof)
    }

    /// Empties the cell; the previous value, if any, as [`Stale`].
    pub fn take<L>(&self, proof: &mut UpdateGuard<'_, L>) -> Option<Stale<T>> {
        self.replace(None, proof)
    }

    /// The value, with exclusive access: no reader can hold a reference.
    pub fn get_mut(&mut self) -> Option<&mut T> {
        // SAFETY: `&mut self` excludes every borrow of the cell, and every
        // reader reference borrows it.
        unsafe { self.ptr.load(Relaxed).as_mut() }
    }

    /// The value, consuming the cell.
    pub fn into_inner(self) -> Option<T> {
        let p = self.ptr.swap(core::ptr::null_mut(), Relaxed);
        // SAFETY: as in `get_mut`; the pointer is replaced by null so `Drop`
        // does not free it again.
        (!p.is_null()).then(|| *unsafe { Box::from_raw(p) })
    }

    #[inline]
    fn check_lock<L>(&self, proof: &UpdateGuard<'_, L>) {
        if proof.lock_id() != self.lock_id {
            wrong_lock();
        }
    }
}

#[cold]
#[inline(never)]
fn wrong_domain() -> ! {
    panic!("srcu: SrcuCell dereferenced with a ReadGuard of another Srcu domain")
}

#[cold]
#[inline(never)]
fn wrong_lock() -> ! {
    panic!("srcu: SrcuCell update-side call with a guard of another UpdateLock")
}

impl<T> Drop for SrcuCell<T> {
    fn drop(&mut self) {
        let p = self.ptr.swap(core::ptr::null_mut(), Relaxed);
        if !p.is_null() {
            // SAFETY: `&mut self`: no reader reference exists (they borrow
            // the cell); `p` came from `Box::into_raw`.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for SrcuCell<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SrcuCell")
            .field("is_some", &!self.ptr.load(Relaxed).is_null())
            .finish_non_exhaustive()
    }
}

/// A value unpublished from an [`SrcuCell`] (or handed to
/// [`Srcu::retire`]) that readers may still be looking at.
///
/// It remembers the grace period that makes it safe: the first one that
/// started after the unpublish. Take it back with
/// [`synchronize`](Stale::synchronize) (waits for that grace period), poll
/// with [`is_complete`](Stale::is_complete), get notified with
/// [`then`](Stale::then), or drop it: the drop queues its free with
/// `call_srcu` and never blocks.
#[must_use = "dropping a Stale frees it after a grace period; use .synchronize() to get it back"]
pub struct Stale<T: Send + 'static> {
    value: Option<Box<T>>,
    domain: Arc<Inner>,
    /// The grace period after which no reader can see `value`.
    safe_after: u64,
}

impl<T: Send + 'static> Stale<T> {
    /// A value unpublished just before this call.
    pub(crate) fn new(value: Box<T>, domain: &Arc<Inner>) -> Self {
        Stale {
            value: Some(value),
            domain: domain.clone(),
            safe_after: domain.next_gp_to_start(),
        }
    }

    /// Waits for the grace period after which no reader can see the value,
    /// and hands it back. Returns at once if it has already completed.
    ///
    /// # Panics
    ///
    /// If the calling thread is inside a read section of the cell's domain
    /// (it would wait for itself), in every build.
    pub fn synchronize(self) -> Box<T> {
        self.take_after("Stale::synchronize", false)
    }

    /// Like [`synchronize`](Stale::synchronize), with an expedited grace
    /// period ([`Srcu::synchronize_expedited`]): lower latency once the
    /// readers have left.
    ///
    /// # Panics
    ///
    /// As [`synchronize`](Stale::synchronize).
    pub fn synchronize_expedited(self) -> Box<T> {
        self.take_after("Stale::synchronize_expedited", true)
    }

    /// True once no reader can see the value any more (its grace period
    /// has completed). Never blocks; the first call that finds it pending
    /// makes sure the grace period is driven (by the callback worker), so
    /// polling alone completes it.
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let old = srcu.retire(String::from("unpublished"));
    /// while !old.is_complete() {
    ///     std::thread::yield_now();
    /// }
    /// assert_eq!(*old.synchronize(), "unpublished"); // no wait now
    /// ```
    pub fn is_complete(&self) -> bool {
        if self.domain.gp.completed() >= self.safe_after || self.domain.cbs.is_shut_down() {
            // (Without the domain's handle no reader can exist, and no
            // worker would drive the grace period.)
            return true;
        }
        self.domain.request_gp_at_least(self.safe_after);
        crate::callbacks::kick(&self.domain);
        false
    }

    /// Hands the value back if its grace period has already completed,
    /// else returns `self` unchanged. Never blocks and, unlike
    /// [`is_complete`](Stale::is_complete), never asks for a grace period:
    /// for an updater that keeps what it unpublished and frees it itself
    /// once some grace period (its own `synchronize`, the callback
    /// worker's) has made that safe, on its own thread, where the memory
    /// came from. Whatever it gives up waiting for, it drops: the usual
    /// deferred free.
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let old = srcu.retire(vec![1u8; 64]);
    /// let old = old.try_take().unwrap_err(); // no grace period since
    /// srcu.synchronize();
    /// assert_eq!(old.try_take().unwrap().len(), 64);
    /// ```
    pub fn try_take(mut self) -> Result<Box<T>, Stale<T>> {
        // Acquire (in `completed`): pairs with the release store after
        // barrier G, so the readers' accesses to the value happened before
        // whatever the caller does with it.
        // (No check for a dropped domain handle, which needs the callback
        // lock: then no grace period completes any more, and dropping the
        // `Stale` frees the value at once.)
        // (`--cfg srcu_teeth="try_take"` skips the check, for
        // scripts/teeth.sh: the kvm-bus test of retired tables must fail.)
        if cfg!(srcu_teeth = "try_take") || self.domain.gp.completed() >= self.safe_after {
            return Ok(self
                .value
                .take()
                .expect("Stale always holds a value until consumed"));
        }
        Err(self)
    }

    /// Runs `f` with the value once no reader can see it, on the callback
    /// worker (a `call_srcu`); never blocks. For notification: send the
    /// value, or a message, to whoever waits.
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// srcu.retire(7u32).then(move |v| tx.send(*v).unwrap());
    /// assert_eq!(rx.recv().unwrap(), 7);
    /// ```
    pub fn then(mut self, f: impl FnOnce(Box<T>) + Send + 'static) {
        if let Some(v) = self.value.take() {
            call_srcu_inner(&self.domain, Box::new(move || f(v)));
        }
    }

    /// True if the calling thread is inside a read section of the value's
    /// domain: [`synchronize`](Stale::synchronize) would then panic (it
    /// would wait for the caller itself). For callers that prefer an error.
    pub fn in_read_section(&self) -> bool {
        crate::held::depth(self.domain.held_slot()) != 0
    }

    /// Waits for the value's grace period, then hands the value back.
    fn take_after(mut self, what: &str, expedited: bool) -> Box<T> {
        crate::held::assert_not_reading(self.domain.held_slot(), what);
        if expedited {
            self.domain.wait_for_gp_expedited(self.safe_after);
        } else {
            self.domain.wait_for_gp(self.safe_after);
        }
        self.value
            .take()
            .expect("Stale always holds a value until consumed")
    }

    /// Frees the value after a grace period without waiting (same as drop).
    pub fn defer_free(self) {}
}

impl<T: Send + 'static> Drop for Stale<T> {
    fn drop(&mut self) {
        if let Some(v) = self.value.take() {
            call_srcu_inner(&self.domain, drop_later(v));
        }
    }
}

impl<T: Send + 'static> core::fmt::Debug for Stale<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stale").finish_non_exhaustive()
    }
}
