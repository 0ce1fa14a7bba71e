//! The one place where the crate picks its synchronisation primitives: `std`
//! and `parking_lot` in normal builds, `loom`'s models under `--cfg loom`.
//!
//! Everything else in the crate imports from here, so the loom model tests
//! check the very code that ships.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// A mutex with the `parking_lot` calling convention (no poisoning).
#[cfg(not(loom))]
pub(crate) type Mutex<T> = parking_lot::Mutex<T>;
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(not(loom))]
pub(crate) type Condvar = parking_lot::Condvar;

#[cfg(loom)]
pub(crate) use loom_shim::{Condvar, Mutex, MutexGuard};

/// Thin wrappers that give loom's poisoning `Mutex`/`Condvar` the
/// `parking_lot` signatures the crate is written against.
#[cfg(loom)]
mod loom_shim {
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;
    impl<T> Mutex<T> {
        pub(crate) fn new(v: T) -> Self {
            Self(loom::sync::Mutex::new(v))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
    pub(crate) struct Condvar(loom::sync::Condvar);
    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(loom::sync::Condvar::new())
        }
        pub(crate) fn wait<T>(&self, g: &mut MutexGuard<'_, T>) {
            // loom's Condvar consumes the guard; swap it through a raw read.
            // SAFETY: `g` is a valid guard; we move it out and write the
            // returned guard back before anyone can observe the hole, and
            // `wait` does not unwind in loom models.
            unsafe {
                let taken = core::ptr::read(g);
                let back = self.0.wait(taken).unwrap_or_else(|e| e.into_inner());
                core::ptr::write(g, back);
            }
        }
        #[allow(dead_code)]
        pub(crate) fn notify_all(&self) -> bool {
            self.0.notify_all();
            true
        }
    }
}

/// Runs `f` with the mutex of `guard` released, then relocks it.
#[cfg(not(loom))]
pub(crate) fn unlocked<T, R>(guard: &mut MutexGuard<'_, T>, f: impl FnOnce() -> R) -> R {
    parking_lot::MutexGuard::unlocked(guard, f)
}

/// Loom: the update lock is never released early in the models.
#[cfg(loom)]
pub(crate) fn unlocked<T, R>(_guard: &mut MutexGuard<'_, T>, f: impl FnOnce() -> R) -> R {
    f()
}

/// Gives the CPU away while waiting for another thread.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// Yields the rest of the time slice (or lets loom schedule another thread).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

#[cfg(loom)]
pub(crate) use loom::thread::JoinHandle;
#[cfg(not(loom))]
pub(crate) use std::thread::JoinHandle;

/// Spawns the callback worker (named, so stall reports and debuggers show it).
#[cfg(not(loom))]
pub(crate) fn spawn<F: FnOnce() + Send + 'static>(f: F) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("srcu-callbacks".into())
        .spawn(f)
}

/// Spawns a loom thread (never fails).
#[cfg(loom)]
pub(crate) fn spawn<F: FnOnce() + Send + 'static>(f: F) -> std::io::Result<JoinHandle<()>> {
    Ok(loom::thread::spawn(f))
}
