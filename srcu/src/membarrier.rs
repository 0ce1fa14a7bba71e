//! `membarrier(2)`: the heavy side of the fast flavor's asymmetric fences.
//!
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED` makes every CPU that currently runs a
//! thread of this process execute a full barrier before the call returns
//! (threads that are not running pass through a full barrier when they are
//! scheduled back in). A reader's compiler barrier therefore acts as a full
//! barrier with respect to any grace-period step that issues it. A process
//! must register its intent once (`MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`),
//! which is slow (it waits for an RCU grace period in the kernel), so it is
//! done when the first fast domain is created, never on a read or update path.

#[cfg(all(target_os = "linux", not(loom)))]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::OnceLock;

    const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    fn membarrier(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and
        // touches no user memory.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        }
    }

    /// Queries and registers once per process; true if the expedited
    /// private command can be used.
    pub(crate) fn register() -> bool {
        static REGISTERED: OnceLock<bool> = OnceLock::new();
        *REGISTERED.get_or_init(|| {
            if std::env::var_os("SRCU_NO_MEMBARRIER").is_some() {
                return false;
            }
            let mask = membarrier(MEMBARRIER_CMD_QUERY);
            if mask < 0 || mask & MEMBARRIER_CMD_PRIVATE_EXPEDITED as libc::c_long == 0 {
                return false;
            }
            membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
        })
    }

    /// One bare call, no fallback, no fault injection: true if it worked.
    pub(crate) fn bare() -> bool {
        membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
    }

    /// Fault injection for tests: the next `n` calls fail as if a seccomp
    /// filter returned `EPERM`.
    pub(crate) static INJECT_FAILURES: AtomicU64 = AtomicU64::new(0);

    /// Full barrier on every CPU running a thread of this process. Returns
    /// true if `membarrier` failed and the `mprotect` fallback ran.
    ///
    /// # When `membarrier` fails after registration
    ///
    /// Registration succeeded before any fast domain used it, so a failure
    /// now means the environment changed (a seccomp filter installed after
    /// start-up, typically `EPERM`). Readers of fast domains are running
    /// without fences and rely on this barrier, so neither giving up nor
    /// panicking mid grace period is acceptable. The fallback is the
    /// pre-`membarrier` technique (Folly's `asymmetricHeavyBarrier`, .NET's
    /// `FlushProcessWriteBuffers`): revoking write access to a page this
    /// process has written forces a TLB shootdown, an inter-processor
    /// interrupt to every CPU that may be running a thread of the process,
    /// and on x86_64 taking that interrupt is serialising (a full barrier).
    /// The fallback is counted in [`crate::SrcuStats::membarrier_fallbacks`]
    /// and reported once on stderr. If `mprotect` fails too, or on an
    /// architecture where TLB shootdown is not an interrupt, the process is
    /// aborted with a message: continuing would free memory under readers.
    pub(crate) fn heavy_barrier() -> bool {
        if cfg!(srcu_teeth = "membarrier") {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            return false;
        }
        let injected = INJECT_FAILURES
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let r = if injected {
            -1
        } else {
            membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
        };
        if r == 0 {
            return false;
        }
        let err = if injected {
            std::io::Error::from_raw_os_error(libc::EPERM)
        } else {
            std::io::Error::last_os_error()
        };
        fallback(err);
        true
    }

    #[cold]
    #[inline(never)]
    fn fallback(err: std::io::Error) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            eprintln!(
                "srcu: membarrier(PRIVATE_EXPEDITED) failed after registration ({err}); \
                 fast domains fall back to an mprotect TLB-shootdown barrier"
            );
        });
        if let Err(e) = tlb_shootdown_barrier() {
            eprintln!(
                "srcu: membarrier failed ({err}) and the mprotect fallback failed too ({e}); \
                 readers of fast domains can no longer be ordered, aborting"
            );
            std::process::abort();
        }
    }

    /// One dummy page, written then write-protected under a lock.
    #[cfg(target_arch = "x86_64")]
    fn tlb_shootdown_barrier() -> std::io::Result<()> {
        use std::sync::Mutex;
        struct Page(*mut u8);
        // SAFETY: the pointer is only used under the mutex.
        unsafe impl Send for Page {}
        static PAGE: Mutex<Option<Page>> = Mutex::new(None);
        let mut page = PAGE.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if page.is_none() {
            // SAFETY: an anonymous private mapping of one page, checked.
            let p = unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            *page = Some(Page(p.cast()));
        }
        let p = page.as_ref().map(|p| p.0).unwrap_or(core::ptr::null_mut());
        // SAFETY: `p` is our mapping of `size` bytes; it is made writable
        // before the write and read-only after it, under the mutex.
        unsafe {
            if libc::mprotect(p.cast(), size, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Dirty the TLB entry so that the next mprotect must shoot it
            // down on every CPU that may cache it.
            core::ptr::write_volatile(p, 1);
            if libc::mprotect(p.cast(), size, libc::PROT_READ) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn tlb_shootdown_barrier() -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "TLB shootdown is not a barrier on this architecture",
        ))
    }
}

#[cfg(not(all(target_os = "linux", not(loom))))]
mod imp {
    pub(crate) fn register() -> bool {
        false
    }
    pub(crate) fn heavy_barrier() -> bool {
        crate::sync::fence(core::sync::atomic::Ordering::SeqCst);
        false
    }
    pub(crate) fn bare() -> bool {
        false
    }
}

#[cfg(all(target_os = "linux", not(loom)))]
pub(crate) use imp::INJECT_FAILURES;
pub(crate) use imp::{bare, heavy_barrier, register};
