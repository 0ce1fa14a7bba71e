//! Devices written against rust-vmm's vm-device 0.1 traits only (a
//! `MutDevicePio` and a `DeviceMmio`), registered unchanged through
//! `kvm_bus::rust_vmm` and driven by a real guest, in both flavors.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use kvm_bus::kvm::{Asm, MiniVm, Reg, Width, DATA_ADDR};
use kvm_bus::rust_vmm::{Mmio, Pio};
use kvm_bus::{BusKind, Buses, Classic, Fast, Flavor, IoRange};
use tests::vm::{kvm_or_skip, run_single};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, MutDevicePio};

const POST: u64 = 0x80;
const REGS: u64 = 0xd000_0000;

/// A POST-code port as a plain `&mut self` vm-device device: remembers
/// what it was given, with the base and offset it saw.
#[derive(Default)]
struct PostCode {
    codes: Vec<(u16, u16, u8)>,
}

impl MutDevicePio for PostCode {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(self.codes.last().map_or(0, |c| c.2));
    }
    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.codes.push((base.0, offset, data[0]));
    }
}

/// Four 64-bit registers as a `&self` vm-device MMIO device.
#[derive(Default)]
struct Regs([AtomicU64; 4]);

impl DeviceMmio for Regs {
    fn mmio_read(&self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = self.0[(offset / 8) as usize % 4].load(SeqCst).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }
    fn mmio_write(&self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.0[(offset / 8) as usize % 4].store(u64::from_le_bytes(v), SeqCst);
    }
}

fn vm_device_devices_on_a_real_vm<F: Flavor>() {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    // POST codes 0x11, 0x22 at 0x80 and 0x81; read the last one back.
    for (port, code) in [(POST, 0x11u64), (POST + 1, 0x22)] {
        a.mov_imm(Reg::Rdx, port);
        a.mov_imm(Reg::Rax, code);
        a.out_dx(Width::B1);
    }
    a.mov_imm(Reg::Rax, 0);
    a.mov_imm(Reg::Rdx, POST);
    a.in_dx(Width::B1);
    a.store(Width::B8, Reg::Rbp, 0, Reg::Rax);
    // MMIO: write register 2 (8 bytes), read it back (4 bytes at +4).
    a.mov_imm(Reg::Rdi, REGS);
    a.mov_imm(Reg::Rax, 0x1122_3344_5566_7788);
    a.store(Width::B8, Reg::Rdi, 16, Reg::Rax);
    a.mov_imm(Reg::Rax, 0);
    a.load(Width::B8, Reg::Rax, Reg::Rdi, 16);
    a.store(Width::B8, Reg::Rbp, 8, Reg::Rax);
    a.hlt();
    let mut vm = MiniVm::builder().code(&a.finish()).build().unwrap();
    let buses = Buses::<F>::default();
    let post = Arc::new(Pio::locked(PostCode::default()));
    let regs = Arc::new(Mmio(Regs::default()));
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(
                &mut slots,
                BusKind::Pio,
                IoRange::new(POST, 2).unwrap(),
                post.clone(),
            )
            .unwrap();
        buses
            .register_dev(
                &mut slots,
                BusKind::Mmio,
                IoRange::new(REGS, 32).unwrap(),
                regs.clone(),
            )
            .unwrap();
    }
    let stats = run_single(&mut vm, &buses);
    assert_eq!(stats.unhandled(), 0, "{stats:?}");
    assert_eq!(
        post.0.lock().unwrap().codes,
        [(0x80, 0, 0x11), (0x80, 1, 0x22)]
    );
    let mem = vm.memory();
    assert_eq!(mem.read_u64(DATA_ADDR), 0x22);
    assert_eq!(mem.read_u64(DATA_ADDR + 8), 0x1122_3344_5566_7788);
    assert_eq!(regs.0 .0[2].load(SeqCst), 0x1122_3344_5566_7788);
}

#[test]
fn vm_device_devices_on_a_real_vm_classic() {
    let Some(_kvm) = kvm_or_skip("vm_device_devices_on_a_real_vm_classic") else {
        return;
    };
    vm_device_devices_on_a_real_vm::<Classic>();
}

#[test]
fn vm_device_devices_on_a_real_vm_fast() {
    let Some(_kvm) = kvm_or_skip("vm_device_devices_on_a_real_vm_fast") else {
        return;
    };
    vm_device_devices_on_a_real_vm::<Fast>();
}
