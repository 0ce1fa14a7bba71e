//! KVM-style I/O buses on SRCU, for a userspace VMM.
//!
//! A VM has one table of devices per bus ([`BusKind`]: MMIO, PIO, fast
//! MMIO). vCPU threads look a device up on every exit; VMM threads add and
//! remove devices while vCPUs run. This crate is the design of Linux's
//! `virt/kvm/kvm_main.c` I/O buses as of Linux 6.18 ("KVM: Implement
//! barriers before accessing kvm->buses[] on SRCU read paths" and its
//! series), with the kernel's lockdep rules turned into types:
//!
//! * an [`IoBus`] is an immutable sorted array of `(range, device)`;
//!   updates build a new one and publish it in an [`srcu::SrcuCell`];
//! * [`Buses`] holds the three cells, the VM's [`Srcu`] domain, and the
//!   slots lock that serialises updates.
//!
//! # The three accessors
//!
//! **[`Buses::get_bus`]** (update side, `kvm_get_bus`): needs a
//! [`SlotsGuard`], the proof that the slots lock is held, and the
//! reference cannot outlive it. A reader has no such guard, so it cannot
//! get a long-term reference this way. A guard of another VM's `Buses`
//! panics (a checked id, not a branded lifetime).
//!
//! ```
//! use kvm_bus::{Buses, BusKind};
//! let buses = Buses::new();
//! let slots = buses.lock_slots();
//! let bus = buses.get_bus(&slots, BusKind::Mmio);
//! assert!(bus.is_empty());
//! ```
//!
//! **[`Buses::get_bus_srcu`]** (read side, `kvm_get_bus_srcu`): needs a
//! [`ReadGuard`]; orders the thread's earlier loads before the load of the
//! bus pointer (an acquire fence, as the seed's `smp_rmb()`: free on
//! x86_64 in both the [`Classic`] and the [`Fast`] flavor; the kernel's
//! `smp_mb__after_srcu_read_lock()`, [`ReadGuard::mb_after_read_lock`], is
//! left to callers that need store-to-load order) and dereferences. The reference cannot outlive the read
//! section. [`Buses::read`] and [`Buses::write`] wrap it with a section of
//! their own.
//!
//! ```
//! use kvm_bus::{Buses, BusKind};
//! let buses = Buses::new();
//! let guard = buses.read_lock();
//! let bus = buses.get_bus_srcu(&guard, BusKind::Pio);
//! assert!(bus.write(0x3f8, &[b'A']).is_err()); // no UART registered
//! ```
//!
//! **[`Buses::get_bus_for_destruction`]** (teardown,
//! `kvm_get_bus_for_destruction`): `&mut self`, so no reader and no updater
//! can exist.
//!
//! ```
//! use kvm_bus::{Buses, BusKind};
//! let mut buses = Buses::new();
//! for kind in BusKind::ALL {
//!     assert!(buses.get_bus_for_destruction(kind).is_empty());
//!     let devices = buses.take_devices(kind); // and the counts the bus held
//!     assert!(devices.is_empty());
//! }
//! ```
//!
//! The compiler enforces the first two (the crate's `tests/ui` shows the
//! rejected programs): `get_bus` without a `SlotsGuard`, or with a
//! `ReadGuard` in its place, does not compile, and neither does keeping a
//! bus reference past its guard, nor keeping a bus or device reference from
//! `get_bus` across an update made with the same guard (updates borrow the
//! guard mutably).
//!
//! # The guarantees
//!
//! **Observation.** If a vCPU thread has observed that a registration
//! happened, through any read at all, including a plain load of guest
//! memory that the VMM wrote after [`Buses::register_dev`] returned, then
//! an access it dispatches afterwards through `get_bus_srcu` sees the new
//! device. `register_dev` ends with a release fence after the publish, and
//! `get_bus_srcu` orders the thread's earlier loads before its load of the
//! bus pointer (an acquire fence: free on x86_64, `dmb ishld` on arm64;
//! the litmus argument is next to the code). This is the message-passing
//! pattern, so it needs no full fence, in either flavor.
//!
//! ```
//! use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
//! use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
//! use std::sync::Arc;
//!
//! struct Uart;
//! impl IoDevice for Uart {
//!     fn read(&self, _: Access, d: &mut [u8]) -> Result<(), Declined> { d.fill(0x60); Ok(()) }
//!     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
//! }
//!
//! let buses = Buses::new_fast();
//! let guest_memory_flag = AtomicBool::new(false);
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         let mut slots = buses.lock_slots();
//!         buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x3f8, 8).unwrap(), Arc::new(Uart)).unwrap();
//!         guest_memory_flag.store(true, Relaxed); // e.g. the guest is told
//!     });
//!     s.spawn(|| {
//!         // vCPU: saw the flag, then traps on the port.
//!         if guest_memory_flag.load(Relaxed) {
//!             let guard = buses.read_lock();
//!             let mut lsr = [0];
//!             buses.get_bus_srcu(&guard, BusKind::Pio).read(0x3fd, &mut lsr).expect("must see the UART");
//!         }
//!     });
//! });
//! ```
//!
//! **Registration never waits** for a grace period: the old table is
//! retired, and freed by an updater once a grace period has passed
//! ([`Buses::retired_tables`]; the kernel hands it to `call_srcu`; the wait
//! it used to do was about a quarter of VM start-up time). It takes the
//! slots lock ([`Buses::lock_slots`]), which is held only for table
//! publishes: unregisters release it while they wait.
//! [`Buses::register_many`] publishes a whole batch at once.
//!
//! **Unregistration is final**: [`Buses::unregister_dev`] publishes the
//! table without the device and waits for a grace period before
//! returning; afterwards the device is never called again and the buses
//! hold no reference to it. [`Buses::unregister_many`] waits once for a
//! whole batch. Called inside a read section of the same domain (from a
//! device handler, say), where that wait could never end, both return
//! [`BusError::InReadSection`] and change nothing.
//!
//! **The guest may reconfigure the bus from a handler.** A handler runs
//! inside the read section of its access, so anything that waits for a
//! grace period would wait for itself. [`Buses::move_range`] (a PCI BAR
//! relocation) and [`Buses::start_unregister`] (an eject) do not wait:
//! the first publishes the device at its new range in one table (never at
//! neither), the second unpublishes at once and returns a [`Removal`] that
//! completes after a grace period and can be waited for, polled, or
//! notified from a VMM thread. And the slots lock they need is never held
//! across a grace period: the blocking unregisters release it while they
//! wait. (Firecracker and cloud-hypervisor both hit this deadlock once
//! their bus removal started waiting for in-flight accesses.)
//!
//! # The update operations and their kernel counterparts
//!
//! | kvm-bus | Linux (`virt/kvm/kvm_main.c`) | waits for a grace period |
//! |---|---|---|
//! | [`Buses::register_dev`] | `kvm_io_bus_register_dev`: one entry | no |
//! | [`Buses::register_many`] | a loop of `kvm_io_bus_register_dev`, one publish | no |
//! | [`Buses::unregister_range`] | `kvm_io_bus_unregister_dev`: removes one entry | yes (expedited, as Linux), slots lock released meanwhile |
//! | [`Buses::unregister_dev`] | `kvm_io_bus_unregister_dev` until the device has no entry left | yes, once |
//! | [`Buses::unregister_many`] | that, for several devices | yes, once for all |
//! | [`Buses::start_unregister`] (`_many`, `_range`) | no counterpart (KVM's own devices are removed with the VM) | no: the [`Removal`] completes later |
//! | [`Buses::move_range`] | no counterpart (unregister + register, two publishes and a grace period) | no |
//! | [`Buses::get_bus`] / [`Buses::get_bus_srcu`] / [`Buses::get_bus_for_destruction`] | `kvm_get_bus` / `kvm_get_bus_srcu` / `kvm_get_bus_for_destruction` | no |
//!
//! Ranges: a PIO range must end at or below port `0xffff`
//! ([`BusError::OutsideBus`]); a zero-length range is refused
//! ([`BusError::ZeroLength`], which says why); overlapping ranges are
//! accepted unless the bus was told to refuse them
//! ([`Buses::set_reject_overlaps`]). Dispatch among overlapping ranges
//! tries the most specific first ([`IoBus`] has the rule and Linux's
//! example).
//!
//! **Bad input changes nothing**: every update-side error returns a
//! [`BusError`] and leaves the published bus as it was; dispatch never
//! panics on guest-controlled addresses or lengths. A device handler that
//! panics ends its read section while unwinding; the buses stay usable.
//!
//! # Cargo features
//!
//! * none: the buses ([`Buses`], [`IoBus`], [`IoDevice`], [`IoRange`],
//!   [`BusError`], [`Removal`]), on any target; depends on `srcu` only.
//! * `kvm` (default): the `kvm` module, the `kvm-ioctls` vCPU-exit adapter
//!   (`kvm::run_vcpu`, `kvm::run_once`, `kvm::VmExit`, `kvm::VcpuStats`).
//!   Linux x86_64 only: elsewhere the feature enables nothing.
//! * `vm-device` (off): the `rust_vmm` module, adapters (`rust_vmm::Pio`,
//!   `rust_vmm::Mmio`) for devices written against rust-vmm's vm-device
//!   0.1 traits.
//! * `test-vm` (off; implies `kvm`): test and demo tools, not part of a
//!   VMM's API: `kvm::MiniVm` (a minimal long-mode VM: guest memory, page
//!   tables, N vCPUs, `IoeventfdTiming`, `timed`) and `kvm::Asm` (an x86-64
//!   emitter for guest code). Tests, benchmarks and the `vm_demo` example
//!   enable it.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod bus;
mod buses;
mod device;
mod error;
mod key_index;
mod kind;
mod range;
mod removal;
mod retired;

pub use bus::IoBus;
pub use buses::{Buses, SlotsGuard};
pub use device::{Access, Completion, Declined, IoDevice, MutIoDevice, WriteResult};
pub use error::BusError;
pub use kind::BusKind;
pub use range::IoRange;
pub use removal::Removal;
pub use retired::RetiredTables;
pub use srcu::{Classic, Fast, Flavor, ReadGuard, Srcu};

/// Default cap on the entries of one bus (Linux `NR_IOBUS_DEVS`); see
/// [`Buses::with_srcu`] for another.
pub const MAX_IO_BUS_DEVICES: usize = 1000;

/// Longest access dispatch accepts, in bytes.
pub const MAX_ACCESS_LEN: usize = 8;

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod porting;
#[cfg(feature = "vm-device")]
pub mod rust_vmm;

/// The kvm-ioctls vCPU-exit adapter (issue 5).
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
