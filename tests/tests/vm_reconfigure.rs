//! Real-KVM tests of guest-driven reconfiguration: a PCI-like BAR that the
//! guest moves through a config register (`Buses::move_range` from the
//! handler), a device the guest ejects (`Buses::start_unregister` from the
//! handler, completed by a VMM thread), a write that makes the vCPU wait
//! for a `Completion` while the device is unregistered, `Access::vcpu`,
//! and rust-vmm's vm-superio devices (8250 UART, i8042 reset) on the bus.
//!
//! While the BAR-move and eject rounds run, a VMM "hot-plug" thread
//! registers and unregisters (blocking) other devices that vCPUs poke.
//!
//! Every test gates on `kvm_or_skip`: with `KVM_REQUIRED=1` an unusable
//! `/dev/kvm` fails the test; otherwise it prints `SKIPPED` and passes.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Barrier, Weak};
use std::time::{Duration, Instant};

use kvm_bus::kvm::{Asm, Cond, MiniVm, Reg, VcpuStats, Width, DATA_ADDR};
use kvm_bus::{
    Access, BusKind, Buses, Classic, Completion, Declined, Fast, Flavor, IoDevice, IoRange,
    Removal, WriteResult,
};
use parking_lot::Mutex;
use tests::vm::{
    kvm_or_skip, run_all, run_to_halt, wait_for, wait_progress, Captured, Counter, EventFdTrigger,
    Uart, I8042, I8042_COMMAND, I8042_DATA,
};

/// Guest-memory words shared by the VMM and the guest (offsets from
/// DATA_ADDR).
const STOP: i32 = 0x00;
const DONE: i32 = 0x40;
const PROGRESS: i32 = 0x80;
const ERRORS: i32 = 0xc0;
const ERR_ROUND: i32 = 0x100;
const ERR_VALUE: i32 = 0x140;
const GEN: i32 = 0x180;
const SEEN: i32 = 0x1c0;
const EJECTED: i32 = 0x200;
const MARK: i32 = 0x240;
const RES: i32 = 0x400;
const TABLE: i32 = 0x1000;
const TEXT: i32 = 0x2000;

/// Devices the hot-plug thread plugs and unplugs, and a steady one.
const HP_PORT: u64 = 0x7a0;
const HP_MMIO: u64 = 0xd0a0_0000;
const STEADY_PORT: u64 = 0x7b0;
const PAUSES: u64 = 50;
/// How long the guest may make no progress before a test fails.
const STALL: Duration = Duration::from_secs(20);

fn gpa(off: i32) -> u64 {
    DATA_ADDR + off as u64
}

fn r(addr: u64, len: u64) -> IoRange {
    IoRange::new(addr, len).unwrap()
}

/// `lock inc [ERRORS]; [ERR_ROUND] = round; [ERR_VALUE] = value; jmp back`:
/// the guest counts a failed check and goes on (the VMM asserts the count
/// is zero and reports the last round and value).
fn emit_error(
    a: &mut Asm,
    at: kvm_bus::kvm::Label,
    round: Reg,
    value: Reg,
    back: kvm_bus::kvm::Label,
) {
    a.bind(at);
    a.lock_inc32(Reg::Rbp, ERRORS);
    a.store(Width::B4, Reg::Rbp, ERR_ROUND, round);
    a.store(Width::B8, Reg::Rbp, ERR_VALUE, value);
    a.jmp(back);
}

fn assert_no_guest_errors(mem: &kvm_bus::kvm::GuestMemory, what: &str) {
    assert_eq!(
        mem.read_u32(gpa(ERRORS)),
        0,
        "{what}: the guest counted failed checks; last in round {}, value read {:#x}",
        mem.read_u32(gpa(ERR_ROUND)),
        mem.read_u64(gpa(ERR_VALUE))
    );
}

// ---------------------------------------------------------------------------
// The hot-plug thread.
// ---------------------------------------------------------------------------

/// What the hot-plug thread did.
#[derive(Debug, Default)]
struct HotPlug {
    rounds: u64,
    hits: u64,
}

/// Until `stop`: registers a fresh counter at HP_PORT and one at HP_MMIO,
/// lets the vCPUs poke them for a moment, unregisters both with the
/// blocking `unregister_dev`, and checks that each pair is never called
/// after that returned (one round later) and that the buses kept no
/// reference (the devices are freed when the test drops them).
fn hot_plug_loop<F: Flavor>(buses: &Buses<F>, stop: &AtomicBool) -> HotPlug {
    let mut done = HotPlug::default();
    let mut previous: Option<[(Arc<Counter>, u64); 2]> = None;
    let check = |prev: [(Arc<Counter>, u64); 2], round: u64| {
        for (dev, hits) in prev {
            assert_eq!(
                dev.hits(),
                hits,
                "hot plug round {round}: device called after unregister_dev returned"
            );
            let weak = Arc::downgrade(&dev);
            drop(dev);
            assert!(
                weak.upgrade().is_none(),
                "hot plug round {round}: not freed"
            );
        }
    };
    while !stop.load(SeqCst) {
        let (pio, mmio) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let (pio_dyn, mmio_dyn): (Arc<dyn IoDevice>, Arc<dyn IoDevice>) =
            (pio.clone(), mmio.clone());
        {
            let mut slots = buses.lock_slots();
            buses
                .register_dev(&mut slots, BusKind::Pio, r(HP_PORT, 1), pio_dyn.clone())
                .unwrap();
            buses
                .register_dev(&mut slots, BusKind::Mmio, r(HP_MMIO, 4), mmio_dyn.clone())
                .unwrap();
        }
        std::thread::sleep(Duration::from_micros(200));
        {
            let mut slots = buses.lock_slots();
            buses
                .unregister_dev(&mut slots, BusKind::Pio, &pio_dyn)
                .unwrap();
            buses
                .unregister_dev(&mut slots, BusKind::Mmio, &mmio_dyn)
                .unwrap();
        }
        drop((pio_dyn, mmio_dyn));
        assert_eq!(Arc::strong_count(&pio), 1, "the PIO bus kept the device");
        assert_eq!(Arc::strong_count(&mmio), 1, "the MMIO bus kept the device");
        if let Some(prev) = previous.take() {
            check(prev, done.rounds);
        }
        done.hits += pio.hits() + mmio.hits();
        previous = Some([(pio.clone(), pio.hits()), (mmio.clone(), mmio.hits())]);
        done.rounds += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    if let Some(prev) = previous.take() {
        check(prev, done.rounds);
    }
    done
}

/// vCPU 1's loop in the BAR-move and eject tests: a config read of
/// `port` (of the device under test), pokes at the steady device and at
/// the hot-plugged ones, a breather, until STOP.
fn emit_poker(a: &mut Asm, port: u64) {
    a.mov_imm(Reg::Rdi, HP_MMIO);
    let again = a.label();
    a.bind(again);
    a.mov_imm(Reg::Rdx, port);
    a.in_dx(Width::B4);
    a.mov_imm(Reg::Rdx, STEADY_PORT);
    a.out_dx(Width::B1);
    a.mov_imm(Reg::Rdx, HP_PORT);
    a.out_dx(Width::B1);
    a.store(Width::B4, Reg::Rdi, 0, Reg::Rax);
    a.pause_n(PAUSES);
    a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
    a.jcc(Cond::Eq, again);
    a.hlt();
}

// ---------------------------------------------------------------------------
// 1. BAR moves from the handler.
// ---------------------------------------------------------------------------

/// The BAR register (PIO, 4 bytes): a write moves the window, a read
/// returns where it is.
const BAR_PORT: u64 = 0x7c0;
/// Where the guest puts the window, in turn.
const WINDOWS: [u64; 3] = [0xc000_0000, 0xc010_0000, 0xc020_0000];
const WINDOW_LEN: u64 = 0x1000;

struct BarState {
    at: IoRange,
    moves: u32,
    /// Window accesses that arrived at a range that was no longer the
    /// device's: (address, vCPU).
    stale: Vec<(u64, Option<u32>)>,
}

/// A PCI-like function: a BAR register on the PIO bus whose write handler
/// moves the function's MMIO window (`move_range` inside the read section
/// of that very write). Reads of the window return the number of moves
/// so far.
struct Bar<F: Flavor> {
    buses: Weak<Buses<F>>,
    me: Weak<dyn IoDevice>,
    state: Mutex<BarState>,
    /// Window reads per window of WINDOWS.
    hits: [AtomicU64; 3],
    /// BAR writes by vCPU 0 (`Access::vcpu`).
    moves_by_vcpu0: AtomicU64,
    config_reads: AtomicU64,
}

impl<F: Flavor> Bar<F> {
    fn new(buses: &Arc<Buses<F>>) -> Arc<Bar<F>> {
        Arc::new_cyclic(|me: &Weak<Bar<F>>| Bar {
            buses: Arc::downgrade(buses),
            me: me.clone(),
            state: Mutex::new(BarState {
                at: r(WINDOWS[0], WINDOW_LEN),
                moves: 0,
                stale: Vec::new(),
            }),
            hits: Default::default(),
            moves_by_vcpu0: AtomicU64::new(0),
            config_reads: AtomicU64::new(0),
        })
    }
}

impl<F: Flavor> IoDevice for Bar<F> {
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        let st = self.state.lock();
        let value = if access.base == BAR_PORT {
            self.config_reads.fetch_add(1, SeqCst);
            st.at.addr()
        } else {
            if access.base != st.at.addr() {
                drop(st);
                self.state.lock().stale.push((access.addr(), access.vcpu));
                data.fill(0);
                return Ok(());
            }
            if let Some(i) = WINDOWS.iter().position(|&w| w == access.base) {
                self.hits[i].fetch_add(1, SeqCst);
            }
            u64::from(st.moves)
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        let &[a, b, c, d] = data else {
            return Err(Declined);
        };
        if access.base != BAR_PORT {
            return Err(Declined);
        }
        let to = r(u64::from(u32::from_le_bytes([a, b, c, d])), WINDOW_LEN);
        let buses = self.buses.upgrade().expect("the VM's buses");
        let me = self.me.upgrade().expect("registered, so alive");
        let mut st = self.state.lock();
        let mut slots = buses.lock_slots();
        buses
            .move_range(&mut slots, BusKind::Mmio, &me, st.at, to)
            .expect("move_range from the BAR handler");
        drop(slots);
        st.at = to;
        st.moves += 1;
        if access.vcpu == Some(0) {
            self.moves_by_vcpu0.fetch_add(1, SeqCst);
        }
        Ok(None)
    }
}

/// vCPU 0, `rounds` times: program the BAR with the next window, read the
/// new window (must be the device: its move count, which is the round),
/// read the old one (must be unhandled: all-ones). vCPU 1: [`emit_poker`]
/// with a config read of the same device.
fn bar_move_guest(rounds: u32) -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.cmp_imm(Reg::Rbx, 0);
    let poker = a.label();
    a.jcc(Cond::Ne, poker);
    // vCPU 0. rsi = round, rdi = the next table entry, rcx = old window.
    a.mov_imm(Reg::Rsi, 1);
    a.mov_imm(Reg::Rdi, gpa(TABLE) + 8);
    a.mov_imm(Reg::Rcx, WINDOWS[0]);
    let (top, new_ok, old_ok, no_wrap) = (a.label(), a.label(), a.label(), a.label());
    let (bad_new, bad_old) = (a.label(), a.label());
    a.bind(top);
    a.load(Width::B8, Reg::Rax, Reg::Rdi, 0);
    a.mov_imm(Reg::Rdx, BAR_PORT);
    a.out_dx(Width::B4); // the BAR write: the handler moves the window
    a.load(Width::B4, Reg::Rdx, Reg::Rax, 0x10); // at once, the new window
    a.cmp_reg(Reg::Rdx, Reg::Rsi);
    a.jcc(Cond::Ne, bad_new);
    a.bind(new_ok);
    a.load(Width::B8, Reg::Rdx, Reg::Rcx, 0x800); // the old window
    a.cmp_imm(Reg::Rdx, -1);
    a.jcc(Cond::Ne, bad_old);
    a.bind(old_ok);
    a.mov_reg(Reg::Rcx, Reg::Rax);
    a.add_imm(Reg::Rdi, 8);
    a.cmp_imm(Reg::Rdi, (gpa(TABLE) + 8 * WINDOWS.len() as u64) as i32);
    a.jcc(Cond::Ne, no_wrap);
    a.mov_imm(Reg::Rdi, gpa(TABLE));
    a.bind(no_wrap);
    a.store(Width::B4, Reg::Rbp, PROGRESS, Reg::Rsi);
    a.inc(Reg::Rsi);
    a.cmp_imm(Reg::Rsi, rounds as i32 + 1);
    a.jcc(Cond::Ne, top);
    a.mov_imm(Reg::Rax, 1);
    a.store(Width::B4, Reg::Rbp, DONE, Reg::Rax);
    a.hlt();
    emit_error(&mut a, bad_new, Reg::Rsi, Reg::Rdx, new_ok);
    emit_error(&mut a, bad_old, Reg::Rsi, Reg::Rdx, old_ok);
    // vCPU 1.
    a.bind(poker);
    emit_poker(&mut a, BAR_PORT);
    a.finish()
}

fn bar_move<F: Flavor>(rounds: u32) {
    let buses = Arc::new(Buses::<F>::default());
    let table: Vec<u8> = WINDOWS.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut vm = MiniVm::builder()
        .vcpus(2)
        .code(&bar_move_guest(rounds))
        .load(gpa(TABLE), &table)
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let bar = Bar::new(&buses);
    let steady = Arc::new(Counter::default());
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(BAR_PORT, 4), bar.clone())
            .unwrap();
        buses
            .register_dev(
                &mut slots,
                BusKind::Mmio,
                r(WINDOWS[0], WINDOW_LEN),
                bar.clone(),
            )
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(STEADY_PORT, 1), steady.clone())
            .unwrap();
    }
    let start = Instant::now();
    let stop_hot_plug = AtomicBool::new(false);
    let (stats, hot_plug) = run_all(vm.take_vcpus(), &buses, |_| {
        std::thread::scope(|s| {
            let hp = s.spawn(|| hot_plug_loop(&buses, &stop_hot_plug));
            wait_progress("vCPU 0's BAR moves", u64::from(rounds), STALL, || {
                u64::from(mem.read_u32(gpa(PROGRESS)))
            });
            wait_for("vCPU 0 to finish", || mem.read_u32(gpa(DONE)) == 1);
            stop_hot_plug.store(true, SeqCst);
            let hp = hp.join().expect("hot-plug thread");
            mem.write_u32(gpa(STOP), 1);
            hp
        })
    });
    let elapsed = start.elapsed();

    assert_no_guest_errors(&mem, "BAR move");
    let st = bar.state.lock();
    assert!(
        st.stale.is_empty(),
        "window accesses reached the device at a range it had left: {:x?}",
        &st.stale[..st.stale.len().min(10)]
    );
    assert_eq!(st.moves, rounds);
    drop(st);
    assert_eq!(bar.moves_by_vcpu0.load(SeqCst), u64::from(rounds));
    let hits: Vec<u64> = bar.hits.iter().map(|h| h.load(SeqCst)).collect();
    assert_eq!(hits.iter().sum::<u64>(), u64::from(rounds), "{hits:?}");
    assert!(hits.iter().all(|&h| h >= u64::from(rounds) / 3), "{hits:?}");
    // vCPU 0: a BAR write and a new-window read handled, an old-window
    // read unhandled, per round.
    assert_eq!(stats[0].handled, 2 * u64::from(rounds), "{:?}", stats[0]);
    assert_eq!(
        stats[0].unhandled_reads,
        u64::from(rounds),
        "{:?}",
        stats[0]
    );
    assert_eq!(stats[0].unhandled_writes, 0, "{:?}", stats[0]);
    assert!(hot_plug.rounds > 0, "{hot_plug:?}");
    eprintln!(
        "bar_move: {rounds} rounds in {elapsed:?} ({:?} per round); window hits {hits:?}; \
         vCPU 1 read the BAR register {} times, {} pokes unhandled; \
         hot plug: {} rounds, {} hits",
        elapsed / rounds,
        bar.config_reads.load(SeqCst),
        stats[1].unhandled(),
        hot_plug.rounds,
        hot_plug.hits
    );
    // The buses give the device back whole.
    let dev: Arc<dyn IoDevice> = bar.clone();
    let mut slots = buses.lock_slots();
    buses
        .unregister_dev(&mut slots, BusKind::Pio, &dev)
        .unwrap();
    buses
        .unregister_dev(&mut slots, BusKind::Mmio, &dev)
        .unwrap();
    drop((slots, dev));
    assert_eq!(Arc::strong_count(&bar), 1);
}

#[test]
fn vm_bar_move_from_handler_classic() {
    let Some(_kvm) = kvm_or_skip("vm_bar_move_from_handler_classic") else {
        return;
    };
    bar_move::<Classic>(10_000);
}

#[test]
fn vm_bar_move_from_handler_fast() {
    let Some(_kvm) = kvm_or_skip("vm_bar_move_from_handler_fast") else {
        return;
    };
    bar_move::<Fast>(10_000);
}

// ---------------------------------------------------------------------------
// 2. Eject from the handler.
// ---------------------------------------------------------------------------

/// The ejectable device: 4 ports and 16 bytes of MMIO; MMIO offset 8 is
/// its eject register.
const EJ_PORT: u64 = 0x7d0;
const EJ_MMIO: u64 = 0xd0b0_0000;
const EJECT_REG: u64 = 8;

/// What an eject handler hands the VMM: the generation, the removals,
/// how long `start_unregister` took.
type Ejected = (u32, Vec<Removal>, Duration);

/// A device of one generation (the VMM plugs a fresh one every round).
/// Reads return the generation; a write of the generation to the eject
/// register starts its own removal from both buses and sends the
/// `Removal`s to the VMM.
struct Ejectable<F: Flavor> {
    generation: u32,
    buses: Weak<Buses<F>>,
    me: Weak<dyn IoDevice>,
    hits: AtomicU64,
    /// Set when the eject handler has unpublished the device.
    ejected: AtomicBool,
    /// Accesses that arrived afterwards from the vCPU that ejected it
    /// (vCPU 1), which observed the unpublish: must stay 0.
    after_eject_from_ejector: AtomicU64,
    vmm: Sender<Ejected>,
    drops: Arc<AtomicUsize>,
}

impl<F: Flavor> Ejectable<F> {
    fn new(
        generation: u32,
        buses: &Arc<Buses<F>>,
        vmm: Sender<Ejected>,
        drops: Arc<AtomicUsize>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Self>| Ejectable {
            generation,
            buses: Arc::downgrade(buses),
            me: me.clone(),
            hits: AtomicU64::new(0),
            ejected: AtomicBool::new(false),
            after_eject_from_ejector: AtomicU64::new(0),
            vmm,
            drops,
        })
    }

    fn hits(&self) -> u64 {
        self.hits.load(SeqCst)
    }

    fn count(&self, access: Access) {
        self.hits.fetch_add(1, SeqCst);
        if access.vcpu == Some(1) && self.ejected.load(SeqCst) {
            self.after_eject_from_ejector.fetch_add(1, SeqCst);
        }
    }
}

impl<F: Flavor> Drop for Ejectable<F> {
    fn drop(&mut self) {
        self.drops.fetch_add(1, SeqCst);
    }
}

impl<F: Flavor> IoDevice for Ejectable<F> {
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.count(access);
        let v = u64::from(self.generation).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
        Ok(())
    }

    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        self.count(access);
        if access.base != EJ_MMIO || access.offset != EJECT_REG {
            return Ok(None);
        }
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        let asked = u64::from_le_bytes(v);
        assert_eq!(
            asked,
            u64::from(self.generation),
            "an eject meant for another generation reached this device"
        );
        let buses = self.buses.upgrade().expect("the VM's buses");
        let me = self.me.upgrade().expect("registered, so alive");
        let t = Instant::now();
        let mut slots = buses.lock_slots();
        let mmio = buses
            .start_unregister(&mut slots, BusKind::Mmio, &me)
            .expect("start_unregister (MMIO) from the eject handler");
        let pio = buses
            .start_unregister(&mut slots, BusKind::Pio, &me)
            .expect("start_unregister (PIO) from the eject handler");
        drop(slots);
        let t = t.elapsed();
        self.ejected.store(true, SeqCst);
        drop(me);
        self.vmm
            .send((self.generation, vec![mmio, pio], t))
            .expect("the VMM thread");
        Ok(None)
    }
}

/// vCPU 0 hammers the device until STOP: reads its generation (all-ones
/// between an eject and the next plug; never a generation older than the
/// one the VMM had published before the read), reports it in SEEN, writes
/// it by PIO and MMIO, pokes the hot-plugged devices, counts PROGRESS.
/// vCPU 1, `rounds` times: waits for GEN == round and SEEN == round,
/// writes the round to the eject register, then checks that the device is
/// gone from both buses (its own next accesses are unhandled or reach a
/// newer generation), and reports EJECTED.
fn eject_guest(rounds: u32) -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.cmp_imm(Reg::Rbx, 0);
    let ejector = a.label();
    a.jcc(Cond::Ne, ejector);
    // vCPU 0.
    a.mov_imm(Reg::Rdi, EJ_MMIO);
    let (top, gone, checked, stale) = (a.label(), a.label(), a.label(), a.label());
    a.bind(top);
    a.load(Width::B4, Reg::Rsi, Reg::Rbp, GEN);
    a.load(Width::B4, Reg::Rax, Reg::Rdi, 0);
    a.mov_imm(Reg::Rcx, 0xffff_ffff);
    a.cmp_reg(Reg::Rax, Reg::Rcx);
    a.jcc(Cond::Eq, gone);
    a.cmp_reg(Reg::Rax, Reg::Rsi);
    a.jcc(Cond::Below, stale);
    a.bind(checked);
    a.store(Width::B4, Reg::Rbp, SEEN, Reg::Rax);
    a.bind(gone);
    a.mov_imm(Reg::Rdx, EJ_PORT);
    a.out_dx(Width::B4);
    a.store(Width::B4, Reg::Rdi, 4, Reg::Rax);
    a.mov_imm(Reg::Rdx, HP_PORT);
    a.out_dx(Width::B1);
    a.mov_imm(Reg::Rcx, HP_MMIO);
    a.store(Width::B4, Reg::Rcx, 0, Reg::Rax);
    a.load(Width::B4, Reg::Rax, Reg::Rbp, PROGRESS);
    a.inc(Reg::Rax);
    a.store(Width::B4, Reg::Rbp, PROGRESS, Reg::Rax);
    a.mov_imm(Reg::Rcx, 0);
    a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
    a.jcc(Cond::Eq, top);
    a.hlt();
    emit_error(&mut a, stale, Reg::Rsi, Reg::Rax, checked);
    // vCPU 1.
    a.bind(ejector);
    a.mov_imm(Reg::Rsi, 1);
    a.mov_imm(Reg::Rdi, EJ_MMIO);
    let (round, ok1, ok2, bad1, bad2) = (a.label(), a.label(), a.label(), a.label(), a.label());
    a.bind(round);
    a.wait_eq32(Reg::Rbp, GEN, Reg::Rsi);
    a.wait_eq32(Reg::Rbp, SEEN, Reg::Rsi);
    a.mov_reg(Reg::Rax, Reg::Rsi);
    a.store(Width::B4, Reg::Rdi, EJECT_REG as i32, Reg::Rax); // eject
                                                              // Its next accesses must not reach that generation: unhandled, or
                                                              // (the VMM may have completed the removal and plugged the next one
                                                              // already) a newer generation.
    a.load(Width::B8, Reg::Rdx, Reg::Rdi, 0);
    a.cmp_imm(Reg::Rdx, -1);
    a.jcc(Cond::Eq, ok1);
    a.cmp_reg(Reg::Rsi, Reg::Rdx);
    a.jcc(Cond::AboveEq, bad1);
    a.bind(ok1);
    a.mov_imm(Reg::Rdx, EJ_PORT);
    a.in_dx(Width::B4);
    a.mov_imm(Reg::Rcx, 0xffff_ffff);
    a.cmp_reg(Reg::Rax, Reg::Rcx);
    a.jcc(Cond::Eq, ok2);
    a.cmp_reg(Reg::Rsi, Reg::Rax);
    a.jcc(Cond::AboveEq, bad2);
    a.bind(ok2);
    a.store(Width::B4, Reg::Rbp, EJECTED, Reg::Rsi);
    a.inc(Reg::Rsi);
    a.cmp_imm(Reg::Rsi, rounds as i32 + 1);
    a.jcc(Cond::Ne, round);
    a.hlt();
    emit_error(&mut a, bad1, Reg::Rsi, Reg::Rdx, ok1);
    emit_error(&mut a, bad2, Reg::Rsi, Reg::Rax, ok2);
    a.finish()
}

fn eject<F: Flavor>(rounds: u32) {
    let buses = Arc::new(Buses::<F>::default());
    let mut vm = MiniVm::builder()
        .vcpus(2)
        .code(&eject_guest(rounds))
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let drops = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Ejected>();
    let start = Instant::now();
    let stop_hot_plug = AtomicBool::new(false);
    let (stats, (t_unpublish, t_complete, hot_plug)) = run_all(vm.take_vcpus(), &buses, |_| {
        std::thread::scope(|s| {
            let hp = s.spawn(|| hot_plug_loop(&buses, &stop_hot_plug));
            let (mut t_unpublish, mut t_complete) = (Duration::ZERO, Duration::ZERO);
            let mut previous: Option<(Arc<Ejectable<F>>, u64)> = None;
            let retire = |(dev, hits): (Arc<Ejectable<F>>, u64), round: u32| {
                assert_eq!(
                    dev.hits(),
                    hits,
                    "round {round}: the device was called after its removal completed"
                );
                assert_eq!(
                    dev.after_eject_from_ejector.load(SeqCst),
                    0,
                    "round {round}: the ejecting vCPU reached the device after its eject"
                );
                let weak = Arc::downgrade(&dev);
                drop(dev);
                assert!(weak.upgrade().is_none(), "round {round}: device not freed");
            };
            for round in 1..=rounds {
                let dev = Ejectable::new(round, &buses, tx.clone(), drops.clone());
                {
                    let mut slots = buses.lock_slots();
                    buses
                        .register_dev(&mut slots, BusKind::Pio, r(EJ_PORT, 4), dev.clone())
                        .unwrap();
                    buses
                        .register_dev(&mut slots, BusKind::Mmio, r(EJ_MMIO, 16), dev.clone())
                        .unwrap();
                }
                // Plugged: tell the guest.
                mem.write_u32(gpa(GEN), round);
                let (generation, removals, t) = rx
                    .recv_timeout(STALL)
                    .unwrap_or_else(|e| panic!("round {round}: no eject from the guest: {e}"));
                assert_eq!(generation, round);
                t_unpublish += t;
                // Unpublished when start_unregister returned.
                assert!(buses.get_dev(BusKind::Mmio, EJ_MMIO).is_none());
                assert!(buses.get_dev(BusKind::Pio, EJ_PORT).is_none());
                let t = Instant::now();
                for removal in removals {
                    removal.wait().expect("Removal::wait on the VMM thread");
                }
                t_complete += t.elapsed();
                // Complete: the buses hold nothing, the count is final.
                assert_eq!(
                    Arc::strong_count(&dev),
                    1,
                    "round {round}: the buses still hold the device"
                );
                let hits = dev.hits();
                assert!(hits >= 2, "round {round}: {hits} hits");
                // The previous device has seen a whole round of hammering
                // at its addresses since its removal completed.
                if let Some(prev) = previous.take() {
                    retire(prev, round - 1);
                }
                previous = Some((dev, hits));
            }
            // The last one: let vCPU 0 hammer a while longer first.
            let p = mem.read_u32(gpa(PROGRESS));
            wait_for("vCPU 0 to go on", || {
                mem.read_u32(gpa(PROGRESS)).wrapping_sub(p) >= 16
            });
            retire(previous.take().expect("rounds > 0"), rounds);
            wait_for("vCPU 1 to finish", || mem.read_u32(gpa(EJECTED)) == rounds);
            stop_hot_plug.store(true, SeqCst);
            let hp = hp.join().expect("hot-plug thread");
            mem.write_u32(gpa(STOP), 1);
            (t_unpublish, t_complete, hp)
        })
    });
    let elapsed = start.elapsed();
    assert_no_guest_errors(&mem, "eject");
    assert_eq!(
        drops.load(SeqCst),
        rounds as usize,
        "every device freed once"
    );
    // vCPU 1: per round, one eject write (handled) and two reads that are
    // unhandled or reach the next generation.
    let s1 = &stats[1];
    assert_eq!(s1.unhandled_writes, 0, "{s1:?}");
    assert_eq!(
        s1.handled + s1.unhandled_reads,
        3 * u64::from(rounds),
        "{s1:?}"
    );
    assert!(s1.handled >= u64::from(rounds), "{s1:?}");
    assert!(hot_plug.rounds > 0, "{hot_plug:?}");
    eprintln!(
        "eject: {rounds} rounds in {elapsed:?}; mean start_unregister x2 {:?}, \
         mean Removal::wait x2 {:?}; vCPU 1's post-eject reads: {} unhandled, {} reached \
         the next generation; vCPU 0: {} accesses handled, {} unhandled; \
         hot plug: {} rounds, {} hits",
        t_unpublish / rounds,
        t_complete / rounds,
        s1.unhandled_reads,
        s1.handled - u64::from(rounds),
        stats[0].handled,
        stats[0].unhandled(),
        hot_plug.rounds,
        hot_plug.hits
    );
}

#[test]
fn vm_eject_from_handler_classic() {
    let Some(_kvm) = kvm_or_skip("vm_eject_from_handler_classic") else {
        return;
    };
    eject::<Classic>(1_000);
}

#[test]
fn vm_eject_from_handler_fast() {
    let Some(_kvm) = kvm_or_skip("vm_eject_from_handler_fast") else {
        return;
    };
    eject::<Fast>(1_000);
}

// ---------------------------------------------------------------------------
// 4. A Completion outlives the device's unregistration.
// ---------------------------------------------------------------------------

const GATE_PORT: u64 = 0x7e0;

/// A write hands the VMM a barrier of 2 and returns it as a `Completion`:
/// the vCPU waits on it after its read section.
struct Gate {
    calls: AtomicU64,
    vmm: Sender<Arc<Barrier>>,
}

impl IoDevice for Gate {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.calls.fetch_add(1, SeqCst);
        data.fill(0x11);
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        let b = Arc::new(Barrier::new(2));
        self.vmm.send(b.clone()).expect("the VMM thread");
        Ok(Some(Completion::from(b)))
    }
}

fn completion_outlives_unregister<F: Flavor>() {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.mov_imm(Reg::Rdx, GATE_PORT);
    a.mov_imm(Reg::Rax, 0x42);
    a.out_dx(Width::B1); // returns a Completion: the vCPU waits
    a.mov_imm(Reg::Rax, 1);
    a.store(Width::B4, Reg::Rbp, MARK, Reg::Rax);
    a.mov_imm(Reg::Rax, 0);
    a.in_dx(Width::B1); // the gate is gone by now
    a.store(Width::B1, Reg::Rbp, RES, Reg::Rax);
    a.hlt();
    let mut vm = MiniVm::builder().code(&a.finish()).build().unwrap();
    let mem = vm.memory().clone();
    let buses = Arc::new(Buses::<F>::default());
    let (tx, rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        calls: AtomicU64::new(0),
        vmm: tx,
    });
    let gate_dyn: Arc<dyn IoDevice> = gate.clone();
    buses
        .register_dev(
            &mut buses.lock_slots(),
            BusKind::Pio,
            r(GATE_PORT, 1),
            gate_dyn.clone(),
        )
        .unwrap();
    let (stats, ()) = run_all(vm.take_vcpus(), &buses, |_| {
        let barrier: Arc<Barrier> = rx.recv_timeout(STALL).expect("the guest's write");
        // Give the vCPU time to park on the barrier (the test holds either
        // way: had the vCPU waited inside its read section, the unregister
        // below could never finish).
        std::thread::sleep(Duration::from_millis(5));
        let (done_tx, done_rx) = mpsc::channel();
        let (b, d) = (buses.clone(), gate_dyn.clone());
        // Not scoped: a hang must fail the test, not block its join.
        std::thread::spawn(move || {
            let mut slots = b.lock_slots();
            let result = b.unregister_dev(&mut slots, BusKind::Pio, &d);
            drop((slots, d));
            let _ = done_tx.send(result);
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("unregister_dev hung while the vCPU waited on the completion")
            .expect("unregister_dev");
        assert_eq!(mem.read_u32(gpa(MARK)), 0, "the vCPU must still be waiting");
        assert_eq!(gate.calls.load(SeqCst), 1);
        assert_eq!(Arc::strong_count(&gate), 2, "the bus let go (ours: 2)");
        barrier.wait(); // release the vCPU
    });
    assert_eq!(mem.read_u32(gpa(MARK)), 1);
    assert_eq!(
        mem.read_u8(gpa(RES)),
        0xff,
        "the gate answered after its removal"
    );
    assert_eq!(gate.calls.load(SeqCst), 1, "the gate was called again");
    assert_eq!(
        (stats[0].handled, stats[0].unhandled_reads),
        (1, 1),
        "{:?}",
        stats[0]
    );
}

#[test]
fn vm_completion_outlives_unregister_classic() {
    let Some(_kvm) = kvm_or_skip("vm_completion_outlives_unregister_classic") else {
        return;
    };
    completion_outlives_unregister::<Classic>();
}

#[test]
fn vm_completion_outlives_unregister_fast() {
    let Some(_kvm) = kvm_or_skip("vm_completion_outlives_unregister_fast") else {
        return;
    };
    completion_outlives_unregister::<Fast>();
}

// ---------------------------------------------------------------------------
// 5. Access::vcpu.
// ---------------------------------------------------------------------------

const WHO_PORT: u64 = 0x7f0;
const WHO_MMIO: u64 = 0xd0c0_0000;
const WHO_WRITES: u64 = 50;

/// Logs `(Access::vcpu, value written)`; reads return the vCPU index
/// (0xee without one).
#[derive(Default)]
struct WhoAmI {
    log: Mutex<Vec<(Option<u32>, u64)>>,
}

impl IoDevice for WhoAmI {
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        let v = access.vcpu.map_or(0xee, u64::from).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
        Ok(())
    }
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        self.log.lock().push((access.vcpu, u64::from_le_bytes(v)));
        Ok(None)
    }
}

/// Each vCPU writes its index (rbx) WHO_WRITES times by PIO and by MMIO,
/// then reads both and stores what it got at RES + 16 * index.
fn who_guest() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    a.mov_imm(Reg::Rdi, WHO_MMIO);
    a.mov_imm(Reg::Rdx, WHO_PORT);
    a.mov_imm(Reg::Rcx, WHO_WRITES);
    let top = a.label();
    a.bind(top);
    a.mov_reg(Reg::Rax, Reg::Rbx);
    a.out_dx(Width::B4);
    a.store(Width::B8, Reg::Rdi, 0, Reg::Rax);
    a.loop_rcx(top);
    a.mov_reg(Reg::Rsi, Reg::Rbx);
    a.shl_imm(Reg::Rsi, 4);
    a.add_imm(Reg::Rsi, gpa(RES) as i32);
    a.mov_imm(Reg::Rax, 0);
    a.in_dx(Width::B4);
    a.store(Width::B8, Reg::Rsi, 0, Reg::Rax);
    a.load(Width::B8, Reg::Rax, Reg::Rdi, 0);
    a.store(Width::B8, Reg::Rsi, 8, Reg::Rax);
    a.hlt();
    a.finish()
}

fn vcpu_index<F: Flavor>() {
    let mut vm = MiniVm::builder()
        .vcpus(2)
        .code(&who_guest())
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let buses = Buses::<F>::default();
    let who = Arc::new(WhoAmI::default());
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(WHO_PORT, 4), who.clone())
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(WHO_MMIO, 8), who.clone())
            .unwrap();
    }
    // run_all gives vCPU i `VcpuStats::for_vcpu(i)`.
    let (_stats, ()) = run_all(vm.take_vcpus(), &buses, |_| {});
    let log = std::mem::take(&mut *who.log.lock());
    assert_eq!(log.len() as u64, 2 * 2 * WHO_WRITES);
    for (vcpu, value) in &log {
        assert_eq!(*vcpu, Some(*value as u32), "a write of vCPU {value}");
    }
    for i in 0..2u64 {
        assert_eq!(
            log.iter().filter(|(_, v)| *v == i).count() as u64,
            2 * WHO_WRITES
        );
        let at = gpa(RES) + 16 * i;
        assert_eq!(mem.read_u64(at), i, "PIO read of vCPU {i}");
        assert_eq!(mem.read_u64(at + 8), i, "MMIO read of vCPU {i}");
    }

    // Without for_vcpu, handlers see no index.
    let mut vm = MiniVm::builder().code(&who_guest()).build().unwrap();
    let mut vcpu = vm.take_vcpus().remove(0);
    run_to_halt(&mut vcpu, &buses, &VcpuStats::new());
    assert!(who.log.lock().iter().all(|(vcpu, _)| vcpu.is_none()));
    assert_eq!(vm.memory().read_u64(gpa(RES)), 0xee);
}

#[test]
fn vm_vcpu_index_in_access_classic() {
    let Some(_kvm) = kvm_or_skip("vm_vcpu_index_in_access_classic") else {
        return;
    };
    vcpu_index::<Classic>();
}

#[test]
fn vm_vcpu_index_in_access_fast() {
    let Some(_kvm) = kvm_or_skip("vm_vcpu_index_in_access_fast") else {
        return;
    };
    vcpu_index::<Fast>();
}

// ---------------------------------------------------------------------------
// vm-superio: an 8250 UART and the i8042 reset on the bus.
// ---------------------------------------------------------------------------

const COM1: u64 = 0x3f8;

fn out_imm(a: &mut Asm, port: u64, value: u64) {
    a.mov_imm(Reg::Rdx, port);
    a.mov_imm(Reg::Rax, value);
    a.out_dx(Width::B1);
}

/// Prints the `len` bytes at `text` on COM1 as a polling driver does
/// ([`Asm::uart_write`]).
fn emit_uart_print(a: &mut Asm, text: u64, len: u64) {
    a.mov_imm(Reg::Rsi, text);
    a.mov_imm(Reg::Rcx, len);
    a.uart_write(COM1);
}

fn superio<F: Flavor>() {
    let text = b"ok\n";
    let mut a = Asm::new();
    a.mov_imm(Reg::Rbp, DATA_ADDR);
    // Linux's early_serial_init: 8n1, no interrupts, no FIFO, DTR|RTS,
    // divisor 1 (115200 baud) through the DLAB.
    out_imm(&mut a, COM1 + 3, 0x03);
    out_imm(&mut a, COM1 + 1, 0x00);
    out_imm(&mut a, COM1 + 2, 0x00);
    out_imm(&mut a, COM1 + 4, 0x03);
    out_imm(&mut a, COM1 + 3, 0x83);
    out_imm(&mut a, COM1, 0x01);
    out_imm(&mut a, COM1 + 1, 0x00);
    out_imm(&mut a, COM1 + 3, 0x03);
    emit_uart_print(&mut a, gpa(TEXT), text.len() as u64);
    // Reset through the keyboard controller: wait until its input buffer
    // is empty (status bit 1), write 0xfe to the command port.
    let busy = a.label();
    a.mov_imm(Reg::Rdx, I8042_COMMAND);
    a.bind(busy);
    a.in_dx(Width::B1);
    a.and_imm(Reg::Rax, 2);
    a.cmp_imm(Reg::Rax, 0);
    a.jcc(Cond::Ne, busy);
    out_imm(&mut a, I8042_COMMAND, 0xfe);
    // Spin until the VMM, told by the reset event, stops this vCPU.
    a.mov_imm(Reg::Rcx, 1);
    a.wait_eq32(Reg::Rbp, STOP, Reg::Rcx);
    a.hlt();
    let mut vm = MiniVm::builder()
        .code(&a.finish())
        .load(gpa(TEXT), text)
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    let buses = Buses::<F>::default();
    let out = Captured::default();
    let uart = Arc::new(std::sync::Mutex::new(Uart::new(out.clone())));
    let reset = EventFdTrigger::new();
    let i8042 = Arc::new(std::sync::Mutex::new(I8042(vm_superio::I8042Device::new(
        reset.try_clone(),
    ))));
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(COM1, 8), uart.clone())
            .unwrap();
        buses
            .register_many(
                &mut slots,
                BusKind::Pio,
                [
                    (r(I8042_DATA, 1), i8042.clone() as Arc<dyn IoDevice>),
                    (r(I8042_COMMAND, 1), i8042.clone() as _),
                ],
            )
            .unwrap();
    }
    let (_stats, resets) = run_all(vm.take_vcpus(), &buses, |_| {
        let mut resets = 0;
        wait_for("the guest's i8042 reset", || {
            resets += reset.take();
            resets > 0
        });
        mem.write_u32(gpa(STOP), 1);
        resets
    });
    assert_eq!(resets, 1);
    assert_eq!(
        out.bytes(),
        text,
        "{:?}",
        String::from_utf8_lossy(&out.bytes())
    );
    let state = uart.lock().unwrap().0.state();
    assert_eq!(
        (
            state.baud_divisor_low,
            state.baud_divisor_high,
            state.line_control,
            state.modem_control
        ),
        (1, 0, 0x03, 0x03),
        "{state:?}"
    );
}

#[test]
fn vm_superio_serial_and_i8042_reset_classic() {
    let Some(_kvm) = kvm_or_skip("vm_superio_serial_and_i8042_reset_classic") else {
        return;
    };
    superio::<Classic>();
}

#[test]
fn vm_superio_serial_and_i8042_reset_fast() {
    let Some(_kvm) = kvm_or_skip("vm_superio_serial_and_i8042_reset_fast") else {
        return;
    };
    superio::<Fast>();
}
