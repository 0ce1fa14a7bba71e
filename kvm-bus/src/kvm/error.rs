//! Errors of the mini VM.

use std::fmt;

use vmm_sys_util::errno;

/// Why a [`MiniVm`](super::MiniVm) could not be built or used. Every
/// variant that comes from a syscall carries its errno.
#[derive(Debug)]
#[non_exhaustive]
pub enum VmError {
    /// `/dev/kvm` is missing, not accessible, or KVM refuses to create a VM
    /// (no hardware virtualization). [`Display`](fmt::Display) says what to
    /// do in one line.
    KvmUnavailable {
        /// What failed: `"open /dev/kvm"` or `"create a VM"`.
        op: &'static str,
        /// The error the kernel returned.
        errno: errno::Error,
    },
    /// A KVM ioctl failed.
    Kvm {
        /// The operation, e.g. `"KVM_SET_SREGS"`.
        op: &'static str,
        /// The error the kernel returned.
        errno: kvm_ioctls::Error,
    },
    /// Mapping guest memory failed.
    Mmap {
        /// Requested size in bytes.
        size: usize,
        /// The error `mmap(2)` returned.
        errno: errno::Error,
    },
    /// The builder was given an impossible layout.
    Config(String),
}

impl VmError {
    /// True for [`VmError::KvmUnavailable`]: the machine cannot run VMs
    /// (as opposed to a bug or a bad configuration).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, VmError::KvmUnavailable { .. })
    }

    /// The errno, if the error came from a syscall.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VmError::KvmUnavailable { errno, .. } | VmError::Mmap { errno, .. } => {
                Some(errno.errno())
            }
            VmError::Kvm { errno, .. } => Some(errno.errno()),
            VmError::Config(_) => None,
        }
    }
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::KvmUnavailable { op, errno } => {
                let hint = match errno.errno() {
                    libc::ENOENT | libc::ENXIO | libc::ENODEV => {
                        "KVM is not available here: run on Linux with hardware virtualization \
                         enabled (VT-x/AMD-V, or nested virtualization in a VM) and the kvm \
                         module loaded (modprobe kvm_intel or kvm_amd)"
                    }
                    libc::EACCES | libc::EPERM => {
                        "no permission: add your user to the group owning /dev/kvm \
                         (sudo usermod -aG kvm $USER, then log in again) or run as root"
                    }
                    _ => "check that /dev/kvm works (dmesg may say why)",
                };
                write!(f, "cannot {op}: {errno}; {hint}")
            }
            VmError::Kvm { op, errno } => write!(f, "{op} failed: {errno}"),
            VmError::Mmap { size, errno } => {
                write!(f, "cannot map {size} bytes of guest memory: {errno}")
            }
            VmError::Config(what) => write!(f, "invalid mini VM configuration: {what}"),
        }
    }
}

impl std::error::Error for VmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmError::KvmUnavailable { errno, .. } | VmError::Mmap { errno, .. } => Some(errno),
            VmError::Kvm { errno, .. } => Some(errno),
            VmError::Config(_) => None,
        }
    }
}
