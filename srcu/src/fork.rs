//! `fork()`: a child process has only the thread that forked, so a callback
//! worker or a grace-period driver recorded in a domain's state may not
//! exist there. A process-wide generation, bumped in the child by a
//! `pthread_atfork` handler, lets the domain notice: a worker or driver
//! recorded under an older generation is treated as gone and replaced (the
//! worker is started again, another caller drives).
//!
//! What the child gives up, and what it cannot survive:
//!
//! * a callback batch the parent's worker had taken when it forked: it runs
//!   in the parent; the child counts it as done, runs everything still
//!   queued, and `barrier` does not wait for the parent's batch;
//! * a read section held by another thread of the parent at the moment of
//!   the fork: its lock increment is copied into the child, where no thread
//!   will ever unlock it, so every grace period of that domain in the child
//!   waits forever (the stall hook reports it). Fork with no read section
//!   open on other threads, or do not use the domain in the child.
//!
//! The `prepare` handler takes every live domain's internal mutexes before
//! the fork (and the `parent`/`child` handlers release them), so the child
//! never inherits one locked by a thread it does not have. What remains
//! outside the crate's control, as for any library with threads: locks of
//! other libraries held by other threads at the moment of the fork.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The number of `fork`s between the first domain's creation and now, as
/// seen by this process.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

/// Anything that is only ever dropped (a lock guard held across a `fork`).
#[cfg(all(unix, not(loom)))]
pub(crate) trait Release {}
#[cfg(all(unix, not(loom)))]
impl<T> Release for T {}

/// A lock guard held across a `fork`.
#[cfg(all(unix, not(loom)))]
pub(crate) type Held<'a> = Box<dyn Release + 'a>;

/// The live domains, for the `atfork` handlers (non-loom Unix only).
#[cfg(all(unix, not(loom)))]
mod handlers {
    use super::{Held, GENERATION};
    use crate::domain::Inner;
    use core::cell::RefCell;
    use core::sync::atomic::Ordering::Relaxed;
    use std::sync::{Arc, Mutex, Weak};

    static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

    std::thread_local! {
        /// Between `prepare` and `parent`/`child`, on the forking thread:
        /// the guards taken (released in reverse), and the domains they
        /// belong to (kept alive until then).
        static HELD: RefCell<(Vec<Held<'static>>, Vec<Arc<Inner>>)> =
            const { RefCell::new((Vec::new(), Vec::new())) };
    }

    pub(super) fn register(inner: &Arc<Inner>) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(inner));
    }

    /// Before `fork`: take every live domain's internal locks, so that no
    /// other thread holds one at the moment of the fork (the child would
    /// inherit it locked by a thread it does not have). The locks are the
    /// standard library's futex mutexes: the child inherits only their
    /// words, and `release` unlocks them as the thread that locked them.
    pub(super) extern "C" fn prepare() {
        let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let domains: Vec<Arc<Inner>> = live.iter().filter_map(Weak::upgrade).collect();
        let mut guards: Vec<Held<'static>> = vec![Box::new(live)];
        for inner in &domains {
            let mut keep = |g: Held<'_>| {
                // SAFETY: the guard borrows a mutex inside `inner`, which the
                // `Arc` in `HELD` keeps alive until after `release` has
                // dropped every guard (guards first, then the domains).
                guards.push(unsafe { core::mem::transmute::<Held<'_>, Held<'static>>(g) });
            };
            // The crate's lock order: callback state, then grace periods.
            inner.cbs.lock_for_fork(&mut keep);
            inner.gp.lock_for_fork(&mut keep);
        }
        HELD.with(|h| *h.borrow_mut() = (guards, domains));
    }

    /// After `fork`, in the parent and in the child (the forking thread's
    /// copy): release what `prepare` took.
    fn release() {
        let (mut guards, domains) = HELD.with(|h| core::mem::take(&mut *h.borrow_mut()));
        while let Some(g) = guards.pop() {
            drop(g);
        }
        drop(domains);
    }

    pub(super) extern "C" fn parent() {
        release();
    }

    pub(super) extern "C" fn child() {
        GENERATION.fetch_add(1, Relaxed);
        release();
    }
}

/// Registers a new domain with the `atfork` handlers, and installs them
/// once per process.
#[cfg(all(unix, not(loom)))]
pub(crate) fn watch(inner: &std::sync::Arc<crate::domain::Inner>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers only lock and unlock this crate's mutexes
        // and bump an atomic (see `handlers`).
        let r = unsafe {
            libc::pthread_atfork(
                Some(handlers::prepare),
                Some(handlers::parent),
                Some(handlers::child),
            )
        };
        if r != 0 {
            eprintln!("srcu: pthread_atfork failed ({r}); a forked child cannot restart the callback worker");
        }
    });
    handlers::register(inner);
}

#[cfg(not(all(unix, not(loom))))]
pub(crate) fn watch(_inner: &crate::sync::Arc<crate::domain::Inner>) {}
