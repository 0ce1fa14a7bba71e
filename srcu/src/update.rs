//! [`UpdateLock`]: the update-side lock whose guard is the proof that
//! [`SrcuCell`](crate::SrcuCell)'s update-side methods ask for (the role of
//! `lockdep_is_held()` in `rcu_dereference_protected()`).

use core::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A mutex with an identity. Cells created with a lock accept only guards
/// of that very lock as proof (a checked id: a guard of another lock makes
/// the call panic, whatever its type says).
///
/// ```
/// let srcu = srcu::Srcu::new();
/// let lock = srcu::UpdateLock::new(0u32); // protects update-side state too
/// let cell = srcu::SrcuCell::new(&srcu, &lock, Some(String::from("a")));
/// let mut g = lock.lock();
/// *g += 1;
/// assert_eq!(cell.dereference_protected(&g).map(String::as_str), Some("a"));
/// ```
pub struct UpdateLock<T = ()> {
    id: usize,
    mutex: crate::sync::Mutex<T>,
}

/// Held [`UpdateLock`]; unlocks on drop. Dereferences to the protected data.
#[must_use = "the lock is released when the guard is dropped"]
pub struct UpdateGuard<'a, T = ()> {
    id: usize,
    lock: &'a UpdateLock<T>,
    /// `None` only inside [`UpdateGuard::unlocked`].
    guard: Option<crate::sync::MutexGuard<'a, T>>,
}

fn next_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(1, Relaxed)
}

impl<T> UpdateLock<T> {
    /// A new lock protecting `value`.
    pub fn new(value: T) -> Self {
        UpdateLock {
            id: next_id(),
            mutex: crate::sync::Mutex::new(value),
        }
    }
}

impl<T> UpdateLock<T> {
    /// Acquires the lock, blocking while another thread holds it.
    pub fn lock(&self) -> UpdateGuard<'_, T> {
        UpdateGuard {
            id: self.id,
            lock: self,
            guard: Some(self.mutex.lock()),
        }
    }

    pub(crate) fn id(&self) -> usize {
        self.id
    }
}

impl<T: Default> Default for UpdateLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> UpdateGuard<'_, T> {
    pub(crate) fn lock_id(&self) -> usize {
        self.id
    }

    /// Releases the lock while `f` runs, then takes it again (also if `f`
    /// panics), like parking_lot's `MutexGuard::unlocked`. Other updaters may run meanwhile, so
    /// anything read under the lock before must be read again after.
    ///
    /// This is sound with respect to the proof the guard carries: the call
    /// borrows the guard mutably, so no reference obtained through it
    /// ([`SrcuCell::dereference_protected`](crate::SrcuCell::dereference_protected))
    /// can be alive across it. Use it to wait for a grace period without
    /// holding the update lock (which the readers being waited for may
    /// need).
    ///
    /// ```
    /// let srcu = srcu::Srcu::new();
    /// let lock = srcu::UpdateLock::new(());
    /// let cell = srcu::SrcuCell::new(&srcu, &lock, Some(1));
    /// let mut g = lock.lock();
    /// let old = cell.assign(2, &mut g).unwrap();
    /// let old = g.unlocked(|| old.synchronize()); // others may update now
    /// assert_eq!(*old, 1);
    /// ```
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Takes the lock again when `f` returns or unwinds.
        struct Relock<'g, 'a, T> {
            slot: &'g mut Option<crate::sync::MutexGuard<'a, T>>,
            mutex: &'a crate::sync::Mutex<T>,
        }
        impl<T> Drop for Relock<'_, '_, T> {
            fn drop(&mut self) {
                *self.slot = Some(self.mutex.lock());
            }
        }
        self.guard = None; // unlocks
        let _relock = Relock {
            slot: &mut self.guard,
            mutex: &self.lock.mutex,
        };
        f()
    }
}

impl<T> Deref for UpdateGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard
            .as_ref()
            .expect("an UpdateGuard is locked outside `unlocked`")
    }
}

impl<T> DerefMut for UpdateGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard
            .as_mut()
            .expect("an UpdateGuard is locked outside `unlocked`")
    }
}

impl<T> core::fmt::Debug for UpdateLock<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UpdateLock")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<T> core::fmt::Debug for UpdateGuard<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UpdateGuard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
