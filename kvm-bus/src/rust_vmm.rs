//! Adapters for devices written against rust-vmm's
//! [vm-device](https://docs.rs/vm-device/0.1) traits (feature `vm-device`).
//!
//! * [`Pio`] puts a [`DevicePio`] on the PIO bus, [`Mmio`] a [`DeviceMmio`]
//!   on an MMIO bus. vm-device hands a device `(base, offset, data)`, as
//!   kvm-bus does ([`Access`]), so the adapter only converts the address
//!   types.
//! * The `&mut self` twins (`MutDevicePio`, `MutDeviceMmio`) go through
//!   vm-device's own `impl DevicePio for Mutex<T: MutDevicePio>`:
//!   [`Pio::locked`] / [`Mmio::locked`] build `Pio(Mutex::new(device))`
//!   (one lock per device, taken inside the read section).
//!
//! vm-device devices cannot decline an access (their methods return
//! nothing), so the adapters accept every access they get, and a device
//! registered over another one shadows it.
//!
//! ```
//! use kvm_bus::rust_vmm::Pio;
//! use kvm_bus::{Buses, BusKind, IoRange};
//! use std::sync::Arc;
//! use vm_device::bus::{PioAddress, PioAddressOffset};
//! use vm_device::MutDevicePio;
//!
//! /// Written for vm-device only: knows nothing of kvm-bus.
//! #[derive(Default)]
//! struct PostCode(Vec<u8>);
//! impl MutDevicePio for PostCode {
//!     fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
//!         data.fill(*self.0.last().unwrap_or(&0));
//!     }
//!     fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, data: &[u8]) {
//!         self.0.push(data[0]);
//!     }
//! }
//!
//! let buses = Buses::new();
//! let mut slots = buses.lock_slots();
//! buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x80, 1)?, Arc::new(Pio::locked(PostCode::default())))?;
//! drop(slots);
//! buses.write(BusKind::Pio, 0x80, &[0x42])?;
//! let mut b = [0];
//! buses.read(BusKind::Pio, 0x80, &mut b)?;
//! assert_eq!(b, [0x42]);
//! # Ok::<(), kvm_bus::BusError>(())
//! ```

use crate::device::{Access, Declined, IoDevice, WriteResult};
use std::sync::Mutex;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{DeviceMmio, DevicePio, MutDeviceMmio, MutDevicePio};

/// A vm-device [`DevicePio`] as an [`IoDevice`], for the PIO bus.
#[derive(Debug, Default)]
pub struct Pio<D>(pub D);

impl<D: MutDevicePio> Pio<Mutex<D>> {
    /// A vm-device `MutDevicePio` behind its own lock.
    pub fn locked(device: D) -> Self {
        Pio(Mutex::new(device))
    }
}

impl<D: DevicePio + Send + Sync> IoDevice for Pio<D> {
    #[inline]
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        let (base, offset) = pio_address(access)?;
        self.0.pio_read(base, offset, data);
        Ok(())
    }

    #[inline]
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        let (base, offset) = pio_address(access)?;
        self.0.pio_write(base, offset, data);
        Ok(None)
    }
}

/// Ports are 16 bits; the PIO bus refuses ranges past 0xffff, so this only
/// declines a `Pio` wrongly registered on an MMIO bus at a high address.
#[inline]
fn pio_address(access: Access) -> Result<(PioAddress, u16), Declined> {
    match (u16::try_from(access.base), u16::try_from(access.offset)) {
        (Ok(base), Ok(offset)) => Ok((PioAddress(base), offset)),
        _ => Err(Declined),
    }
}

/// A vm-device [`DeviceMmio`] as an [`IoDevice`], for an MMIO bus.
#[derive(Debug, Default)]
pub struct Mmio<D>(pub D);

impl<D: MutDeviceMmio> Mmio<Mutex<D>> {
    /// A vm-device `MutDeviceMmio` behind its own lock.
    pub fn locked(device: D) -> Self {
        Mmio(Mutex::new(device))
    }
}

impl<D: DeviceMmio + Send + Sync> IoDevice for Mmio<D> {
    #[inline]
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.0
            .mmio_read(MmioAddress(access.base), access.offset, data);
        Ok(())
    }

    #[inline]
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        self.0
            .mmio_write(MmioAddress(access.base), access.offset, data);
        Ok(None)
    }
}
