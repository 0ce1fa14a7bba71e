//! Sections 3 and 4 on a real VM (`/dev/kvm`): the kernel's own
//! `KVM_IOEVENTFD` registration and unregistration, and a guest loop of
//! PIO writes dispatched through `kvm-bus`.
//!
//! Uses `kvm-ioctls` directly (a VM with one memory slot and one vCPU in
//! real mode running `out dx, al; jmp $-1`), so the exit cost measured is
//! that of KVM_RUN plus the dispatch, with no adapter in between.

use crate::bus::Nop;
use crate::harness::{time_ns, tsc, Stats};
use kvm_bus::{BusKind, Buses, IoDevice, IoRange};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use srcu::Flavor;
use std::sync::Arc;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// True if `/dev/kvm` can be opened and a VM created.
pub fn kvm_usable() -> bool {
    Kvm::new().and_then(|k| k.create_vm()).is_ok()
}

/// First port of the kernel ioeventfd registrations.
const IOEVENT_PORT_BASE: u16 = 0x1000;

/// A VM without vCPUs for `KVM_IOEVENTFD` measurements.
pub struct IoeventVm {
    vm: VmFd,
    _kvm: Kvm,
    efd: EventFd,
}

impl IoeventVm {
    /// Opens `/dev/kvm` and creates a VM.
    pub fn new() -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        Ok(IoeventVm { vm, _kvm: kvm, efd })
    }

    /// Registers and then unregisters `n` ioeventfds (PIO ports, any
    /// length), timing each call: (registration ns, unregistration ns).
    pub fn register_unregister(&self, n: usize) -> (Stats, Stats) {
        register_unregister(&self.vm, &self.efd, n)
    }
}

fn ioevent_addr(i: usize) -> IoEventAddress {
    IoEventAddress::Pio(IOEVENT_PORT_BASE as u64 + i as u64)
}

fn register_unregister(vm: &VmFd, efd: &EventFd, n: usize) -> (Stats, Stats) {
    let reg = Stats::collect(n, {
        let mut i = 0;
        move || {
            let a = ioevent_addr(i);
            i += 1;
            time_ns(|| {
                vm.register_ioevent(efd, &a, NoDatamatch)
                    .expect("KVM_IOEVENTFD assign")
            })
        }
    });
    let unreg = Stats::collect(n, {
        let mut i = 0;
        move || {
            let a = ioevent_addr(i);
            i += 1;
            time_ns(|| {
                vm.unregister_ioevent(efd, &a, NoDatamatch)
                    .expect("KVM_IOEVENTFD deassign")
            })
        }
    });
    (reg, unreg)
}

/// Guest physical (and, with CS base 0, linear) address of the guest code.
const CODE_ADDR: u64 = 0x1000;
/// Size of the guest's only memory slot.
const MEM_SIZE: usize = 0x10000;
/// The port the guest writes to.
pub const GUEST_PORT: u16 = 0x3f8;

/// A one-vCPU real-mode VM looping on `out dx, al` to [`GUEST_PORT`].
pub struct PioVm {
    // Field order is drop order: the vCPU and VM go before the memory.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    mem: *mut libc::c_void,
}

// SAFETY: `mem` is a private anonymous mapping owned by this struct, used
// only by the kernel (as guest memory) and unmapped in `Drop`; nothing else
// aliases it, so moving the struct to another thread is sound.
unsafe impl Send for PioVm {}

impl PioVm {
    /// Creates the VM, loads the guest loop and sets up the vCPU.
    pub fn new() -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED below.
        let mem = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err("mmap guest memory failed".into());
        }
        // mov dx, 0x3f8; mov al, 0x41; 1: out dx, al; jmp 1b
        let code: [u8; 8] = [0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xeb, 0xfd];
        // SAFETY: `mem` is a fresh writable mapping of MEM_SIZE bytes and
        // CODE_ADDR + 8 < MEM_SIZE; nothing else references it yet.
        unsafe {
            core::ptr::copy_nonoverlapping(
                code.as_ptr(),
                (mem as *mut u8).add(CODE_ADDR as usize),
                code.len(),
            )
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem as u64,
        };
        // Build the struct before anything can fail, so `Drop` unmaps.
        let vcpu = vm.create_vcpu(0);
        let vcpu = match vcpu {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: `mem` was mapped above with MEM_SIZE bytes and no
                // VM memory slot refers to it yet.
                unsafe { libc::munmap(mem, MEM_SIZE) };
                return Err(format!("KVM_CREATE_VCPU: {e}"));
            }
        };
        let this = PioVm {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            mem,
        };
        // SAFETY: the region is backed by `this.mem`, which stays mapped
        // until `this` is dropped, after the VM fd is closed.
        unsafe { this._vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let mut sregs = this
            .vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        this.vcpu
            .set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_ADDR,
            rflags: 2,
            ..Default::default()
        };
        this.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        Ok(this)
    }

    /// Runs the guest for `n` PIO exits, calling `on_exit` for each.
    pub fn run_exits(&mut self, n: u64, on_exit: impl FnMut(u16, &[u8])) -> Result<(), String> {
        run_exits(&mut self.vcpu, n, on_exit)
    }

    /// Registers and then unregisters `n` kernel ioeventfds on this VM
    /// while its vCPU runs the guest loop in another thread (exits handled
    /// without dispatch): (registration ns, unregistration ns).
    pub fn ioeventfd_while_running(&mut self, n: usize) -> Result<(Stats, Stats), String> {
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
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
        let (vm, vcpu) = (&self._vm, &mut self.vcpu);
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

impl Drop for PioVm {
    fn drop(&mut self) {
        // SAFETY: `mem` was mapped with MEM_SIZE bytes in `new`. The VM
        // still maps it as guest memory until its fd is closed right after
        // this (fields drop after `drop`), but no vCPU can run meanwhile
        // (we own the only one), and the kernel tolerates unmapped guest
        // memory of a dying VM.
        unsafe { libc::munmap(self.mem, MEM_SIZE) };
    }
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
    let slots = buses.lock_slots();
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
        .register_many(&slots, BusKind::Pio, devs)
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
