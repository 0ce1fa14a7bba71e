//! The one place where the crate picks its synchronisation primitives:
//! `std`'s in normal builds, `loom`'s models under `--cfg loom`.
//!
//! Everything else in the crate imports from here, so the loom model tests
//! check the very code that ships.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// The standard library's mutex and condition variable in normal builds
/// (futex-based: no global table of parked threads, so a `fork`ed child
/// inherits nothing but the lock words, which `fork.rs` releases), loom's
/// under `--cfg loom`.
#[cfg(loom)]
use loom::sync as backend;
#[cfg(not(loom))]
use std::sync as backend;

/// A mutex without poisoning: a panic while it was held (a stall hook, a
/// callback) leaves the protected state consistent, because the crate
/// restores it on unwind where needed.
pub(crate) struct Mutex<T>(backend::Mutex<T>);
pub(crate) type MutexGuard<'a, T> = backend::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(v: T) -> Self {
        Self(backend::Mutex::new(v))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Aborts the process if dropped: armed around code that must not unwind
/// (a guard moved out of a `&mut` that has to be written back).
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        // Only reached if the code between creation and `forget` unwound.
        std::process::abort();
    }
}

/// Replaces the guard behind `g` by `f(guard)`.
fn with_guard<'a, T>(
    g: &mut MutexGuard<'a, T>,
    f: impl FnOnce(MutexGuard<'a, T>) -> MutexGuard<'a, T>,
) {
    let bomb = AbortOnUnwind;
    // SAFETY: the guard is moved out and a guard of the same mutex written
    // back before anyone can observe the hole; if `f` unwound in between,
    // `bomb` aborts the process instead of letting the hole be dropped. The
    // `f`s below only wait on a condition variable, which does not unwind.
    unsafe {
        let taken = core::ptr::read(g);
        core::ptr::write(g, f(taken));
    }
    core::mem::forget(bomb);
}

/// A condition variable with the `parking_lot` calling convention
/// (`wait(&mut guard)`).
pub(crate) struct Condvar(backend::Condvar);

impl Condvar {
    pub(crate) fn new() -> Self {
        Self(backend::Condvar::new())
    }

    pub(crate) fn wait<T>(&self, g: &mut MutexGuard<'_, T>) {
        with_guard(g, |taken| {
            self.0.wait(taken).unwrap_or_else(|e| e.into_inner())
        });
    }

    /// Waits at most `timeout`.
    #[cfg(not(loom))]
    pub(crate) fn wait_for<T>(&self, g: &mut MutexGuard<'_, T>, timeout: std::time::Duration) {
        with_guard(g, |taken| {
            self.0
                .wait_timeout(taken, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0
        });
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
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
