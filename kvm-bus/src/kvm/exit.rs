//! The vCPU-exit adapter: `KVM_EXIT_IO` / `KVM_EXIT_MMIO` to bus dispatch,
//! and the run loop.

use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::stats::VcpuStats;
use crate::{BusKind, Buses, Flavor, IoBus};

/// A vCPU exit that is not port or MMIO I/O, handed back to the caller of
/// [`run_vcpu`] / [`run_once`]. Owned (the `kvm_run` details stay readable
/// through [`VcpuFd::get_kvm_run`] until the next run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExit {
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
/// returns `Ok(None)`, or returns any other exit. For run loops that check
/// their own stop condition between exits.
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
            let t = Instant::now();
            {
                let guard = buses.read_lock();
                let bus = buses.get_bus_srcu(&guard, BusKind::Mmio);
                let (h, r) = read_or_ones(bus, addr, data);
                stats.add(h, r, 0);
            }
            stats.dispatch_time(t.elapsed().as_nanos() as u64);
            Step::Done
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.exit();
            stats.mmio_exit();
            let t = Instant::now();
            {
                let guard = buses.read_lock();
                let bus = buses.get_bus_srcu(&guard, BusKind::Mmio);
                let (h, w) = write_or_drop(bus, addr, data);
                stats.add(h, 0, w);
            }
            stats.dispatch_time(t.elapsed().as_nanos() as u64);
            Step::Done
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
            dispatch_pio(vcpu, buses, stats, write);
            Ok(None)
        }
    }
}

/// A port I/O exit: `count` accesses of `size` bytes to one port, data at
/// `data_offset` in the `kvm_run` mapping (the slice `VcpuExit::IoIn/IoOut`
/// carries is `count * size` bytes and does not say `size`, so it is
/// re-derived here from the `io` fields).
fn dispatch_pio<F: Flavor>(vcpu: &mut VcpuFd, buses: &Buses<F>, stats: &VcpuStats, write: bool) {
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
        return;
    }
    let t = Instant::now();
    {
        let guard = buses.read_lock();
        let bus = buses.get_bus_srcu(&guard, BusKind::Pio);
        let (mut handled, mut unhandled) = (0, 0);
        for chunk in data.chunks_exact_mut(size) {
            let (h, u) = if write {
                write_or_drop(bus, port, chunk)
            } else {
                read_or_ones(bus, port, chunk)
            };
            handled += h;
            unhandled += u;
        }
        if write {
            stats.add(handled, 0, unhandled);
        } else {
            stats.add(handled, unhandled, 0);
        }
    }
    stats.dispatch_time(t.elapsed().as_nanos() as u64);
}

/// `(handled, unhandled)` of one read; all-ones on failure.
#[inline]
fn read_or_ones(bus: &IoBus, addr: u64, data: &mut [u8]) -> (u64, u64) {
    match bus.read(addr, data) {
        Ok(()) => (1, 0),
        Err(_) => {
            data.fill(0xff);
            (0, 1)
        }
    }
}

/// `(handled, unhandled)` of one write; dropped on failure.
#[inline]
fn write_or_drop(bus: &IoBus, addr: u64, data: &[u8]) -> (u64, u64) {
    match bus.write(addr, data) {
        Ok(()) => (1, 0),
        Err(_) => (0, 1),
    }
}
