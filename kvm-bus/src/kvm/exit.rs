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
use crate::{BusKind, Buses, Flavor, IoDevice, IoRange};

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

enum Step {
    Pio { write: bool },
    Done,
    Stop(VmExit),
    OtherReason,
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
/// for a vCPU that sits in the guest.
///
/// An access that no device accepts is counted; a read gets all-ones
/// (`0xff` bytes), a write is dropped, and the guest continues.
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
    let step = match vcpu.run()? {
        VcpuExit::IoIn(..) => Step::Pio { write: false },
        VcpuExit::IoOut(..) => Step::Pio { write: true },
        VcpuExit::MmioRead(addr, data) => {
            stats.exit();
            stats.mmio_exit();
            match dispatch(buses, stats, BusKind::Mmio, addr, Data::Read(data)) {
                None => Step::Done,
                Some(p) => Step::Stop(VmExit::DevicePanicked(p)),
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.exit();
            stats.mmio_exit();
            match dispatch(buses, stats, BusKind::Mmio, addr, Data::Write(data)) {
                None => Step::Done,
                Some(p) => Step::Stop(VmExit::DevicePanicked(p)),
            }
        }
        VcpuExit::Hlt => Step::Stop(VmExit::Hlt),
        VcpuExit::Shutdown => Step::Stop(VmExit::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Step::Stop(VmExit::FailEntry { reason, cpu }),
        VcpuExit::SystemEvent(kind, _) => Step::Stop(VmExit::SystemEvent { kind }),
        VcpuExit::InternalError => Step::OtherReason,
        _ => Step::OtherReason,
    };
    match step {
        Step::Done => Ok(None),
        // Already counted as an MMIO exit.
        Step::Stop(exit @ VmExit::DevicePanicked(_)) => Ok(Some(exit)),
        Step::Stop(exit) => {
            stats.exit();
            Ok(Some(exit))
        }
        Step::OtherReason => {
            stats.exit();
            let run = vcpu.get_kvm_run();
            if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                // SAFETY: exit_reason says `internal` is the active union member.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                Ok(Some(VmExit::InternalError { suberror }))
            } else {
                Ok(Some(VmExit::Other {
                    exit_reason: run.exit_reason,
                }))
            }
        }
        Step::Pio { write } => {
            stats.exit();
            stats.io_exit();
            Ok(dispatch_pio(vcpu, buses, stats, write).map(VmExit::DevicePanicked))
        }
    }
}

/// A port I/O exit: `count` accesses of `size` bytes to one port, data at
/// `data_offset` in the `kvm_run` mapping (the slice `VcpuExit::IoIn/IoOut`
/// carries is `count * size` bytes and does not say `size`, so it is
/// re-derived here from the `io` fields).
fn dispatch_pio<F: Flavor>(
    vcpu: &mut VcpuFd,
    buses: &Buses<F>,
    stats: &VcpuStats,
    write: bool,
) -> Option<DevicePanic> {
    let run: &mut kvm_run = vcpu.get_kvm_run();
    // SAFETY: the previous `run()` returned IoIn/IoOut, i.e. exit_reason is
    // KVM_EXIT_IO, so `io` is the active union member (a Copy read).
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let len = size * io.count as usize;
    let base = (run as *mut kvm_run).cast::<u8>();
    // SAFETY: for KVM_EXIT_IO the kernel places `count * size` data bytes
    // at `data_offset` inside the vCPU's kvm_run mapping, which kvm-ioctls
    // maps whole (the size KVM_GET_VCPU_MMAP_SIZE reports) for the lifetime
    // of the VcpuFd; this is the slice kvm-ioctls itself hands out in
    // VcpuExit::IoIn/IoOut. We hold `&mut VcpuFd`, so nothing else refers to
    // it until we return.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
    let port = u64::from(io.port);
    if size == 0 {
        return None;
    }
    let data = if write {
        Data::Write(data)
    } else {
        Data::Read(data)
    };
    dispatch_chunks(buses, stats, BusKind::Pio, port, data, size)
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

/// One MMIO access: [`dispatch_chunks`] with a single chunk.
fn dispatch<F: Flavor>(
    buses: &Buses<F>,
    stats: &VcpuStats,
    kind: BusKind,
    addr: u64,
    data: Data<'_>,
) -> Option<DevicePanic> {
    let len = data.len();
    if len == 0 {
        // KVM never sends one (1 to 8 bytes); counted as the invalid, so
        // unhandled, access it would be (and `chunks_exact` needs size > 0).
        match data {
            Data::Read(_) => stats.add(0, 1, 0),
            Data::Write(_) => stats.add(0, 0, 1),
        }
        return None;
    }
    dispatch_chunks(buses, stats, kind, addr, data, len)
}

/// Dispatches `data.len() / size` accesses of `size` bytes at `addr` in
/// order, in one read section, counting them in `stats`: reads that no
/// device accepts get all-ones, writes are dropped. If a device handler
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
    let t = Instant::now();
    let guard = buses.read_lock();
    let bus = buses.get_bus_srcu(&guard, kind);
    // The entry whose device is being called, NOT_CALLING between calls.
    let calling = Cell::new(NOT_CALLING);
    let (mut done, mut handled) = (0usize, 0u64);
    // AssertUnwindSafe: after a panic, only plain integers written between
    // steps (`calling`, `done`, `handled`) are read, the unfinished part of
    // a read buffer is overwritten, and the (immutable) table is only
    // looked up; the device that panicked is never called again here.
    let result = catch_unwind(AssertUnwindSafe(|| match &mut data {
        Data::Read(d) => {
            for chunk in d.chunks_exact_mut(size) {
                if bus.read_with(addr, chunk, |i| calling.set(i)).is_ok() {
                    handled += 1;
                } else {
                    chunk.fill(0xff);
                }
                done += 1;
            }
        }
        Data::Write(d) => {
            for chunk in d.chunks_exact(size) {
                if bus.write_with(addr, chunk, |i| calling.set(i)).is_ok() {
                    handled += 1;
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
