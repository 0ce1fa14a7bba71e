//! Real-KVM tests of the vCPU-exit adapter and the buses (issue 5).
//!
//! Guests run in 64-bit long mode (see `kvm_bus::kvm::MiniVm`), so 8-byte
//! MMIO accesses are plain `mov [rdi], rax` / `mov rax, [rdi]`. Port I/O
//! is 1, 2 or 4 bytes (x86 has no 8-byte `in`/`out`).
//!
//! Every test gates on `kvm_or_skip`: with `KVM_REQUIRED=1` an unusable
//! `/dev/kvm` fails the test; otherwise it prints `SKIPPED` and passes.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bus::kvm::{Asm, Cond, MiniVm, Reg, VmExit, Width, DATA_ADDR};
use kvm_bus::{Access, BusKind, Buses, Declined, Flavor, IoDevice, IoRange, WriteResult};
use tests::vm::{
    kvm_or_skip, pattern, run_all, run_single, wait_for, Counter, Doorbell, Logged, Recorder,
};

const PORT: u64 = 0x500;
const MMIO: u64 = 0xd000_0000;
const UNMAPPED_PORT: u64 = 0x600;
const UNMAPPED_MMIO: u64 = 0xe000_0000;
/// Results area the guest stores into, relative to DATA_ADDR.
const RES: i32 = 0x1000;
/// Source buffer of string output, relative to DATA_ADDR.
const SRC: i32 = 0x2000;

fn reg(buses: &Buses<impl Flavor>, kind: BusKind, addr: u64, len: u64, dev: Arc<dyn IoDevice>) {
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, kind, IoRange::new(addr, len).unwrap(), dev)
        .unwrap();
}

fn read(addr: u64, len: usize, seq: usize) -> Logged {
    Logged::Read {
        addr,
        data: pattern(seq, len),
    }
}

fn write(addr: u64, data: &[u8]) -> Logged {
    Logged::Write {
        addr,
        data: data.to_vec(),
    }
}

/// Loads `[rbp + RES + off]`-relative results with a width, zeroing rax
/// first so narrow loads leave no garbage.
fn in_and_store(a: &mut Asm, port: u64, w: Width, off: i32) {
    a.mov_imm(Reg::Rax, 0);
    a.mov_imm(Reg::Rdx, port);
    a.in_dx(w);
    a.store(w, Reg::Rbp, RES + off, Reg::Rax);
}

fn load_and_store(a: &mut Asm, disp: i32, w: Width, off: i32) {
    a.mov_imm(Reg::Rax, 0);
    a.load(w, Reg::Rax, Reg::Rdi, disp);
    a.store(w, Reg::Rbp, RES + off, Reg::Rax);
}

#[test]
fn vm_pio_mmio_widths_and_string_io() {
    let Some(_kvm) = kvm_or_skip("vm_pio_mmio_widths_and_string_io") else {
        return;
    };
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    // PIO writes 1/2/4 at three ports of the device.
    a.mov_imm(Reg::Rdx, PORT);
    a.mov_imm(Reg::Rax, 0x11);
    a.out_dx(Width::B1);
    a.mov_imm(Reg::Rdx, PORT + 2);
    a.mov_imm(Reg::Rax, 0x2233);
    a.out_dx(Width::B2);
    a.mov_imm(Reg::Rdx, PORT + 4);
    a.mov_imm(Reg::Rax, 0x4455_6677);
    a.out_dx(Width::B4);
    // PIO reads 1/2/4.
    in_and_store(&mut a, PORT + 1, Width::B1, 0);
    in_and_store(&mut a, PORT + 2, Width::B2, 8);
    in_and_store(&mut a, PORT + 4, Width::B4, 16);
    // MMIO writes 1/2/4/8.
    a.mov_imm(Reg::Rdi, MMIO);
    a.mov_imm(Reg::Rax, 0x88);
    a.store(Width::B1, Reg::Rdi, 1, Reg::Rax);
    a.mov_imm(Reg::Rax, 0x99aa);
    a.store(Width::B2, Reg::Rdi, 2, Reg::Rax);
    a.mov_imm(Reg::Rax, 0xbbcc_ddee);
    a.store(Width::B4, Reg::Rdi, 4, Reg::Rax);
    a.mov_imm(Reg::Rax, 0x0102_0304_0506_0708);
    a.store(Width::B8, Reg::Rdi, 8, Reg::Rax);
    // MMIO reads 1/2/4/8.
    load_and_store(&mut a, 0x11, Width::B1, 24);
    load_and_store(&mut a, 0x12, Width::B2, 32);
    load_and_store(&mut a, 0x14, Width::B4, 40);
    load_and_store(&mut a, 0x18, Width::B8, 48);
    // rep outsb: 7 bytes to PORT+6; rep outsw: 3 words to PORT+4.
    a.mov_imm(Reg::Rsi, DATA_ADDR + SRC as u64);
    a.mov_imm(Reg::Rcx, 7);
    a.mov_imm(Reg::Rdx, PORT + 6);
    a.rep_outs(Width::B1);
    a.mov_imm(Reg::Rsi, DATA_ADDR + SRC as u64 + 0x10);
    a.mov_imm(Reg::Rcx, 3);
    a.mov_imm(Reg::Rdx, PORT + 4);
    a.rep_outs(Width::B2);
    // rep insw: 4 words from PORT+2 into RES+64; rep insd: 2 dwords from PORT+4.
    a.mov_imm(Reg::Rdi, DATA_ADDR + RES as u64 + 64);
    a.mov_imm(Reg::Rcx, 4);
    a.mov_imm(Reg::Rdx, PORT + 2);
    a.rep_ins(Width::B2);
    a.mov_imm(Reg::Rdi, DATA_ADDR + RES as u64 + 80);
    a.mov_imm(Reg::Rcx, 2);
    a.mov_imm(Reg::Rdx, PORT + 4);
    a.rep_ins(Width::B4);
    a.hlt();

    let src = b"string!\0\x01\x02\x03\x04\x05\x06\x07\x08\xa1\xa2\xb1\xb2\xc1\xc2";
    let mut vm = MiniVm::builder()
        .code(&a.finish())
        .load(DATA_ADDR + SRC as u64, src)
        .build()
        .unwrap();
    let buses = Buses::new();
    let pio = Arc::new(Recorder::default());
    let mmio = Arc::new(Recorder::default());
    reg(&buses, BusKind::Pio, PORT, 8, pio.clone());
    reg(&buses, BusKind::Mmio, MMIO, 0x1000, mmio.clone());

    let stats = run_single(&mut vm, &buses);

    let mut expect_pio = vec![
        write(PORT, &[0x11]),
        write(PORT + 2, &[0x33, 0x22]),
        write(PORT + 4, &[0x77, 0x66, 0x55, 0x44]),
        read(PORT + 1, 1, 0),
        read(PORT + 2, 2, 1),
        read(PORT + 4, 4, 2),
    ];
    expect_pio.extend(b"string!".iter().map(|b| write(PORT + 6, &[*b])));
    expect_pio.extend([
        write(PORT + 4, &[0xa1, 0xa2]),
        write(PORT + 4, &[0xb1, 0xb2]),
        write(PORT + 4, &[0xc1, 0xc2]),
    ]);
    expect_pio.extend((3..7).map(|seq| read(PORT + 2, 2, seq)));
    expect_pio.extend((7..9).map(|seq| read(PORT + 4, 4, seq)));
    assert_eq!(pio.log(), expect_pio);

    let expect_mmio = vec![
        write(MMIO + 1, &[0x88]),
        write(MMIO + 2, &[0xaa, 0x99]),
        write(MMIO + 4, &[0xee, 0xdd, 0xcc, 0xbb]),
        write(MMIO + 8, &[8, 7, 6, 5, 4, 3, 2, 1]),
        read(MMIO + 0x11, 1, 0),
        read(MMIO + 0x12, 2, 1),
        read(MMIO + 0x14, 4, 2),
        read(MMIO + 0x18, 8, 3),
    ];
    assert_eq!(mmio.log(), expect_mmio);

    // What the guest stored is what the devices put in the slice.
    let mem = vm.memory();
    let got = |off: i32, len: usize| {
        let mut b = vec![0; len];
        mem.read_bytes(DATA_ADDR + (RES + off) as u64, &mut b);
        b
    };
    assert_eq!(got(0, 1), pattern(0, 1));
    assert_eq!(got(8, 2), pattern(1, 2));
    assert_eq!(got(16, 4), pattern(2, 4));
    assert_eq!(got(24, 1), pattern(0, 1));
    assert_eq!(got(32, 2), pattern(1, 2));
    assert_eq!(got(40, 4), pattern(2, 4));
    assert_eq!(got(48, 8), pattern(3, 8));
    let insw: Vec<u8> = (3..7).flat_map(|s| pattern(s, 2)).collect();
    assert_eq!(got(64, 8), insw);
    let insd: Vec<u8> = (7..9).flat_map(|s| pattern(s, 4)).collect();
    assert_eq!(got(80, 8), insd);

    assert_eq!(stats.handled, (expect_pio.len() + expect_mmio.len()) as u64);
    assert_eq!(stats.unhandled(), 0);
    assert_eq!(stats.mmio_exits, 8);
    // 6 single + 4 string exits (KVM may split a string op, never merge).
    assert!(stats.io_exits >= 10, "{stats:?}");
}

#[test]
fn vm_unmapped_port_and_mmio_read_all_ones_and_drop_writes() {
    let Some(_kvm) = kvm_or_skip("vm_unmapped_port_and_mmio") else {
        return;
    };
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    in_and_store(&mut a, UNMAPPED_PORT, Width::B1, 0);
    in_and_store(&mut a, UNMAPPED_PORT, Width::B2, 8);
    in_and_store(&mut a, UNMAPPED_PORT, Width::B4, 16);
    a.mov_imm(Reg::Rdi, UNMAPPED_MMIO);
    load_and_store(&mut a, 0, Width::B1, 24);
    load_and_store(&mut a, 2, Width::B2, 32);
    load_and_store(&mut a, 4, Width::B4, 40);
    load_and_store(&mut a, 8, Width::B8, 48);
    // rep insb of 3 from the unmapped port.
    a.mov_imm(Reg::Rdi, DATA_ADDR + RES as u64 + 64);
    a.mov_imm(Reg::Rcx, 3);
    a.mov_imm(Reg::Rdx, UNMAPPED_PORT);
    a.rep_ins(Width::B1);
    // Writes: out 1/2/4, MMIO 4/8, then a write to a mapped device to show
    // the VM keeps running and dispatching.
    a.mov_imm(Reg::Rdx, UNMAPPED_PORT);
    a.mov_imm(Reg::Rax, 0x1234_5678);
    a.out_dx(Width::B1);
    a.out_dx(Width::B2);
    a.out_dx(Width::B4);
    a.mov_imm(Reg::Rdi, UNMAPPED_MMIO);
    a.store(Width::B4, Reg::Rdi, 0, Reg::Rax);
    a.store(Width::B8, Reg::Rdi, 8, Reg::Rax);
    a.mov_imm(Reg::Rdx, PORT);
    a.out_dx(Width::B1);
    a.store_imm32(Reg::Rbp, RES + 0x80, 0x600d);
    a.hlt();

    let mut vm = MiniVm::builder().code(&a.finish()).build().unwrap();
    let buses = Buses::new();
    let dev = Arc::new(Counter::default());
    reg(&buses, BusKind::Pio, PORT, 1, dev.clone());
    // A neighbour that must not be hit by the unmapped accesses.
    let neighbour = Arc::new(Counter::default());
    reg(
        &buses,
        BusKind::Mmio,
        UNMAPPED_MMIO + 0x10,
        8,
        neighbour.clone(),
    );

    let stats = run_single(&mut vm, &buses);
    let mem = vm.memory();
    let res = |off: i32| DATA_ADDR + (RES + off) as u64;
    assert_eq!(mem.read_u8(res(0)), 0xff);
    assert_eq!(mem.read_u16(res(8)), 0xffff);
    assert_eq!(mem.read_u32(res(16)), 0xffff_ffff);
    assert_eq!(mem.read_u8(res(24)), 0xff);
    assert_eq!(mem.read_u16(res(32)), 0xffff);
    assert_eq!(mem.read_u32(res(40)), 0xffff_ffff);
    assert_eq!(mem.read_u64(res(48)), u64::MAX);
    let mut ins = [0u8; 4];
    mem.read_bytes(res(64), &mut ins);
    assert_eq!(ins, [0xff, 0xff, 0xff, 0]);
    assert_eq!(
        mem.read_u32(res(0x80)),
        0x600d,
        "guest did not keep running"
    );
    assert_eq!(dev.hits(), 1);
    assert_eq!(dev.last.load(Ordering::SeqCst), 0x78);
    assert_eq!(neighbour.hits(), 0);
    assert_eq!(stats.unhandled_reads, 3 + 4 + 3, "{stats:?}");
    assert_eq!(stats.unhandled_writes, 3 + 2, "{stats:?}");
    assert_eq!(stats.handled, 1);
}

/// Accepts only writes of `accept`; declines every read unless `answer` is
/// set.
struct Picky {
    accept: u8,
    answer: Option<u8>,
    log: parking_lot::Mutex<Vec<u8>>,
}

impl Picky {
    fn new(accept: u8, answer: Option<u8>) -> Arc<Picky> {
        Arc::new(Picky {
            accept,
            answer,
            log: Default::default(),
        })
    }
}

impl IoDevice for Picky {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        let v = self.answer.ok_or(Declined)?;
        data.fill(v);
        Ok(())
    }
    fn write(&self, _: Access, data: &[u8]) -> WriteResult {
        if data[0] != self.accept {
            return Err(Declined);
        }
        self.log.lock().push(data[0]);
        Ok(None)
    }
}

#[test]
fn vm_string_io_count_and_declining_overlap() {
    let Some(_kvm) = kvm_or_skip("vm_string_io_count_and_declining_overlap") else {
        return;
    };
    const N: usize = 64;
    let mut a = Asm::new();
    // rep outsb of N bytes alternating AA/BB/CC to one port shared by two
    // overlapping devices.
    a.mov_imm(Reg::Rsi, DATA_ADDR + SRC as u64);
    a.mov_imm(Reg::Rcx, N as u64);
    a.mov_imm(Reg::Rdx, PORT);
    a.rep_outs(Width::B1);
    // rep insb of N: the first device declines reads, the second answers.
    a.mov_imm(Reg::Rdi, DATA_ADDR + RES as u64);
    a.mov_imm(Reg::Rcx, N as u64);
    a.mov_imm(Reg::Rdx, PORT);
    a.rep_ins(Width::B1);
    a.hlt();
    let src: Vec<u8> = (0..N).map(|i| [0xaa, 0xbb, 0xcc][i % 3]).collect();
    let mut vm = MiniVm::builder()
        .code(&a.finish())
        .load(DATA_ADDR + SRC as u64, &src)
        .build()
        .unwrap();
    let buses = Buses::new();
    // Overlapping ranges, registered in both orders relative to their
    // start: `first` covers PORT..PORT+4, `second` PORT..PORT+1.
    let first = Picky::new(0xaa, None);
    let second = Picky::new(0xbb, Some(0x42));
    reg(&buses, BusKind::Pio, PORT, 4, first.clone());
    reg(&buses, BusKind::Pio, PORT, 1, second.clone());

    let stats = run_single(&mut vm, &buses);
    let aa = src.iter().filter(|&&b| b == 0xaa).count();
    let bb = src.iter().filter(|&&b| b == 0xbb).count();
    assert_eq!(*first.log.lock(), vec![0xaa; aa]);
    assert_eq!(*second.log.lock(), vec![0xbb; bb]);
    let mut got = vec![0; N];
    vm.memory().read_bytes(DATA_ADDR + RES as u64, &mut got);
    assert_eq!(got, vec![0x42; N]);
    assert_eq!(stats.handled, (aa + bb + N) as u64);
    assert_eq!(stats.unhandled_writes, (N - aa - bb) as u64);
    assert_eq!(stats.unhandled_reads, 0);
    // 2 * N accesses in fewer exits: at least one exit carried count > 1.
    // (Linux 6.18 batches `rep ins` into one exit of count N here and
    // exits once per element for `rep outs`.)
    assert!(stats.io_exits < 2 * N as u64, "{stats:?}");
}

// ---------------------------------------------------------------------------
// Hot plug on running vCPUs.
// ---------------------------------------------------------------------------

/// Guest-memory words the VMM and guest code share (offsets from DATA_ADDR).
const FLAG: i32 = 0x0;
const ACK: i32 = 0x40;
const STOP: i32 = 0x80;
const HOT_PORT: u64 = 0x700;
const HOT_MMIO: u64 = 0xd010_0000;
const STEADY_PORT: u64 = 0x710;
const ACK_PORT: u64 = 0x720;
const HAMMER_PAUSES: u64 = 50;

fn gpa(off: i32) -> u64 {
    DATA_ADDR + off as u64
}

/// A hot-plugged device: counts writes at its base address (and checks
/// their value) separately from pokes at other offsets.
#[derive(Default)]
struct Hot {
    base: u64,
    hits: AtomicU64,
    value: AtomicU64,
    pokes: AtomicU64,
}

impl IoDevice for Hot {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        data.fill(0);
        self.pokes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        if access.addr() == self.base {
            let mut v = [0u8; 8];
            v[..data.len()].copy_from_slice(data);
            self.value.store(u64::from_le_bytes(v), Ordering::SeqCst);
            self.hits.fetch_add(1, Ordering::SeqCst);
        } else {
            self.pokes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(None)
    }
}

/// vCPU 0 waits for FLAG == round, then writes the round to HOT_PORT and
/// to HOT_MMIO, then ACK = round; `rounds` times. vCPU 1 pokes HOT_PORT+4
/// and HOT_MMIO+8 (hit or unhandled, depending on timing) and a steady
/// device until STOP.
fn ordering_guest(rounds: u32) -> (Vec<u8>, u64) {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.cmp_imm(Reg::Rbx, 0);
    let hammer = a.label();
    a.jcc(Cond::Ne, hammer);
    // vCPU 0.
    a.mov_imm(Reg::Rsi, 1);
    a.mov_imm(Reg::Rdi, HOT_MMIO);
    a.mov_imm(Reg::Rdx, HOT_PORT);
    let top = a.label();
    a.bind(top);
    a.wait_eq32(Reg::Rbp, FLAG, Reg::Rsi);
    // Odd rounds: the new PIO device; even rounds: the new MMIO device.
    a.mov_reg(Reg::Rax, Reg::Rsi);
    a.and_imm(Reg::Rax, 1);
    let even = a.label();
    let accessed = a.label();
    a.jcc(Cond::Eq, even);
    a.mov_reg(Reg::Rax, Reg::Rsi);
    a.out_dx(Width::B4);
    a.jmp(accessed);
    a.bind(even);
    a.mov_reg(Reg::Rax, Reg::Rsi);
    a.store(Width::B4, Reg::Rdi, 0, Reg::Rax);
    a.bind(accessed);
    a.store(Width::B4, Reg::Rbp, ACK, Reg::Rsi);
    a.mov_imm(Reg::Rdx, ACK_PORT);
    a.out_dx(Width::B4);
    a.mov_imm(Reg::Rdx, HOT_PORT);
    a.inc(Reg::Rsi);
    a.cmp_imm(Reg::Rsi, rounds as i32 + 1);
    a.jcc(Cond::Ne, top);
    a.hlt();
    // vCPU 1.
    a.bind(hammer);
    a.mov_imm(Reg::Rdi, HOT_MMIO);
    let again = a.label();
    a.bind(again);
    a.mov_imm(Reg::Rdx, HOT_PORT + 4);
    a.out_dx(Width::B1);
    a.store(Width::B1, Reg::Rdi, 8, Reg::Rax);
    a.mov_imm(Reg::Rdx, STEADY_PORT);
    a.out_dx(Width::B1);
    // Breathe a little between pokes so the VMM thread and vCPU 0 get the
    // two host CPUs more often (the test must also be quick on 2 cores).
    a.pause_n(HAMMER_PAUSES);
    a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
    a.jcc(Cond::Eq, again);
    a.hlt();
    (a.finish(), 0)
}

fn registration_ordering<F: Flavor>(buses: Buses<F>, rounds: u32) {
    let (code, _) = ordering_guest(rounds);
    let mut vm = MiniVm::builder().vcpus(2).code(&code).build().unwrap();
    let mem = vm.memory().clone();
    let steady = Arc::new(Counter::default());
    reg(&buses, BusKind::Pio, STEADY_PORT, 1, steady.clone());
    let ack = Arc::new(Doorbell::default());
    reg(&buses, BusKind::Pio, ACK_PORT, 4, ack.clone());

    let (stats, (pokes, t_ack, t_unreg)) = run_all(vm.take_vcpus(), &buses, |_stats| {
        let mut pokes = 0;
        let (mut t_ack, mut t_unreg) = (Duration::ZERO, Duration::ZERO);
        for round in 1..=rounds {
            // Odd rounds plug a PIO device, even rounds an MMIO device: a
            // fresh device every round.
            let (kind, base, len) = if round % 2 == 1 {
                (BusKind::Pio, HOT_PORT, 8)
            } else {
                (BusKind::Mmio, HOT_MMIO, 16)
            };
            let hot = Arc::new(Hot {
                base,
                ..Hot::default()
            });
            let hot_dyn: Arc<dyn IoDevice> = hot.clone();
            {
                let mut slots = buses.lock_slots();
                buses
                    .register_dev(
                        &mut slots,
                        kind,
                        IoRange::new(base, len).unwrap(),
                        hot_dyn.clone(),
                    )
                    .unwrap();
            }
            // register_dev returned: now tell the guest (a plain store).
            mem.write_u32(gpa(FLAG), round);
            let t = Instant::now();
            ack.wait_for(u64::from(round), Duration::from_secs(20));
            t_ack += t.elapsed();
            assert_eq!(mem.read_u32(gpa(ACK)), round);
            assert_eq!(
                hot.hits.load(Ordering::SeqCst),
                1,
                "round {round}: the guest's {kind:?} access missed the device registered before the flag"
            );
            assert_eq!(hot.value.load(Ordering::SeqCst), u64::from(round));
            let t = Instant::now();
            {
                let mut slots = buses.lock_slots();
                buses.unregister_dev(&mut slots, kind, &hot_dyn).unwrap();
            }
            t_unreg += t.elapsed();
            pokes += hot.pokes.load(Ordering::SeqCst);
        }
        mem.write_u32(gpa(STOP), 1);
        (pokes, t_ack, t_unreg)
    });
    // vCPU 0 never took the unhandled path; vCPU 1 sometimes did (its pokes
    // race with the hot plug), and sometimes hit.
    assert_eq!(stats[0].unhandled(), 0, "{:?}", stats[0]);
    assert_eq!(stats[0].handled, 2 * u64::from(rounds));
    eprintln!(
        "registration_ordering: {rounds} rounds, mean guest round trip {:?}, mean unregister_dev {:?}; \
         vCPU 1: {pokes} pokes hit a hot device, {} unhandled, steady device {}",
        t_ack / rounds,
        t_unreg / rounds,
        stats[1].unhandled(),
        steady.hits()
    );
}

#[test]
fn vm_registration_ordering_classic() {
    let Some(_kvm) = kvm_or_skip("vm_registration_ordering_classic") else {
        return;
    };
    registration_ordering(Buses::new(), 10_000);
}

#[test]
fn vm_registration_ordering_fast() {
    let Some(_kvm) = kvm_or_skip("vm_registration_ordering_fast") else {
        return;
    };
    registration_ordering(Buses::new_fast(), 10_000);
}

const FIRE_PORT: u64 = 0x740;
const FIRE_MMIO: u64 = 0xd020_0000;

/// Every vCPU: `out FIRE_PORT; mov [FIRE_MMIO], eax` until STOP, then hlt.
fn fire_guest() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.mov_imm(Reg::Rdi, FIRE_MMIO);
    a.mov_imm(Reg::Rdx, FIRE_PORT);
    a.mov_imm(Reg::Rcx, 0);
    a.mov_reg(Reg::Rax, Reg::Rbx);
    let top = a.label();
    a.bind(top);
    a.out_dx(Width::B4);
    a.store(Width::B4, Reg::Rdi, 0, Reg::Rax);
    a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
    a.jcc(Cond::Eq, top);
    a.hlt();
    a.finish()
}

fn unregister_under_fire<F: Flavor>(buses: Buses<F>, rounds: usize) {
    let mut vm = MiniVm::builder()
        .vcpus(2)
        .code(&fire_guest())
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let drops = Arc::new(AtomicUsize::new(0));
    let (stats, ()) = run_all(vm.take_vcpus(), &buses, |stats| {
        for round in 0..rounds {
            let pio = Arc::new(Counter::with_drop_counter(drops.clone()));
            let mmio = Arc::new(Counter::with_drop_counter(drops.clone()));
            let (pio_dyn, mmio_dyn): (Arc<dyn IoDevice>, Arc<dyn IoDevice>) =
                (pio.clone(), mmio.clone());
            {
                let mut slots = buses.lock_slots();
                buses
                    .register_dev(
                        &mut slots,
                        BusKind::Pio,
                        IoRange::new(FIRE_PORT, 4).unwrap(),
                        pio_dyn.clone(),
                    )
                    .unwrap();
                buses
                    .register_dev(
                        &mut slots,
                        BusKind::Mmio,
                        IoRange::new(FIRE_MMIO, 4).unwrap(),
                        mmio_dyn.clone(),
                    )
                    .unwrap();
            }
            wait_for("the vCPUs to hit the devices", || {
                pio.hits() >= 8 && mmio.hits() >= 8
            });
            {
                let mut slots = buses.lock_slots();
                buses
                    .unregister_dev(&mut slots, BusKind::Pio, &pio_dyn)
                    .unwrap();
                buses
                    .unregister_dev(&mut slots, BusKind::Mmio, &mmio_dyn)
                    .unwrap();
            }
            // unregister_dev returned: the counters are final, and the bus
            // holds no reference (ours: pio + pio_dyn).
            let (p, m) = (pio.hits(), mmio.hits());
            assert_eq!(
                Arc::strong_count(&pio),
                2,
                "round {round}: the PIO bus still holds the device"
            );
            assert_eq!(
                Arc::strong_count(&mmio),
                2,
                "round {round}: the MMIO bus still holds the device"
            );
            // Let every vCPU dispatch at least 8 more exits at both
            // addresses (each loop iteration is one PIO and one MMIO exit).
            let before: Vec<_> = stats.iter().map(|s| s.snapshot().exits).collect();
            wait_for("the vCPUs to keep running", || {
                stats
                    .iter()
                    .zip(&before)
                    .all(|(s, b)| s.snapshot().exits >= b + 16)
            });
            assert_eq!(
                pio.hits(),
                p,
                "round {round}: PIO device called after unregister_dev returned"
            );
            assert_eq!(
                mmio.hits(),
                m,
                "round {round}: MMIO device called after unregister_dev returned"
            );
            drop((pio_dyn, mmio_dyn));
            let before = drops.load(Ordering::SeqCst);
            drop((pio, mmio));
            assert_eq!(
                drops.load(Ordering::SeqCst),
                before + 2,
                "round {round}: device not dropped"
            );
        }
        mem.write_u32(gpa(STOP), 1);
    });
    assert_eq!(drops.load(Ordering::SeqCst), 2 * rounds);
    for s in &stats {
        assert!(s.handled > 0 && s.unhandled_writes > 0, "{s:?}");
    }
}

#[test]
fn vm_unregister_under_fire_classic() {
    let Some(_kvm) = kvm_or_skip("vm_unregister_under_fire_classic") else {
        return;
    };
    unregister_under_fire(Buses::new(), 200);
}

#[test]
fn vm_unregister_under_fire_fast() {
    let Some(_kvm) = kvm_or_skip("vm_unregister_under_fire_fast") else {
        return;
    };
    unregister_under_fire(Buses::new_fast(), 200);
}

#[test]
fn vm_teardown_drops_every_device_once() {
    let Some(_kvm) = kvm_or_skip("vm_teardown_drops_every_device_once") else {
        return;
    };
    let mut vm = MiniVm::builder()
        .vcpus(2)
        .code(&fire_guest())
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let drops = Arc::new(AtomicUsize::new(0));
    let counter = || Arc::new(Counter::with_drop_counter(drops.clone()));
    let buses = Buses::new();
    // Devices the vCPUs hit, one on two buses and two ranges, one never
    // accessed on the fast MMIO bus.
    let (pio, mmio, shared, fast) = (counter(), counter(), counter(), counter());
    reg(&buses, BusKind::Pio, FIRE_PORT, 4, pio.clone());
    reg(&buses, BusKind::Mmio, FIRE_MMIO, 4, mmio.clone());
    reg(&buses, BusKind::Pio, 0x800, 1, shared.clone());
    reg(&buses, BusKind::Pio, 0x810, 1, shared.clone());
    reg(&buses, BusKind::Mmio, 0xd030_0000, 8, shared.clone());
    reg(&buses, BusKind::FastMmio, 0xd040_0000, 8, fast.clone());
    // Churn, so old bus arrays are waiting in call_srcu at teardown.
    for _ in 0..50 {
        let extra: Arc<dyn IoDevice> = counter();
        let mut slots = buses.lock_slots();
        buses
            .register_dev(
                &mut slots,
                BusKind::Pio,
                IoRange::new(0x900, 1).unwrap(),
                extra.clone(),
            )
            .unwrap();
        buses
            .register_dev(
                &mut slots,
                BusKind::Mmio,
                IoRange::new(0xd050_0000, 1).unwrap(),
                counter(),
            )
            .unwrap();
        buses
            .unregister_dev(&mut slots, BusKind::Pio, &extra)
            .unwrap();
    }
    let total = 4 + 2 * 50;
    let weak: Vec<_> = [&pio, &mmio, &shared, &fast]
        .iter()
        .map(|d| Arc::downgrade(d))
        .collect();
    drop((pio, mmio, shared, fast));
    let (_stats, ()) = run_all(vm.take_vcpus(), &buses, |stats| {
        wait_for("both vCPUs to dispatch", || {
            stats.iter().all(|s| s.snapshot().handled >= 100)
        });
        mem.write_u32(gpa(STOP), 1);
    });
    // 50 `extra` devices were unregistered and are gone already.
    assert_eq!(drops.load(Ordering::SeqCst), 50);
    drop(vm);
    drop(buses);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        total,
        "not every device was dropped"
    );
    assert!(weak.iter().all(|w| w.strong_count() == 0));
}

#[test]
fn vm_non_io_exits_return_to_the_caller() {
    let Some(_kvm) = kvm_or_skip("vm_non_io_exits_return_to_the_caller") else {
        return;
    };
    let mut a = Asm::new();
    a.mov_imm(Reg::Rdx, PORT);
    a.out_dx(Width::B1);
    a.hlt();
    a.out_dx(Width::B1);
    a.raw(&[0x0f, 0x0b]); // ud2 with no IDT: triple fault
    let mut vm = MiniVm::builder().code(&a.finish()).build().unwrap();
    let buses = Buses::new();
    let dev = Arc::new(Counter::default());
    reg(&buses, BusKind::Pio, PORT, 1, dev.clone());
    let mut vcpu = vm.take_vcpus().remove(0);
    let stats = kvm_bus::kvm::VcpuStats::new();
    let run = |vcpu: &mut _| kvm_bus::kvm::run_vcpu(vcpu, &buses, &stats).unwrap();
    assert_eq!(run(&mut vcpu), kvm_bus::kvm::VmExit::Hlt);
    assert_eq!(dev.hits(), 1);
    // Resuming after hlt continues with the next instruction.
    assert_eq!(run(&mut vcpu), kvm_bus::kvm::VmExit::Shutdown);
    assert_eq!(dev.hits(), 2);
    let s = stats.snapshot();
    assert_eq!(
        (s.exits, s.io_exits, s.handled, s.unhandled()),
        (4, 2, 2, 0)
    );
}

// ---------------------------------------------------------------------------
// A device that panics.
// ---------------------------------------------------------------------------

/// Panics on its first access; afterwards answers reads with 0x42 and
/// remembers writes.
#[derive(Default)]
struct PanicsOnce {
    armed_off: std::sync::atomic::AtomicBool,
    reads: AtomicU64,
    last_write: AtomicU64,
}

impl IoDevice for PanicsOnce {
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        if !self.armed_off.swap(true, Ordering::SeqCst) {
            panic!("PanicsOnce: first access, a read at {:#x}", access.addr());
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        data.fill(0x42);
        Ok(())
    }
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        if !self.armed_off.swap(true, Ordering::SeqCst) {
            panic!("PanicsOnce: first access, a write at {:#x}", access.addr());
        }
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.last_write
            .store(u64::from_le_bytes(v), Ordering::SeqCst);
        Ok(None)
    }
}

const PANIC_PORT: u64 = 0x780;
const PANIC_STR_PORT: u64 = 0x790;
const PANIC_MMIO: u64 = 0xd060_0000;

fn device_panic_is_reported_and_the_guest_goes_on<F: Flavor>(buses: Buses<F>) {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    // PIO: the first `out` panics (dropped), the second one arrives.
    a.mov_imm(Reg::Rdx, PANIC_PORT);
    a.mov_imm(Reg::Rax, 0x11);
    a.out_dx(Width::B1);
    a.mov_imm(Reg::Rax, 0x22);
    a.out_dx(Width::B1);
    in_and_store(&mut a, PANIC_PORT, Width::B1, 0);
    // String PIO: `rep insb` of 4 whose first access panics, then an `in`.
    a.mov_imm(Reg::Rdi, DATA_ADDR + RES as u64 + 0x20);
    a.mov_imm(Reg::Rcx, 4);
    a.mov_imm(Reg::Rdx, PANIC_STR_PORT);
    a.rep_ins(Width::B1);
    in_and_store(&mut a, PANIC_STR_PORT, Width::B1, 0x28);
    // MMIO: the first 4-byte load panics (all-ones), the second arrives.
    a.mov_imm(Reg::Rdi, PANIC_MMIO);
    load_and_store(&mut a, 0, Width::B4, 0x30);
    load_and_store(&mut a, 4, Width::B4, 0x38);
    a.store_imm32(Reg::Rbp, RES + 0x80, 0x600d);
    a.hlt();

    let mut vm = MiniVm::builder().code(&a.finish()).build().unwrap();
    let pio = Arc::new(PanicsOnce::default());
    let pio_str = Arc::new(PanicsOnce::default());
    let mmio = Arc::new(PanicsOnce::default());
    reg(&buses, BusKind::Pio, PANIC_PORT, 1, pio.clone());
    reg(&buses, BusKind::Pio, PANIC_STR_PORT, 1, pio_str.clone());
    reg(&buses, BusKind::Mmio, PANIC_MMIO, 8, mmio.clone());
    let (pio_dyn, pio_str_dyn, mmio_dyn): (
        Arc<dyn IoDevice>,
        Arc<dyn IoDevice>,
        Arc<dyn IoDevice>,
    ) = (pio.clone(), pio_str.clone(), mmio.clone());

    let mut vcpu = vm.take_vcpus().remove(0);
    let stats = kvm_bus::kvm::VcpuStats::new();
    // The panics are caught on this (the vCPU) thread: each run returns.
    let mut run = || kvm_bus::kvm::run_vcpu(&mut vcpu, &buses, &stats).unwrap();
    let panicked = |exit: VmExit| match exit {
        VmExit::DevicePanicked(p) => p,
        other => panic!("expected DevicePanicked, got {other:?}"),
    };

    let p = panicked(run());
    assert_eq!(
        (p.kind, p.addr, p.len, p.write),
        (BusKind::Pio, PANIC_PORT, 1, true),
        "{p:?}"
    );
    assert_eq!(p.range, IoRange::new(PANIC_PORT, 1).unwrap());
    assert!(Arc::ptr_eq(&p.device, &pio_dyn));
    assert_eq!(
        p.message,
        format!("PanicsOnce: first access, a write at {PANIC_PORT:#x}")
    );
    assert!(p.to_string().contains("PIO"), "{p}");
    // The read section of the dispatch is over.
    assert_eq!(buses.srcu().readers(), 0);
    assert!(!buses.srcu().in_read_section());
    drop(p);

    let p = panicked(run());
    assert_eq!(
        (p.kind, p.addr, p.len, p.write),
        (BusKind::Pio, PANIC_STR_PORT, 1, false),
        "{p:?}"
    );
    assert!(Arc::ptr_eq(&p.device, &pio_str_dyn));
    drop(p);

    let p = panicked(run());
    assert_eq!(
        (p.kind, p.addr, p.len, p.write),
        (BusKind::Mmio, PANIC_MMIO, 4, false),
        "{p:?}"
    );
    assert_eq!(p.range, IoRange::new(PANIC_MMIO, 8).unwrap());
    assert!(Arc::ptr_eq(&p.device, &mmio_dyn));
    assert!(p.message.contains("a read at"), "{}", p.message);
    drop(p);

    assert_eq!(run(), VmExit::Hlt, "the guest ran to its end");

    let mem = vm.memory();
    let res = |off: i32| DATA_ADDR + (RES + off) as u64;
    assert_eq!(mem.read_u32(res(0x80)), 0x600d);
    // The dropped write never reached the device; the next one did.
    assert_eq!(pio.last_write.load(Ordering::SeqCst), 0x22);
    assert_eq!(mem.read_u8(res(0)), 0x42);
    // The panicking access read all-ones. (The kernel passes the whole
    // `rep insb` in one exit, so all four are; were it split, the later
    // exits would reach the device and read 0x42.)
    let mut ins = [0u8; 4];
    mem.read_bytes(res(0x20), &mut ins);
    assert_eq!(ins[0], 0xff, "{ins:x?}");
    assert!(ins.iter().all(|&b| b == 0xff || b == 0x42), "{ins:x?}");
    let str_ones = ins.iter().filter(|&&b| b == 0xff).count() as u64;
    assert_eq!(mem.read_u8(res(0x28)), 0x42);
    assert_eq!(pio_str.reads.load(Ordering::SeqCst), 4 - str_ones + 1);
    assert_eq!(mem.read_u32(res(0x30)), 0xffff_ffff);
    assert_eq!(mem.read_u32(res(0x38)), 0x4242_4242);

    let s = stats.snapshot();
    assert_eq!(s.device_panics, 3, "{s:?}");
    assert_eq!(s.unhandled_writes, 1, "{s:?}");
    assert_eq!(s.unhandled_reads, str_ones + 1, "{s:?}");
    // 1 out, 1 in, the `rep insb` elements and `in` that arrived, 1 load.
    assert_eq!(s.handled, 1 + 1 + (4 - str_ones) + 1 + 1, "{s:?}");

    // The devices are still registered; unregistering them works and
    // waits for nothing stuck (no section was leaked).
    let mut slots = buses.lock_slots();
    for (kind, dev) in [
        (BusKind::Pio, &pio_dyn),
        (BusKind::Pio, &pio_str_dyn),
        (BusKind::Mmio, &mmio_dyn),
    ] {
        buses.unregister_dev(&mut slots, kind, dev).unwrap();
        assert_eq!(Arc::strong_count(dev), 2, "{kind:?}");
    }
}

#[test]
fn vm_device_panic_is_reported_and_the_guest_goes_on_classic() {
    let Some(_kvm) = kvm_or_skip("vm_device_panic_is_reported_and_the_guest_goes_on_classic")
    else {
        return;
    };
    device_panic_is_reported_and_the_guest_goes_on(Buses::new());
}

#[test]
fn vm_device_panic_is_reported_and_the_guest_goes_on_fast() {
    let Some(_kvm) = kvm_or_skip("vm_device_panic_is_reported_and_the_guest_goes_on_fast") else {
        return;
    };
    device_panic_is_reported_and_the_guest_goes_on(Buses::new_fast());
}
