//! Real KVM: a `kvm-ioctls` vCPU-exit adapter for the buses (feature
//! `kvm`, on by default), and a minimal VM to run it on (feature `test-vm`).
//!
//! * [`run_vcpu`](crate::kvm::run_vcpu) / [`run_once`](crate::kvm::run_once): run a [`VcpuFd`](kvm_ioctls::VcpuFd),
//!   dispatch `KVM_EXIT_IO` on the [`Pio`](crate::BusKind::Pio) bus and
//!   `KVM_EXIT_MMIO` on the [`Mmio`](crate::BusKind::Mmio) bus, one SRCU
//!   read section per exit (never held across `KVM_RUN`), string I/O as
//!   `count` accesses of `size` bytes in order, all-ones for unhandled
//!   reads, dropped unhandled writes, per-vCPU [`VcpuStats`](crate::kvm::VcpuStats);
//!   a device handler that panics is caught and reported as
//!   [`VmExit::DevicePanicked`](crate::kvm::VmExit::DevicePanicked), and the
//!   vCPU can go on.
//!
//! With the `test-vm` feature (off by default; it implies `kvm`), test and
//! demo tools that are not part of a VMM's API:
//!
#![cfg_attr(
    feature = "test-vm",
    doc = "* [`MiniVm`](crate::kvm::MiniVm): a minimal long-mode VM (memory, page tables, guest code,"
)]
#![cfg_attr(
    not(feature = "test-vm"),
    doc = "* `MiniVm`: a minimal long-mode VM (memory, page tables, guest code,"
)]
//!   N vCPUs) for demos, tests and benchmarks, with a typed error when
//!   `/dev/kvm` is missing or not accessible.
#![cfg_attr(
    feature = "test-vm",
    doc = "* [`Asm`](crate::kvm::Asm): a tiny x86-64 code emitter to write guest code in Rust."
)]
#![cfg_attr(
    not(feature = "test-vm"),
    doc = "* `Asm`: a tiny x86-64 code emitter to write guest code in Rust."
)]
//!
//! A VMM's vCPU thread, in full (the VM is a `MiniVm`, so this example is
//! built with the `test-vm` feature only):
//!
#![cfg_attr(feature = "test-vm", doc = "```no_run")]
#![cfg_attr(not(feature = "test-vm"), doc = "```ignore")]
//! use kvm_bus::kvm::{run_vcpu, MiniVm, VcpuStats, VmExit, Asm, Reg, Width};
//! use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
//! use std::sync::Arc;
//!
//! struct Serial;
//! impl IoDevice for Serial {
//!     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
//!     fn write(&self, _: Access, data: &[u8]) -> WriteResult {
//!         print!("{}", data[0] as char);
//!         Ok(None)
//!     }
//! }
//!
//! let mut a = Asm::new();
//! a.mov_imm(Reg::Rdx, 0x3f8);
//! a.mov_imm(Reg::Rax, u64::from(b'!'));
//! a.out_dx(Width::B1);
//! a.hlt();
//! let mut vm = MiniVm::builder().code(&a.finish()).build()?;
//!
//! let buses = Buses::new();
//! let mut slots = buses.lock_slots();
//! buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x3f8, 8)?, Arc::new(Serial))?;
//! drop(slots);
//!
//! let stats = VcpuStats::new();
//! let mut vcpu = vm.take_vcpus().remove(0);
//! assert_eq!(run_vcpu(&mut vcpu, &buses, &stats)?, VmExit::Hlt);
//! assert_eq!(stats.snapshot().handled, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "test-vm")]
mod error;
mod exit;
#[cfg(feature = "test-vm")]
pub mod guest;
mod stats;
#[cfg(feature = "test-vm")]
mod vm;

#[cfg(feature = "test-vm")]
pub use error::VmError;
pub use exit::{dispatch_kvm_run, run_once, run_vcpu, DevicePanic, RunDispatch, VmExit};
#[cfg(feature = "test-vm")]
pub use guest::{Asm, Cond, Label, Reg, Width, CODE_ADDR, DATA_ADDR};
pub use stats::{Latency, StatsSnapshot, VcpuStats};
#[cfg(feature = "test-vm")]
pub use vm::{
    timed, GuestMemory, IoeventfdTiming, MiniVm, MiniVmBuilder, DEFAULT_MEM_SIZE, MAX_VCPUS,
    STACK_SIZE,
};
