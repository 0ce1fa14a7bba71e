//! `fork()`: a child process has only the thread that forked, so a callback
//! worker or a grace-period driver recorded in a domain's state may not
//! exist there. A process-wide generation, bumped in the child by a
//! `pthread_atfork` handler, lets the domain notice: a worker or driver
//! recorded under an older generation is treated as gone and replaced (the
//! worker is started again, another caller drives).
//!
//! What the child cannot survive, as with any library that uses threads
//! and locks: forking while another thread holds one of the domain's
//! internal mutexes (in the middle of `call_srcu` or of a grace-period
//! step); POSIX allows only async-signal-safe calls in such a child.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The number of `fork`s between the first domain's creation and now, as
/// seen by this process.
#[inline]
pub(crate) fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

#[cfg(all(unix, not(loom)))]
extern "C" fn in_child() {
    // Async-signal-safe: one atomic add.
    GENERATION.fetch_add(1, Relaxed);
}

/// Installs the `atfork` handler once per process (called when a domain is
/// created).
pub(crate) fn watch() {
    #[cfg(all(unix, not(loom)))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: registers a child handler that only does an atomic
            // add; no prepare/parent handlers.
            let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
            if r != 0 {
                eprintln!("srcu: pthread_atfork failed ({r}); a forked child cannot restart the callback worker");
            }
        });
    }
}
