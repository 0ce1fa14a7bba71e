//! Section 3: bus dispatch, registration and unregistration.
//!
//! Dispatch peers: kvm-bus (both flavors), the buses real Rust VMMs ship
//! ([`crate::peers`]: rust-vmm's vm-device `IoManager` behind a `RwLock`
//! or a `Mutex`, Cloud Hypervisor's `RwLock<BTreeMap<_, Weak<_>>>` bus,
//! Dragonball's copy-on-write table in an `ArcSwap`), and a plain
//! `RwLock<BTreeMap>` that dispatches under the read lock (the cheapest
//! form of the lock-based design, kept from earlier reports).

use crate::harness::{time_ns, with_background, Stats};
use kvm_bus::{Access, BusKind, Buses, Declined, IoDevice, IoRange, WriteResult};
use srcu::Flavor;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

/// First device address of the benchmark buses (MMIO).
pub const BASE: u64 = 0xd000_0000;
/// Distance between two devices.
pub const STRIDE: u64 = 0x1000;
/// Length of each device's range.
pub const DEV_LEN: u64 = 0x100;
/// Bus sizes measured by the dispatch benchmarks.
pub const SIZES: [usize; 4] = [1, 16, 64, 1000];

/// A device that accepts every access and does nothing.
#[derive(Debug, Default)]
pub struct Nop;

impl IoDevice for Nop {
    #[inline]
    fn read(&self, _addr: Access, data: &mut [u8]) -> Result<(), Declined> {
        data.fill(0);
        Ok(())
    }
    #[inline]
    fn write(&self, _addr: Access, data: &[u8]) -> WriteResult {
        black_box(data);
        Ok(None)
    }
}

/// Range of device `i`.
pub fn range(i: usize) -> IoRange {
    IoRange::new(BASE + i as u64 * STRIDE, DEV_LEN).expect("valid range")
}

/// The address the dispatch benchmarks write to on a bus of `n` devices:
/// inside the middle device.
pub fn target(n: usize) -> u64 {
    BASE + (n / 2) as u64 * STRIDE + 0x10
}

/// A bus a vCPU thread dispatches exits on.
pub trait DispatchBus: Sync + 'static {
    /// Key in JSON (`dispatch64_<KEY>_ns`) and benchmark ids.
    const KEY: &'static str;
    /// Name for tables.
    const LABEL: &'static str;
    /// A bus of `n` [`Nop`] devices at [`range`]`(0..n)`, settled: the
    /// work its construction left behind (kvm-bus: the deferred frees of
    /// the `n` replaced tables, with their grace periods) is done, so that
    /// it does not run on the other CPU, and for the fast flavor interrupt
    /// this one with `membarrier`, while dispatch is timed.
    fn with_devices(n: usize) -> Self;
    /// One guest write: look the device up and call it.
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool;
}

/// `kvm-bus` on `srcu` of flavor `F`: `read_lock`, `get_bus_srcu`, binary
/// search, device call, `read_unlock`.
pub struct SrcuBus<F: Flavor> {
    /// The buses.
    pub buses: Buses<F>,
}

impl<F: Flavor> SrcuBus<F> {
    /// Registers `n` more devices starting at index `from`.
    pub fn add(&self, from: usize, n: usize) -> Vec<Arc<dyn IoDevice>> {
        let mut slots = self.buses.lock_slots();
        (from..from + n)
            .map(|i| {
                let d: Arc<dyn IoDevice> = Arc::new(Nop);
                self.buses
                    .register_dev(&mut slots, BusKind::Mmio, range(i), d.clone())
                    .expect("register");
                d
            })
            .collect()
    }
}

macro_rules! srcu_bus {
    ($flavor:ty, $key:literal, $label:literal) => {
        impl DispatchBus for SrcuBus<$flavor> {
            const KEY: &'static str = $key;
            const LABEL: &'static str = $label;
            fn with_devices(n: usize) -> Self {
                let b = SrcuBus {
                    buses: Buses::<$flavor>::default(),
                };
                b.add(0, n);
                b.buses.srcu().barrier();
                b
            }
            #[inline]
            fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
                let g = self.buses.read_lock();
                self.buses
                    .get_bus_srcu(&g, BusKind::Mmio)
                    .write(addr, data)
                    .is_ok()
            }
        }
    };
}

srcu_bus!(srcu::Classic, "srcu", "kvm-bus (srcu classic)");
srcu_bus!(srcu::Fast, "srcu_fast", "kvm-bus (srcu fast)");

/// A `BTreeMap` bus table: base -> (length, device).
pub(crate) type Map = BTreeMap<u64, (u64, Arc<dyn IoDevice>)>;

fn btree_with(n: usize) -> Map {
    (0..n)
        .map(|i| {
            let r = range(i);
            (r.addr(), (r.len(), Arc::new(Nop) as Arc<dyn IoDevice>))
        })
        .collect()
}

#[inline]
pub(crate) fn btree_dispatch(map: &Map, addr: u64, data: &[u8]) -> bool {
    match map.range(..=addr).next_back() {
        Some((&base, (len, dev))) if addr - base + data.len() as u64 <= *len => dev
            .write(Access::new(base, addr - base, None), data)
            .is_ok(),
        _ => false,
    }
}

/// `std::sync::RwLock<BTreeMap<base, (len, device)>>`, dispatch under the
/// read lock.
pub struct RwLockBTreeBus(std::sync::RwLock<Map>);

impl DispatchBus for RwLockBTreeBus {
    const KEY: &'static str = "rwlock_btreemap";
    const LABEL: &'static str = "RwLock<BTreeMap>";
    fn with_devices(n: usize) -> Self {
        RwLockBTreeBus(std::sync::RwLock::new(btree_with(n)))
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        btree_dispatch(&self.0.read().unwrap(), addr, data)
    }
}

/// (ref) A kvm-bus table dispatched with no synchronisation at all:
/// `IoBus::write` by itself (lookup, range check, device call), the floor
/// under both kvm-bus rows, measured in the same rotation. What is left of
/// a kvm-bus row above it is the read section and `get_bus_srcu`. It also
/// shows the machine's phase: on the shared 2-vCPU hosts of these reports
/// this row, which has no locked instruction and no fence, doubles in
/// some runs together with every other row (the host lends the vCPU half
/// a core), while a locked instruction's latency does not: the fast/classic
/// ratio then rises (README, "Performance").
///
/// Not a bus a VMM could use: nothing protects the table from an update
/// (and none is ever made here).
pub struct BareTableBus {
    /// Owns the table (never read: nothing updates it).
    _buses: Buses<srcu::Classic>,
    /// The table published in `buses` when it was built.
    table: core::ptr::NonNull<kvm_bus::IoBus>,
}

// SAFETY: `table` points at an `IoBus`, which is `Sync` (every vCPU reads
// the published table): sharing or sending the pointer is sharing a
// `&IoBus`. It stays valid as long as `_buses` (see `dispatch`).
unsafe impl Sync for BareTableBus {}
// SAFETY: as for `Sync`.
unsafe impl Send for BareTableBus {}

impl DispatchBus for BareTableBus {
    const KEY: &'static str = "bare_table";
    const LABEL: &'static str = "(ref) the same kvm-bus table, no SRCU: IoBus::write alone";
    fn with_devices(n: usize) -> Self {
        let b = SrcuBus::<srcu::Classic>::with_devices(n);
        let table = {
            let slots = b.buses.lock_slots();
            core::ptr::NonNull::from(b.buses.get_bus(&slots, BusKind::Mmio))
        };
        BareTableBus {
            _buses: b.buses,
            table,
        }
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        // SAFETY: `table` is the table `_buses` published; a published
        // table is freed only after an update replaces it, and nothing
        // updates `_buses` (private, and this type offers no update). It
        // lives in its own allocation, which moving `buses` does not move.
        let table = unsafe { self.table.as_ref() };
        table.write(addr, data).is_ok()
    }
}

/// Receives every dispatch peer type in turn.
pub trait BusVisitor {
    /// Called once per bus type.
    fn visit<B: DispatchBus>(&mut self);
}

/// Hands every bus type to `v`, kvm-bus classic first (the baseline).
pub fn for_each_bus(v: &mut impl BusVisitor) {
    v.visit::<SrcuBus<srcu::Classic>>();
    v.visit::<SrcuBus<srcu::Fast>>();
    v.visit::<crate::peers::VmDeviceBus>();
    v.visit::<crate::peers::VmDeviceMutexBus>();
    v.visit::<crate::peers::ChBus>();
    v.visit::<crate::peers::DragonballBus>();
    v.visit::<crate::peers::DragonballCachedBus>();
    v.visit::<RwLockBTreeBus>();
    v.visit::<BareTableBus>();
}

/// Thread-CPU ns per dispatch on one thread (one batch of `iters`).
#[inline(never)]
pub fn dispatch_ns<B: DispatchBus>(bus: &B, addr: u64, iters: u64) -> f64 {
    let data = [1u8, 2, 3, 4];
    crate::harness::ns_per_op(iters, || {
        black_box(bus.dispatch(black_box(addr), &data));
    })
}

/// Per-thread ns per dispatch with `threads` threads on one bus.
pub fn dispatch_threads_ns<B: DispatchBus>(
    bus: &B,
    addr: u64,
    threads: usize,
    dur: std::time::Duration,
) -> crate::harness::Concurrent {
    let data = [1u8, 2, 3, 4];
    crate::harness::concurrent_for(threads, dur, || {
        black_box(bus.dispatch(black_box(addr), &data));
    })
}

// ---------------------------------------------------------------------
// Registration.

/// Device indices used by the registration benchmarks start here (above
/// the devices of any dispatch bus).
pub const REG_BASE_INDEX: usize = 4096;

/// How registration waits (or not) for readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterMode {
    /// `register_dev`: publish the new bus, free the old one with
    /// `call_srcu` (Linux 6.18+).
    Deferred,
    /// `register_dev` then `synchronize` on the same domain: what
    /// registration cost before Linux 6.18 (it waited a grace period
    /// inside, before freeing the old bus).
    SyncInside,
}

/// Registers one device, the way `mode` says.
pub fn register_one<F: Flavor>(
    buses: &Buses<F>,
    mode: RegisterMode,
    r: IoRange,
    d: Arc<dyn IoDevice>,
) {
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Mmio, r, d)
        .expect("register");
    if mode == RegisterMode::SyncInside {
        buses.srcu().synchronize();
    }
}

/// Latency of registering one device into a bus that holds `base` devices
/// (no readers). `batch` devices are registered (each timed), then removed
/// untimed with one `unregister_many`; `reps` samples in all.
pub fn register_latency<F: Flavor>(
    buses: &Buses<F>,
    mode: RegisterMode,
    reps: usize,
    batch: usize,
) -> Stats {
    let mut samples = Vec::with_capacity(reps);
    while samples.len() < reps {
        let n = batch.min(reps - samples.len());
        let mut devs = Vec::with_capacity(n);
        for i in 0..n {
            let d: Arc<dyn IoDevice> = Arc::new(Nop);
            let r = range(REG_BASE_INDEX + i);
            let dd = d.clone();
            samples.push(time_ns(|| register_one(buses, mode, r, dd)));
            devs.push(d);
        }
        let mut slots = buses.lock_slots();
        buses
            .unregister_many(&mut slots, BusKind::Mmio, &devs)
            .expect("unregister_many");
    }
    Stats { samples }
}

/// The quiet spell before an isolated update (`*_after_quiet`): past the
/// callback worker's 5 ms nap, so that it is asleep for good.
pub const QUIET_SPELL: std::time::Duration = std::time::Duration::from_millis(6);

/// Latency of isolated BAR moves: `move_range` of one device of a
/// 16-device bus, each the first update after a quiet spell, as a guest
/// relocating a BAR at run time makes it (inside the handler of its config
/// write, on the vCPU's exit path). Before each sample (untimed) the
/// deferred work is let finish and the thread sleeps past the callback
/// worker's nap (5 ms), so the worker is asleep for good. A move keeps its
/// retired table without a trim while the kept tables fit in 16 KiB; the
/// one that would pass it carries a trim, whose `call_srcu` wakes the
/// worker (a futex wake, and an IPI where its CPU is idle). Returns every
/// sample, then the samples of the moves that carried a trim (a callback
/// ran after them) and of those that did not.
pub fn move_range_after_quiet_latency<F: Flavor>(
    buses: &Buses<F>,
    reps: usize,
) -> (Stats, Stats, Stats) {
    let others: Vec<Arc<dyn IoDevice>> = (0..15).map(|_| Arc::new(Nop) as _).collect();
    let d: Arc<dyn IoDevice> = Arc::new(Nop);
    let ends = [range(REG_BASE_INDEX), range(REG_BASE_INDEX + 1)];
    {
        let mut slots = buses.lock_slots();
        buses
            .register_many(
                &mut slots,
                BusKind::Mmio,
                others
                    .iter()
                    .enumerate()
                    .map(|(i, o)| (range(REG_BASE_INDEX + 2 + i), o.clone())),
            )
            .expect("register_many");
        buses
            .register_dev(&mut slots, BusKind::Mmio, ends[0], d.clone())
            .expect("register");
    }
    let settle = || {
        while buses.srcu().pending_callbacks() > 0 {
            buses.srcu().barrier();
        }
    };
    let (mut all, mut trim, mut no_trim) = (vec![], vec![], vec![]);
    let mut at = 0;
    for _ in 0..reps {
        settle();
        // Not synchronisation: the quiet spell being measured after.
        std::thread::sleep(QUIET_SPELL);
        let ran = buses.srcu().stats().callbacks_run;
        let (from, to) = (ends[at], ends[1 - at]);
        at = 1 - at;
        let t = time_ns(|| {
            buses
                .move_range(&mut buses.lock_slots(), BusKind::Mmio, &d, from, to)
                .expect("move_range");
        });
        settle();
        all.push(t);
        if buses.srcu().stats().callbacks_run > ran {
            trim.push(t);
        } else {
            no_trim.push(t);
        }
    }
    let mut devs = others;
    devs.push(d);
    buses
        .unregister_many(&mut buses.lock_slots(), BusKind::Mmio, &devs)
        .expect("unregister_many");
    (
        Stats { samples: all },
        Stats { samples: trim },
        Stats { samples: no_trim },
    )
}

/// Latency of `unregister_dev` (one grace period) of a device registered
/// just before (untimed, its deferred free completed), with no readers.
pub fn unregister_latency<F: Flavor>(buses: &Buses<F>, reps: usize) -> Stats {
    Stats::collect(reps, || {
        let d: Arc<dyn IoDevice> = Arc::new(Nop);
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Mmio, range(REG_BASE_INDEX), d.clone())
            .expect("register");
        // A device is unplugged long after it was plugged: let the deferred
        // free of the registration finish first (untimed), as it would have.
        buses.srcu().barrier();
        time_ns(|| {
            buses
                .unregister_dev(&mut slots, BusKind::Mmio, &d)
                .expect("unregister");
        })
    })
}

/// Latency of `move_range` (a guest relocating a BAR): one device moved
/// back and forth between two ranges on an otherwise empty bus, the slots
/// lock taken inside the timed call as [`register_one`] does. Between
/// batches of `batch` moves the deferred frees are let finish (untimed).
pub fn move_range_latency<F: Flavor>(buses: &Buses<F>, reps: usize, batch: usize) -> Stats {
    let d: Arc<dyn IoDevice> = Arc::new(Nop);
    let ends = [range(REG_BASE_INDEX), range(REG_BASE_INDEX + 1)];
    buses
        .register_dev(&mut buses.lock_slots(), BusKind::Mmio, ends[0], d.clone())
        .expect("register");
    buses.srcu().barrier();
    let mut samples = Vec::with_capacity(reps);
    let mut at = 0;
    while samples.len() < reps {
        for _ in 0..batch.min(reps - samples.len()) {
            let (from, to) = (ends[at], ends[1 - at]);
            samples.push(time_ns(|| {
                let mut slots = buses.lock_slots();
                buses
                    .move_range(&mut slots, BusKind::Mmio, &d, from, to)
                    .expect("move_range");
            }));
            at = 1 - at;
        }
        buses.srcu().barrier();
    }
    buses
        .unregister_dev(&mut buses.lock_slots(), BusKind::Mmio, &d)
        .expect("unregister");
    Stats { samples }
}

/// Latencies of a removal started from inside a read section, as a device
/// handler starts it (a guest writing an eject register): from the
/// `start_unregister` call (slots lock included) to its return, when the
/// device is unpublished; and from the same start to `Removal::wait`
/// returning, when it is complete (the read section of the access ended
/// in between, as the handler returned). Each sample removes a device
/// registered just before (untimed, its deferred free completed).
pub fn removal_latency<F: Flavor>(buses: &Buses<F>, reps: usize) -> (Stats, Stats) {
    let (mut start, mut complete) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let d: Arc<dyn IoDevice> = Arc::new(Nop);
        buses
            .register_dev(
                &mut buses.lock_slots(),
                BusKind::Mmio,
                range(REG_BASE_INDEX),
                d.clone(),
            )
            .expect("register");
        buses.srcu().barrier();
        let section = buses.read_lock(); // the handler's access
        let t0 = std::time::Instant::now();
        let removal = buses
            .start_unregister(&mut buses.lock_slots(), BusKind::Mmio, &d)
            .expect("start_unregister");
        let t1 = t0.elapsed();
        drop(section); // the handler returns
        removal.wait().expect("wait");
        let t2 = t0.elapsed();
        start.push(t1.as_nanos() as f64);
        complete.push(t2.as_nanos() as f64);
    }
    (Stats { samples: start }, Stats { samples: complete })
}

/// [`unregister_latency`] while `readers` threads dispatch continuously to
/// another device of the same bus (vCPUs running).
pub fn unregister_latency_busy<F: Flavor>(reps: usize, readers: usize) -> Stats
where
    SrcuBus<F>: DispatchBus,
{
    let bus = SrcuBus::<F>::with_devices(1);
    let addr = target(1);
    let data = [1u8, 2, 3, 4];
    with_background(
        readers,
        || {
            black_box(bus.dispatch(black_box(addr), &data));
        },
        || unregister_latency(&bus.buses, reps),
    )
    .0
}

/// Time of one `unregister_many` of `n` devices (registered untimed just
/// before).
pub fn unregister_many_latency<F: Flavor>(buses: &Buses<F>, n: usize, reps: usize) -> Stats {
    Stats::collect(reps, || {
        let mut slots = buses.lock_slots();
        let devs: Vec<Arc<dyn IoDevice>> = (0..n)
            .map(|i| {
                let d: Arc<dyn IoDevice> = Arc::new(Nop);
                buses
                    .register_dev(
                        &mut slots,
                        BusKind::Mmio,
                        range(REG_BASE_INDEX + i),
                        d.clone(),
                    )
                    .expect("register");
                d
            })
            .collect();
        time_ns(|| {
            buses
                .unregister_many(&mut slots, BusKind::Mmio, &devs)
                .expect("unregister_many");
        })
    })
}

/// How the "VM start-up" registers its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// One `register_dev` per device (deferred free).
    OneByOne,
    /// One `register_dev` + `synchronize` per device (pre-6.18).
    OneByOneSync,
    /// One `register_many` with all of them.
    Many,
}

/// "VM start-up": registers `n` devices on a fresh bus (which already has
/// one device the readers hit) while `readers` threads dispatch to it
/// continuously; returns the wall time of the registrations in ns and the
/// number of dispatches the readers completed meanwhile.
pub fn startup<F: Flavor>(how: Startup, n: usize, readers: usize) -> (f64, u64)
where
    SrcuBus<F>: DispatchBus,
{
    let bus = SrcuBus::<F>::with_devices(1);
    let addr = target(1);
    let devs: Vec<(IoRange, Arc<dyn IoDevice>)> = (0..n)
        .map(|i| {
            (
                range(REG_BASE_INDEX + i),
                Arc::new(Nop) as Arc<dyn IoDevice>,
            )
        })
        .collect();
    let data = [1u8, 2, 3, 4];
    with_background(
        readers,
        || {
            black_box(bus.dispatch(black_box(addr), &data));
        },
        || {
            std::thread::sleep(std::time::Duration::from_micros(200));
            time_ns(|| match how {
                Startup::OneByOne | Startup::OneByOneSync => {
                    let mode = if how == Startup::OneByOne {
                        RegisterMode::Deferred
                    } else {
                        RegisterMode::SyncInside
                    };
                    for (r, d) in devs {
                        register_one(&bus.buses, mode, r, d);
                    }
                }
                Startup::Many => {
                    let mut slots = bus.buses.lock_slots();
                    bus.buses
                        .register_many(&mut slots, BusKind::Mmio, devs)
                        .expect("register_many");
                }
            })
        },
    )
}
