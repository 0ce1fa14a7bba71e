//! The vCPU-exit adapter: `KVM_EXIT_IO` / `KVM_EXIT_MMIO` to bus dispatch,
//! and the run loop.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::stats::VcpuStats;
use crate::bus::NOT_CALLING;
use crate::{BusKind, Buses, Completion, Flavor, IoDevice, IoRange};

/// A vCPU exit that is not port or MMIO I/O, or an I/O exit whose device
/// panicked, handed back to the caller of [`run_vcpu`] / [`run_once`].
/// Owned (the `kvm_run` details stay readable through
/// [`VcpuFd::get_kvm_run`] until the next run).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExit {
    /// A device's handler panicked while handling a port or MMIO access of
    /// the guest. The panic was caught (the default panic hook has already
    /// printed it) and the access completed as an unhandled one: a read
    /// gets all-ones, a write is dropped. For string I/O, the same holds
    /// for the rest of that exit's accesses (they go to the same port, so
    /// to the same device). The read section of the dispatch has ended.
    ///
    /// The VM can go on: calling [`run_vcpu`] / [`run_once`] again resumes
    /// the guest after the instruction. What to do with the device
    /// (unregister it, reset the VM, stop) is the caller's decision; it is
    /// named in the report. With `panic = "abort"` there is nothing to
    /// catch and the process aborts.
    DevicePanicked(DevicePanic),
    /// `KVM_EXIT_HLT`: the guest executed `hlt` (no in-kernel irqchip).
    Hlt,
    /// `KVM_EXIT_SHUTDOWN`: triple fault or similar.
    Shutdown,
    /// `KVM_EXIT_FAIL_ENTRY`: the kernel could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an instruction KVM cannot emulate).
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// `KVM_EXIT_SYSTEM_EVENT` (reset, shutdown, crash, ...).
    SystemEvent {
        /// `kvm_run.system_event.type`.
        kind: u32,
    },
    /// Any other exit reason (`kvm_run.exit_reason`).
    Other {
        /// The `KVM_EXIT_*` value.
        exit_reason: u32,
    },
}

/// The report of [`VmExit::DevicePanicked`]: which access, which device,
/// what the panic said.
#[derive(Clone)]
#[non_exhaustive]
pub struct DevicePanic {
    /// The bus dispatched on ([`BusKind::Pio`] or [`BusKind::Mmio`]).
    pub kind: BusKind,
    /// The address of the access (the port, or the guest-physical
    /// address).
    pub addr: u64,
    /// Its length in bytes (one element of a string I/O).
    pub len: usize,
    /// A write (`out`, MMIO store) rather than a read.
    pub write: bool,
    /// The range the device that panicked is registered at (several
    /// devices may cover the address; this says which one it was).
    pub range: IoRange,
    /// The device that panicked: a new strong reference, taken inside the
    /// read section, so it can be compared (`Arc::ptr_eq`) or passed to
    /// [`Buses::unregister_dev`]. It keeps the device alive while held.
    pub device: Arc<dyn IoDevice>,
    /// The panic message (the payload if it is a string, else a
    /// placeholder).
    pub message: String,
}

impl fmt::Debug for DevicePanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePanic")
            .field("kind", &self.kind)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("write", &self.write)
            .field("range", &self.range)
            .field("device", &Arc::as_ptr(&self.device).cast::<()>())
            .field("message", &self.message)
            .finish()
    }
}

impl PartialEq for DevicePanic {
    /// Field by field; the devices by identity (`Arc::ptr_eq`).
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.addr == other.addr
            && self.len == other.len
            && self.write == other.write
            && self.range == other.range
            && Arc::ptr_eq(&self.device, &other.device)
            && self.message == other.message
    }
}

impl Eq for DevicePanic {}

impl fmt::Display for DevicePanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the device at {} {:#x}+{:#x} panicked on a {}-byte {} at {:#x}: {}",
            self.kind,
            self.range.addr(),
            self.range.len(),
            self.len,
            if self.write { "write" } else { "read" },
            self.addr,
            self.message
        )
    }
}

/// What [`dispatch_kvm_run`] did with a vCPU's pending exit.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunDispatch {
    /// A `KVM_EXIT_IO` or `KVM_EXIT_MMIO` exit was dispatched (and its
    /// completions waited for); the vCPU can be run again.
    Dispatched,
    /// As `Dispatched`, but a device handler panicked; see
    /// [`VmExit::DevicePanicked`].
    DevicePanicked(DevicePanic),
    /// The exit is not port or MMIO I/O (its `exit_reason` is given);
    /// nothing was done.
    NotIo {
        /// `kvm_run.exit_reason`.
        exit_reason: u32,
    },
}

/// The part of `struct kvm_run` (Linux `include/uapi/linux/kvm.h`) this
/// module reads and writes. The layout is kernel ABI, stable across kernel
/// versions and identical in every `kvm-bindings` release, so dispatch does
/// not depend on the VMM's kvm-ioctls version. A unit test checks these
/// offsets against the kvm-bindings this crate is built with.
mod abi {
    /// `__u32 exit_reason`.
    pub const EXIT_REASON: usize = 8;
    /// The exit union.
    pub const UNION: usize = 32;
    /// `KVM_EXIT_IO`.
    pub const EXIT_IO: u32 = 2;
    /// `KVM_EXIT_MMIO`.
    pub const EXIT_MMIO: u32 = 6;
    /// `io.direction`: `KVM_EXIT_IO_OUT`.
    pub const IO_OUT: u8 = 1;
    // `struct { __u8 direction; __u8 size; __u16 port; __u32 count;
    //           __u64 data_offset; } io;`
    pub const IO_DIRECTION: usize = UNION;
    pub const IO_SIZE: usize = UNION + 1;
    pub const IO_PORT: usize = UNION + 2;
    pub const IO_COUNT: usize = UNION + 4;
    pub const IO_DATA_OFFSET: usize = UNION + 8;
    // `struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;`
    pub const MMIO_PHYS_ADDR: usize = UNION;
    pub const MMIO_DATA: usize = UNION + 8;
    pub const MMIO_LEN: usize = UNION + 16;
    pub const MMIO_IS_WRITE: usize = UNION + 20;
}

/// Dispatches the pending port or MMIO exit of a vCPU, given its raw
/// `kvm_run` mapping, on `buses` (PIO on [`BusKind::Pio`], MMIO on
/// [`BusKind::Mmio`]), exactly as [`run_once`] does, and counts it in
/// `stats`. This is the entry point for a VMM that does not use this
/// crate's kvm-ioctls version (cloud-hypervisor and Firecracker pin their
/// own): after its `KVM_RUN` returned `KVM_EXIT_IO` or `KVM_EXIT_MMIO`,
/// it passes `vcpu_fd.get_kvm_run()` as a pointer, and must not complete
/// the exit itself. Any other exit is left alone
/// ([`RunDispatch::NotIo`]).
///
/// Read data is written into the mapping (`io.data_offset` bytes, or
/// `mmio.data`), where `KVM_RUN` picks it up.
///
/// # Safety
///
/// * `run` points to the start of a vCPU's `kvm_run` mapping (the
///   `KVM_GET_VCPU_MMAP_SIZE` bytes mapped from the vCPU fd), valid for
///   reads and writes for the duration of the call;
/// * the last `KVM_RUN` on that vCPU has returned and the exit has not been
///   completed yet (no other thread runs the vCPU or touches the mapping
///   during the call);
/// * for `KVM_EXIT_IO`, `io.data_offset + io.size * io.count` lies inside
///   the mapping (the kernel guarantees it).
///
/// ```no_run
/// # fn vmm(vcpu: &mut kvm_ioctls::VcpuFd, buses: &kvm_bus::Buses) {
/// use kvm_bus::kvm::{dispatch_kvm_run, RunDispatch, VcpuStats};
/// let stats = VcpuStats::for_vcpu(0);
/// loop {
///     let _ = vcpu.run(); // the VMM's own kvm-ioctls, any version
///     let run = vcpu.get_kvm_run() as *mut _ as *mut u8;
///     // SAFETY: the vCPU's own mapping, right after KVM_RUN returned.
///     match unsafe { dispatch_kvm_run(run, buses, &stats) } {
///         RunDispatch::Dispatched => continue,
///         RunDispatch::DevicePanicked(p) => eprintln!("{p}"),
///         RunDispatch::NotIo { .. } => break, // the VMM's own handling
///         _ => break,
///     }
/// }
/// # }
/// ```
pub unsafe fn dispatch_kvm_run<F: Flavor>(
    run: *mut u8,
    buses: &Buses<F>,
    stats: &VcpuStats,
) -> RunDispatch {
    // Every access below: `run` is a live kvm_run mapping (caller), the
    // offsets are those of the kernel ABI (module `abi`, checked against
    // kvm-bindings in the tests), and unaligned accesses are used so no
    // alignment is assumed beyond the mapping's own.
    // SAFETY: `exit_reason` is inside the mapping (see above).
    let exit_reason = unsafe { run.add(abi::EXIT_REASON).cast::<u32>().read_unaligned() };
    let panic = match exit_reason {
        abi::EXIT_IO => {
            stats.exit();
            stats.io_exit();
            // SAFETY: see above; `io` is the active union member.
            let (write, size, port, count, offset) = unsafe {
                (
                    run.add(abi::IO_DIRECTION).read() == abi::IO_OUT,
                    usize::from(run.add(abi::IO_SIZE).read()),
                    run.add(abi::IO_PORT).cast::<u16>().read_unaligned(),
                    run.add(abi::IO_COUNT).cast::<u32>().read_unaligned() as usize,
                    run.add(abi::IO_DATA_OFFSET).cast::<u64>().read_unaligned() as usize,
                )
            };
            if size == 0 {
                return RunDispatch::Dispatched;
            }
            // SAFETY: the kernel places `count * size` data bytes at
            // `data_offset` inside the mapping (caller's contract), which
            // nothing else touches during the call.
            let data = unsafe { std::slice::from_raw_parts_mut(run.add(offset), size * count) };
            let data = if write {
                Data::Write(data)
            } else {
                Data::Read(data)
            };
            dispatch_chunks(buses, stats, BusKind::Pio, u64::from(port), data, size)
        }
        abi::EXIT_MMIO => {
            stats.exit();
            stats.mmio_exit();
            // SAFETY: see above; `mmio` is the active union member, and its
            // 8-byte data array is inside the mapping.
            let (addr, len, write, data) = unsafe {
                (
                    run.add(abi::MMIO_PHYS_ADDR).cast::<u64>().read_unaligned(),
                    run.add(abi::MMIO_LEN).cast::<u32>().read_unaligned() as usize,
                    run.add(abi::MMIO_IS_WRITE).read() != 0,
                    std::slice::from_raw_parts_mut(run.add(abi::MMIO_DATA), 8),
                )
            };
            let Some(data) = data.get_mut(..len).filter(|d| !d.is_empty()) else {
                // KVM never sends one (1 to 8 bytes); counted as the
                // invalid, so unhandled, access it would be.
                if write {
                    stats.add(0, 0, 1);
                } else {
                    stats.add(0, 1, 0);
                }
                return RunDispatch::Dispatched;
            };
            let size = data.len();
            let data = if write {
                Data::Write(data)
            } else {
                Data::Read(data)
            };
            dispatch_chunks(buses, stats, BusKind::Mmio, addr, data, size)
        }
        exit_reason => return RunDispatch::NotIo { exit_reason },
    };
    match panic {
        None => RunDispatch::Dispatched,
        Some(p) => RunDispatch::DevicePanicked(p),
    }
}

/// Runs the vCPU until an exit that is not port or MMIO I/O, dispatching
/// every I/O exit on `buses` (PIO exits on [`BusKind::Pio`], MMIO exits on
/// [`BusKind::Mmio`]) and counting in `stats`. Returns that exit.
///
/// Each I/O exit is dispatched in its own SRCU read section, taken after
/// `KVM_RUN` returned and dropped before the next `KVM_RUN`, through
/// [`Buses::get_bus_srcu`] (barrier, then dereference). So a VMM that
/// registers a device and then lets the guest know (any store to guest
/// memory after `register_dev` returned) is guaranteed that the guest's
/// next access to the device reaches it; and `unregister_dev` never waits
/// for a vCPU that sits in the guest. Handlers see the vCPU index of
/// `stats` ([`VcpuStats::for_vcpu`]) in [`Access::vcpu`](crate::Access).
///
/// An access that no device accepts is counted; a read gets all-ones
/// (`0xff` bytes), a write is dropped, and the guest continues. A write
/// whose device returns a [`Completion`](crate::Completion) is waited for
/// after the read section has ended, before the guest resumes.
///
/// A device handler that panics does not take the vCPU thread down: the
/// panic is caught, the access completes as an unhandled one, and the
/// exit is returned as [`VmExit::DevicePanicked`] naming the bus, the
/// address and the device. Calling `run_vcpu` again resumes the guest.
///
/// The [`FastMmio`](BusKind::FastMmio) bus is not consulted: in Linux it
/// serves zero-length ioeventfds matched by the kernel before any
/// instruction is decoded, which never reach userspace as MMIO exits.
///
/// For a VMM on another kvm-ioctls version, [`dispatch_kvm_run`] does the
/// same on the raw `kvm_run` mapping.
///
/// # Errors
///
/// The errno of a failed `KVM_RUN` (`EINTR` when a signal or
/// `immediate_exit` interrupted it; the vCPU can be run again).
pub fn run_vcpu<F: Flavor>(
    vcpu: &mut VcpuFd,
    buses: &Buses<F>,
    stats: &VcpuStats,
) -> Result<VmExit, kvm_ioctls::Error> {
    loop {
        if let Some(exit) = run_once(vcpu, buses, stats)? {
            return Ok(exit);
        }
    }
}

/// One `KVM_RUN`: dispatches an I/O or MMIO exit as [`run_vcpu`] does and
/// returns `Ok(None)` (or [`VmExit::DevicePanicked`] if its device
/// panicked), or returns any other exit. For run loops that check their
/// own stop condition between exits.
///
/// # Errors
///
/// The errno of a failed `KVM_RUN`.
pub fn run_once<F: Flavor>(
    vcpu: &mut VcpuFd,
    buses: &Buses<F>,
    stats: &VcpuStats,
) -> Result<Option<VmExit>, kvm_ioctls::Error> {
    let exit = match vcpu.run()? {
        VcpuExit::IoIn(..)
        | VcpuExit::IoOut(..)
        | VcpuExit::MmioRead(..)
        | VcpuExit::MmioWrite(..) => None,
        VcpuExit::Hlt => Some(VmExit::Hlt),
        VcpuExit::Shutdown => Some(VmExit::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Some(VmExit::FailEntry { reason, cpu }),
        VcpuExit::SystemEvent(kind, _) => Some(VmExit::SystemEvent { kind }),
        _ => {
            let run = vcpu.get_kvm_run();
            Some(
                if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says `internal` is the active union member.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    VmExit::InternalError { suberror }
                } else {
                    VmExit::Other {
                        exit_reason: run.exit_reason,
                    }
                },
            )
        }
    };
    if let Some(exit) = exit {
        stats.exit();
        return Ok(Some(exit));
    }
    let run = (vcpu.get_kvm_run() as *mut kvm_run).cast::<u8>();
    // SAFETY: the vCPU's own kvm_run mapping, which kvm-ioctls maps whole
    // for the lifetime of the VcpuFd; KVM_RUN just returned an I/O or MMIO
    // exit that nobody completed; we hold `&mut VcpuFd`, so nothing else
    // touches the mapping until we return.
    Ok(match unsafe { dispatch_kvm_run(run, buses, stats) } {
        RunDispatch::DevicePanicked(p) => Some(VmExit::DevicePanicked(p)),
        RunDispatch::Dispatched | RunDispatch::NotIo { .. } => None,
    })
}

/// The data of an exit: filled by a read, carried by a write.
enum Data<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::Read(d) => d.len(),
            Data::Write(d) => d.len(),
        }
    }
}

/// Dispatches `data.len() / size` accesses of `size` bytes at `addr` in
/// order, in one read section, counting them in `stats`: reads that no
/// device accepts get all-ones, writes are dropped. Completions returned
/// by writes are waited for after the section. If a device handler
/// panics, the panic is caught inside the section (so the device can be
/// named and a reference to it taken while the table is still
/// guaranteed alive), that access and the remaining ones complete as
/// unhandled, and the report is returned. A panic that did not come from
/// a device call (a bug here, not in a device) is resumed; the section
/// then ends while unwinding.
fn dispatch_chunks<F: Flavor>(
    buses: &Buses<F>,
    stats: &VcpuStats,
    kind: BusKind,
    addr: u64,
    mut data: Data<'_>,
    size: usize,
) -> Option<DevicePanic> {
    let count = data.len() / size;
    let vcpu = stats.vcpu();
    let t = Instant::now();
    let guard = buses.read_lock();
    let bus = buses.get_bus_srcu(&guard, kind);
    // The entry whose device is being called, NOT_CALLING between calls.
    let calling = Cell::new(NOT_CALLING);
    let (mut done, mut handled) = (0usize, 0u64);
    let mut completions: Vec<Completion> = Vec::new();
    // AssertUnwindSafe: after a panic, only plain integers written between
    // steps (`calling`, `done`, `handled`) are read, the unfinished part of
    // a read buffer is overwritten, completions already collected are
    // still waited for, and the (immutable) table is only looked up; the
    // device that panicked is never called again here.
    let result = catch_unwind(AssertUnwindSafe(|| match &mut data {
        Data::Read(d) => {
            for chunk in d.chunks_exact_mut(size) {
                if bus.read_with(vcpu, addr, chunk, |i| calling.set(i)).is_ok() {
                    handled += 1;
                } else {
                    chunk.fill(0xff);
                }
                done += 1;
            }
        }
        Data::Write(d) => {
            for chunk in d.chunks_exact(size) {
                if let Ok(c) = bus.write_with(vcpu, addr, chunk, |i| calling.set(i)) {
                    handled += 1;
                    completions.extend(c);
                }
                done += 1;
            }
        }
    }));
    let report = match result {
        Ok(()) => None,
        Err(payload) => {
            let Some((range, device)) = bus.entry(calling.get()) else {
                drop(guard);
                resume_unwind(payload)
            };
            // Still inside the read section: the entry's device pointer is
            // backed by the buses, so the clone is of a live device.
            let device = device.clone();
            if let Data::Read(d) = &mut data {
                d[done * size..].fill(0xff);
            }
            Some(DevicePanic {
                kind,
                addr,
                len: size,
                write: matches!(data, Data::Write(_)),
                range,
                device,
                message: panic_message(payload),
            })
        }
    };
    drop(guard);
    // Outside the section: a completion may take as long as the device
    // manager likes without holding back a grace period.
    for c in completions {
        c.wait();
    }
    let unhandled = count as u64 - handled;
    match data {
        Data::Read(_) => stats.add(handled, unhandled, 0),
        Data::Write(_) => stats.add(handled, 0, unhandled),
    }
    if report.is_some() {
        stats.device_panic();
    }
    stats.dispatch_time(t.elapsed().as_nanos() as u64);
    report
}

/// The message of a panic payload (`panic!` with a literal or a format
/// string gives `&str` or `String`).
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast_ref::<&'static str>() {
            Some(s) => (*s).to_owned(),
            None => "(panic payload is not a string)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::abi;
    use core::mem::offset_of;
    use kvm_bindings::{kvm_run, kvm_run__bindgen_ty_1};

    /// The hand-written ABI offsets match the kernel headers as
    /// kvm-bindings renders them.
    #[test]
    fn kvm_run_offsets_match_kvm_bindings() {
        assert_eq!(offset_of!(kvm_run, exit_reason), abi::EXIT_REASON);
        assert_eq!(offset_of!(kvm_run, __bindgen_anon_1), abi::UNION);
        let io = offset_of!(kvm_run__bindgen_ty_1, io) + abi::UNION;
        let mmio = offset_of!(kvm_run__bindgen_ty_1, mmio) + abi::UNION;
        type Io = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_4;
        type Mmio = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_6;
        assert_eq!(io + offset_of!(Io, direction), abi::IO_DIRECTION);
        assert_eq!(io + offset_of!(Io, size), abi::IO_SIZE);
        assert_eq!(io + offset_of!(Io, port), abi::IO_PORT);
        assert_eq!(io + offset_of!(Io, count), abi::IO_COUNT);
        assert_eq!(io + offset_of!(Io, data_offset), abi::IO_DATA_OFFSET);
        assert_eq!(mmio + offset_of!(Mmio, phys_addr), abi::MMIO_PHYS_ADDR);
        assert_eq!(mmio + offset_of!(Mmio, data), abi::MMIO_DATA);
        assert_eq!(mmio + offset_of!(Mmio, len), abi::MMIO_LEN);
        assert_eq!(mmio + offset_of!(Mmio, is_write), abi::MMIO_IS_WRITE);
        assert_eq!(kvm_bindings::KVM_EXIT_IO, abi::EXIT_IO);
        assert_eq!(kvm_bindings::KVM_EXIT_MMIO, abi::EXIT_MMIO);
        assert_eq!(kvm_bindings::KVM_EXIT_IO_OUT as u8, abi::IO_OUT);
    }
}
