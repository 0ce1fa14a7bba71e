//! Sections 3 and 4 on a real VM (`/dev/kvm`): the kernel's own
//! `KVM_IOEVENTFD` registration and unregistration, and a guest loop of
//! PIO writes dispatched through `kvm-bus`.
//!
//! The VMs are [`kvm_bus::kvm::MiniVm`]s (one vCPU in long mode) running
//! guest code written with [`Asm`]. The exit loop is our own, on
//! [`VcpuFd::run`], rather than [`kvm_bus::kvm::run_once`], so that the
//! dispatch can be TSC-timed on its own and left out entirely for the
//! baseline: the exit cost measured is that of `KVM_RUN` plus the
//! dispatch, with no adapter in between. (A long-mode guest's PIO exit
//! costs a few percent more than the same loop in real mode.)

use crate::bus::Nop;
use crate::harness::{time_ns, tsc, Stats};
use kvm_bus::kvm::{Asm, MiniVm, Reg, Width};
use kvm_bus::{BusKind, Buses, IoDevice, IoRange};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use srcu::Flavor;
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// True if `/dev/kvm` can be opened and a VM created.
pub fn kvm_usable() -> bool {
    MiniVm::probe().is_ok()
}

/// First port of the kernel ioeventfd registrations.
const IOEVENT_PORT_BASE: u16 = 0x1000;

/// A VM whose vCPU never runs, for `KVM_IOEVENTFD` measurements.
pub struct IoeventVm {
    vm: MiniVm,
    efd: EventFd,
}

impl IoeventVm {
    /// Opens `/dev/kvm` and creates a VM.
    pub fn new() -> Result<Self, String> {
        let vm = MiniVm::builder().build().map_err(|e| e.to_string())?;
        Ok(IoeventVm {
            vm,
            efd: eventfd()?,
        })
    }

    /// Registers and then unregisters `n` ioeventfds (PIO ports, any
    /// length), timing each call: (registration ns, unregistration ns).
    pub fn register_unregister(&self, n: usize) -> (Stats, Stats) {
        register_unregister(self.vm.vm_fd(), &self.efd, n)
    }

    /// The kernel's side of `bus::move_range_after_quiet_latency`: `n`
    /// assigns on distinct ports, each after a quiet spell
    /// ([`QUIET_SPELL`](crate::bus::QUIET_SPELL), untimed), timed one by
    /// one; then deassigned, untimed. On these 2-vCPU guests whatever runs
    /// first after the thread slept is slower (caches and TLB are cold):
    /// this is the kernel's figure in the same state.
    pub fn assign_after_quiet(&self, n: usize) -> Stats {
        let fd = self.vm.vm_fd();
        let samples = (0..n)
            .map(|i| {
                // Not synchronisation: the quiet spell being measured after.
                std::thread::sleep(crate::bus::QUIET_SPELL);
                let a = ioevent_addr(i);
                time_ns(|| {
                    fd.register_ioevent(&self.efd, &a, NoDatamatch)
                        .expect("KVM_IOEVENTFD assign")
                })
            })
            .collect();
        for i in 0..n {
            fd.unregister_ioevent(&self.efd, &ioevent_addr(i), NoDatamatch)
                .expect("KVM_IOEVENTFD deassign");
        }
        Stats { samples }
    }

    /// Assigns `n` ioeventfds on the ports from index `from`, timing each
    /// call; they stay until the VM is dropped (`examples/lookup.rs turns`).
    pub fn assign_ports(&self, from: usize, n: usize) -> Stats {
        time_ports(from, n, |a| {
            self.vm
                .vm_fd()
                .register_ioevent(&self.efd, a, NoDatamatch)
                .expect("KVM_IOEVENTFD assign")
        })
    }
}

fn eventfd() -> Result<EventFd, String> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))
}

fn ioevent_addr(i: usize) -> IoEventAddress {
    IoEventAddress::Pio(IOEVENT_PORT_BASE as u64 + i as u64)
}

/// `n` registrations on distinct ports, then their `n` unregistrations
/// (not [`MiniVm::ioeventfd_latency`], which alternates the two on one
/// port and keeps only a summary, not the samples).
fn register_unregister(vm: &VmFd, efd: &EventFd, n: usize) -> (Stats, Stats) {
    let reg = time_ports(0, n, |a| {
        vm.register_ioevent(efd, a, NoDatamatch)
            .expect("KVM_IOEVENTFD assign")
    });
    let unreg = time_ports(0, n, |a| {
        vm.unregister_ioevent(efd, a, NoDatamatch)
            .expect("KVM_IOEVENTFD deassign")
    });
    (reg, unreg)
}

/// Times `call` on each of the `n` ports from index `from`, in order.
fn time_ports(from: usize, n: usize, mut call: impl FnMut(&IoEventAddress)) -> Stats {
    let mut i = from;
    Stats::collect(n, || {
        let a = ioevent_addr(i);
        i += 1;
        time_ns(|| call(&a))
    })
}

/// The port the guest writes to.
pub const GUEST_PORT: u16 = 0x3f8;

/// A one-vCPU VM looping on `out dx, al` to [`GUEST_PORT`].
pub struct PioVm {
    // Field order is drop order: the vCPU goes before the VM and memory.
    vcpu: VcpuFd,
    vm: MiniVm,
}

impl PioVm {
    /// Creates the VM, loads the guest loop and sets up the vCPU.
    pub fn new() -> Result<Self, String> {
        // mov edx, GUEST_PORT; mov eax, 'A'; 1: out dx, al; jmp 1b
        let mut a = Asm::new();
        a.mov_imm(Reg::Rdx, GUEST_PORT.into());
        a.mov_imm(Reg::Rax, u64::from(b'A'));
        let top = a.label();
        a.bind(top);
        a.out_dx(Width::B1);
        a.jmp(top);
        let mut vm = MiniVm::builder()
            .code(&a.finish())
            .build()
            .map_err(|e| e.to_string())?;
        let vcpu = vm.take_vcpus().remove(0);
        Ok(PioVm { vcpu, vm })
    }

    /// Runs the guest for `n` PIO exits, calling `on_exit` for each.
    pub fn run_exits(&mut self, n: u64, on_exit: impl FnMut(u16, &[u8])) -> Result<(), String> {
        run_exits(&mut self.vcpu, n, on_exit)
    }

    /// Registers and then unregisters `n` kernel ioeventfds on this VM
    /// while its vCPU runs the guest loop in another thread (exits handled
    /// without dispatch): (registration ns, unregistration ns).
    pub fn ioeventfd_while_running(&mut self, n: usize) -> Result<(Stats, Stats), String> {
        let efd = eventfd()?;
        self.while_running::<srcu::Classic, _>(None, |vm| register_unregister(vm, &efd, n))
    }

    /// Runs `body` on this thread while the vCPU runs the guest loop in
    /// another thread, dispatching every exit with `Buses::write` on
    /// `buses` (or not at all if `None`). `body` gets the VM fd.
    pub fn while_running<F: Flavor, R>(
        &mut self,
        buses: Option<&Buses<F>>,
        body: impl FnOnce(&VmFd) -> R,
    ) -> Result<R, String> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (vm, vcpu) = (self.vm.vm_fd(), &mut self.vcpu);
        std::thread::scope(|s| {
            let runner = s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    run_exits(vcpu, 64, |port, d| match buses {
                        Some(b) => {
                            std::hint::black_box(b.write(BusKind::Pio, port as u64, d)).ok();
                        }
                        None => {
                            std::hint::black_box(d);
                        }
                    })?;
                }
                Ok::<(), String>(())
            });
            std::thread::sleep(std::time::Duration::from_millis(2));
            let r = body(vm);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            runner.join().expect("vCPU thread")?;
            Ok(r)
        })
    }
}

fn run_exits(vcpu: &mut VcpuFd, n: u64, mut on_exit: impl FnMut(u16, &[u8])) -> Result<(), String> {
    let mut done = 0;
    while done < n {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                on_exit(port, data);
                done += 1;
            }
            Ok(other) => return Err(format!("unexpected exit: {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Ok(())
}

/// One measurement of guest PIO exits.
#[derive(Clone, Copy, Debug)]
pub struct ExitSample {
    /// Wall time per exit (guest `out` to guest `out`), ns.
    pub exit_ns: f64,
    /// Of which in `Buses::write` (TSC-timed, including the two `rdtsc`), ns.
    pub dispatch_ns: f64,
}

/// The PIO bus of a VMM: the guest's port plus `others` other devices.
pub fn pio_buses<F: Flavor>(others: usize) -> Buses<F> {
    let buses = Buses::<F>::default();
    let mut slots = buses.lock_slots();
    let mut devs: Vec<(IoRange, Arc<dyn IoDevice>)> = vec![(
        IoRange::new(GUEST_PORT as u64, 8).expect("range"),
        Arc::new(Nop) as Arc<dyn IoDevice>,
    )];
    devs.extend((0..others).map(|i| {
        (
            IoRange::new(0x4000 + 0x10 * i as u64, 8).expect("range"),
            Arc::new(Nop) as Arc<dyn IoDevice>,
        )
    }));
    buses
        .register_many(&mut slots, BusKind::Pio, devs)
        .expect("register");
    drop(slots);
    buses
}

/// Runs `n` exits, each dispatched with `Buses::write` on `buses` (or not
/// dispatched at all if `buses` is `None`, the baseline).
pub fn exits<F: Flavor>(
    vm: &mut PioVm,
    buses: Option<&Buses<F>>,
    n: u64,
    ticks_per_ns: f64,
) -> Result<ExitSample, String> {
    let mut ticks = 0u64;
    let t0 = Instant::now();
    match buses {
        Some(b) => vm.run_exits(n, |port, data| {
            let c0 = tsc::now();
            let r = b.write(BusKind::Pio, port as u64, data);
            ticks += tsc::now() - c0;
            debug_assert!(r.is_ok());
            std::hint::black_box(r).ok();
        })?,
        None => vm.run_exits(n, |_, data| {
            std::hint::black_box(data);
        })?,
    }
    let wall = t0.elapsed().as_nanos() as f64;
    Ok(ExitSample {
        exit_ns: wall / n as f64,
        dispatch_ns: ticks as f64 / ticks_per_ns / n as f64,
    })
}
