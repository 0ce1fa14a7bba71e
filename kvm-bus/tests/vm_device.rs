//! Devices written against rust-vmm's vm-device 0.1 traits only, registered
//! unchanged through `kvm_bus::rust_vmm` (feature `vm-device`).
#![cfg(feature = "vm-device")]

use kvm_bus::rust_vmm::{Mmio, Pio};
use kvm_bus::{BusKind, Buses, IoRange};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio, MutDeviceMmio, MutDevicePio};

fn r(addr: u64, len: u64) -> IoRange {
    IoRange::new(addr, len).unwrap()
}

/// `&self` PIO device: remembers the last (base, offset, value) written.
#[derive(Default)]
struct Latch(AtomicU64);

impl DevicePio for Latch {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill((base.0 as u8).wrapping_add(offset as u8));
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.0.store(
            (u64::from(base.0) << 32) | (u64::from(offset) << 8) | u64::from(data[0]),
            SeqCst,
        );
    }
}

/// `&mut self` PIO device: an i8042-like pair of ports.
#[derive(Default)]
struct Kbd {
    cmds: Vec<(u16, u16, u8)>,
}

impl MutDevicePio for Kbd {
    fn pio_read(&mut self, base: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data[0] = if base.0 == 0x64 { 0x1c } else { 0xfa };
    }
    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.cmds.push((base.0, offset, data[0]));
    }
}

/// `&self` MMIO device: a register file.
struct Regs([AtomicU64; 4]);

impl DeviceMmio for Regs {
    fn mmio_read(&self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = self.0[(offset / 8) as usize].load(SeqCst).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }
    fn mmio_write(&self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.0[(offset / 8) as usize].store(u64::from_le_bytes(v), SeqCst);
    }
}

/// `&mut self` MMIO device.
#[derive(Default)]
struct Scratch(Vec<(u64, u64, Vec<u8>)>);

impl MutDeviceMmio for Scratch {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(self.0.len() as u8);
    }
    fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.push((base.0, offset, data.to_vec()));
    }
}

#[test]
fn vm_device_devices_register_unchanged() {
    let buses = Buses::new_fast();
    let latch = Arc::new(Pio(Latch::default()));
    let kbd = Arc::new(Pio::locked(Kbd::default()));
    let regs = Arc::new(Mmio(Regs(Default::default())));
    let scratch = Arc::new(Mmio::locked(Scratch::default()));
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x80, 4), latch.clone())
        .unwrap();
    buses
        .register_many(
            &mut slots,
            BusKind::Pio,
            [
                (r(0x60, 1), kbd.clone() as _),
                (r(0x64, 1), kbd.clone() as _),
            ],
        )
        .unwrap();
    buses
        .register_dev(&mut slots, BusKind::Mmio, r(0xd000_0000, 32), regs.clone())
        .unwrap();
    buses
        .register_dev(
            &mut slots,
            BusKind::Mmio,
            r(0xe000_0000, 0x1000),
            scratch.clone(),
        )
        .unwrap();
    drop(slots);

    buses.write(BusKind::Pio, 0x82, &[0x55]).unwrap();
    assert_eq!(latch.0 .0.load(SeqCst), (0x80 << 32) | (2 << 8) | 0x55);
    let mut b = [0u8; 2];
    buses.read(BusKind::Pio, 0x81, &mut b).unwrap();
    assert_eq!(b, [0x81; 2]);

    buses.write(BusKind::Pio, 0x64, &[0xfe]).unwrap();
    buses.write(BusKind::Pio, 0x60, &[0xf4]).unwrap();
    let mut s = [0u8];
    buses.read(BusKind::Pio, 0x64, &mut s).unwrap();
    assert_eq!(s, [0x1c]);
    assert_eq!(
        kbd.0.lock().unwrap().cmds,
        [(0x64, 0, 0xfe), (0x60, 0, 0xf4)]
    );

    buses
        .write(BusKind::Mmio, 0xd000_0008, &0x1122_3344u32.to_le_bytes())
        .unwrap();
    let mut w = [0u8; 4];
    buses.read(BusKind::Mmio, 0xd000_0008, &mut w).unwrap();
    assert_eq!(u32::from_le_bytes(w), 0x1122_3344);

    buses
        .write(BusKind::Mmio, 0xe000_0ffc, &[1, 2, 3, 4])
        .unwrap();
    assert_eq!(
        scratch.0.lock().unwrap().0,
        [(0xe000_0000, 0xffc, vec![1, 2, 3, 4])]
    );
    // Removal works as for any device: the buses let go.
    let d: Arc<dyn kvm_bus::IoDevice> = scratch.clone();
    let mut slots = buses.lock_slots();
    buses.unregister_dev(&mut slots, BusKind::Mmio, &d).unwrap();
    drop((slots, d));
    assert_eq!(Arc::strong_count(&scratch), 1);
    let _: &Mutex<Scratch> = &scratch.0;
}
