//! Porting devices from the Rust VMMs: the few lines it takes to register
//! a device written for cloud-hypervisor, Firecracker, crosvm or rust-vmm's
//! vm-device on these buses, unchanged.
//!
//! What the handlers get, compared:
//!
//! | VMM | device trait | a handler receives | `&self`/`&mut self` | write returns |
//! |---|---|---|---|---|
//! | kvm-bus | [`IoDevice`](crate::IoDevice) / [`MutIoDevice`](crate::MutIoDevice) | [`Access`](crate::Access) (`base`, `offset`, `vcpu`), data | both | [`Completion`](crate::Completion) or [`Declined`](crate::Declined) |
//! | cloud-hypervisor | `BusDevice` (and `BusDeviceSync`) | `base`, `offset`, data | `&mut self` (`&self`) | `Option<Arc<Barrier>>` |
//! | Firecracker | `BusDevice` | `base`, `offset`, data | `&mut self` | `Option<Arc<Barrier>>` (recent versions) |
//! | crosvm | `BusDevice` | `BusAccessInfo { offset, address, id }`, data | `&mut self` | nothing |
//! | vm-device 0.1 | `DevicePio`/`DeviceMmio` (+ `Mut*`) | `base`, `offset`, data | both | nothing |
//!
//! Before this shape, handlers received the absolute address only (`addr`);
//! [`Access::addr`](crate::Access::addr) still gives it. None of the Rust
//! VMM buses can *decline* an access (the kernel's `-EOPNOTSUPP`, so that
//! the next device covering the address gets it); the wrappers below
//! accept every access, as those buses do.
//!
//! Each wrapper is a newtype because the device trait belongs to the VMM
//! and [`IoDevice`](crate::IoDevice) to this crate (Rust's orphan rule);
//! it is written once per VMM, not once per device.
//!
//! # cloud-hypervisor / Firecracker `BusDevice`
//!
//! Both hand the device `(base, offset)` and let a write return a barrier
//! for the vCPU, which kvm-bus waits for after the read section (waiting
//! inside would stall every unregister):
//!
//! ```
//! use kvm_bus::{Access, Buses, BusKind, Completion, Declined, IoRange, MutIoDevice, WriteResult};
//! use std::sync::{Arc, Barrier, Mutex};
//!
//! // The VMM's trait, as in cloud-hypervisor's vm-device/src/bus.rs (and,
//! // with `read` returning nothing too, Firecracker's).
//! pub trait BusDevice: Send {
//!     fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
//!     fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>>;
//! }
//!
//! // The port: once per VMM.
//! pub struct ChDevice<D>(pub D);
//! impl<D: BusDevice> MutIoDevice for ChDevice<D> {
//!     fn read(&mut self, a: Access, data: &mut [u8]) -> Result<(), Declined> {
//!         self.0.read(a.base, a.offset, data);
//!         Ok(())
//!     }
//!     fn write(&mut self, a: Access, data: &[u8]) -> WriteResult {
//!         Ok(self.0.write(a.base, a.offset, data).map(Completion::from))
//!     }
//! }
//!
//! // An existing device, unchanged.
//! struct Rtc { index: u8 }
//! impl BusDevice for Rtc {
//!     fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) { data[0] = if offset == 0 { self.index } else { 0x42 }; }
//!     fn write(&mut self, _: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
//!         if offset == 0 { self.index = data[0]; }
//!         None
//!     }
//! }
//!
//! let buses = Buses::new();
//! let mut slots = buses.lock_slots();
//! buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x70, 2)?, Arc::new(Mutex::new(ChDevice(Rtc { index: 0 }))))?;
//! drop(slots);
//! let mut v = [0];
//! buses.read(BusKind::Pio, 0x71, &mut v)?;
//! assert_eq!(v, [0x42]);
//! # Ok::<(), kvm_bus::BusError>(())
//! ```
//!
//! A cloud-hypervisor `BusDeviceSync` (`&self`) maps the same way onto
//! [`IoDevice`](crate::IoDevice), without the `Mutex`.
//!
//! # crosvm `BusDevice`
//!
//! crosvm passes a `BusAccessInfo` with the offset, the absolute address
//! and the vCPU id, all of which [`Access`](crate::Access) carries:
//!
//! ```
//! use kvm_bus::{Access, Buses, BusKind, Declined, IoRange, MutIoDevice, WriteResult};
//! use std::sync::{Arc, Mutex};
//!
//! pub struct BusAccessInfo { pub offset: u64, pub address: u64, pub id: usize }
//! pub trait BusDevice: Send {
//!     fn read(&mut self, info: BusAccessInfo, data: &mut [u8]);
//!     fn write(&mut self, info: BusAccessInfo, data: &[u8]);
//! }
//!
//! pub struct Crosvm<D>(pub D);
//! fn info(a: Access) -> BusAccessInfo {
//!     BusAccessInfo { offset: a.offset, address: a.addr(), id: a.vcpu.map_or(0, |v| v as usize) }
//! }
//! impl<D: BusDevice> MutIoDevice for Crosvm<D> {
//!     fn read(&mut self, a: Access, data: &mut [u8]) -> Result<(), Declined> {
//!         self.0.read(info(a), data);
//!         Ok(())
//!     }
//!     fn write(&mut self, a: Access, data: &[u8]) -> WriteResult {
//!         self.0.write(info(a), data);
//!         Ok(None)
//!     }
//! }
//!
//! struct Debugcon(Vec<u8>);
//! impl BusDevice for Debugcon {
//!     fn read(&mut self, _: BusAccessInfo, data: &mut [u8]) { data.fill(0xe9); }
//!     fn write(&mut self, _: BusAccessInfo, data: &[u8]) { self.0.extend_from_slice(data); }
//! }
//!
//! let buses = Buses::new();
//! let con = Arc::new(Mutex::new(Crosvm(Debugcon(Vec::new()))));
//! let mut slots = buses.lock_slots();
//! buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0xe9, 1)?, con.clone())?;
//! drop(slots);
//! buses.write(BusKind::Pio, 0xe9, b"A")?;
//! assert_eq!(con.lock().unwrap().0 .0, b"A");
//! # Ok::<(), kvm_bus::BusError>(())
//! ```
//!
//! # rust-vmm vm-device
//!
//! No wrapper to write: with the `vm-device` feature,
//! `kvm_bus::rust_vmm::{Pio, Mmio}` take any `DevicePio`/`DeviceMmio`, and
//! `Pio::locked`/`Mmio::locked` any `MutDevicePio`/`MutDeviceMmio`:
//!
//! ```text
//! buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x3f8, 8)?, Arc::new(Pio::locked(serial)))?;
//! ```
//!
//! (compiled in `kvm_bus::rust_vmm`'s documentation, which needs the
//! feature).
