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

    /// Full barrier on every CPU running a thread of this process.
    pub(crate) fn heavy_barrier() {
        if cfg!(srcu_teeth = "membarrier") {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            return;
        }
        let r = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
        // Registration succeeded before any fast domain existed, and the
        // command cannot fail afterwards; a failure here would make the
        // fast flavor silently unsafe, so it is fatal.
        assert!(
            r == 0,
            "membarrier(PRIVATE_EXPEDITED) failed after registration: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(all(target_os = "linux", not(loom))))]
mod imp {
    pub(crate) fn register() -> bool {
        false
    }
    pub(crate) fn heavy_barrier() {
        crate::sync::fence(core::sync::atomic::Ordering::SeqCst);
    }
}

pub(crate) use imp::{heavy_barrier, register};
