//! The buses real Rust VMMs ship, as dispatch and registration peers of
//! kvm-bus (issue "kvm-bus speaks rust-vmm", part 4).
//!
//! * [`VmDeviceBus`]: rust-vmm's own `vm_device::device_manager::IoManager`
//!   (crate vm-device 0.1, used as is) behind a `std::sync::RwLock`, the
//!   way a VMM shares it between vCPU threads: dispatch through its
//!   `MmioManager::mmio_write` under the read lock, registration through
//!   `register_mmio` / `deregister_mmio` under the write lock.
//!   [`VmDeviceMutexBus`] is the same behind a `Mutex`, as rust-vmm's
//!   vmm-reference shares it (`Arc<Mutex<IoManager>>`).
//! * [`ChBus`]: Cloud Hypervisor's `vm-device::Bus`, re-implemented here
//!   after its `vm-device/src/bus.rs`: `RwLock<BTreeMap<BusRange,
//!   Weak<dyn BusDeviceSync>>>`; an access takes the read lock, upgrades the
//!   `Weak` (and clones the `Arc`, as `first_before` does), *drops the
//!   lock*, and calls the device, which for the common `BusDevice` (`&mut
//!   self`) is a `Mutex<D>`. The device manager keeps the strong
//!   references.
//! * [`DragonballBus`]: Dragonball's (Kata Containers) design: the whole
//!   device table is an immutable `IoManager` behind
//!   `Arc<arc_swap::ArcSwap<_>>`, replaced copy-on-write under an update
//!   mutex. [`DragonballBus`] loads it with `ArcSwap::load` per access;
//!   [`DragonballCachedBus`] goes through a per-vCPU `arc_swap::Cache`, as
//!   Dragonball's `IoManagerCached` does (here kept in a thread-local,
//!   since [`DispatchBus::dispatch`] takes `&self`; the thread-local costs
//!   about a nanosecond a real vCPU struct would not).
//!
//! **Removal safety** (the device is never called after its removal
//! returns): kvm-bus yes (a grace period); both vm-device variants yes (the
//! device call runs under the read lock / mutex, removal takes the write
//! lock / mutex); Cloud Hypervisor's no (an access that upgraded the `Weak`
//! before the removal keeps calling the device after it); Dragonball's no
//! (a reader holding the old table, through its `Guard` or its `Cache`,
//! keeps calling the device after the new table is stored). The tests at
//! the end of this file show it with a device that blocks inside a call.

use crate::bus::{btree_dispatch, range, target, DispatchBus, Map, Nop, REG_BASE_INDEX};
use crate::harness::{time_ns, with_background, Stats};
use arc_swap::{ArcSwap, Cache};
use kvm_bus::{IoDevice, IoRange};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex, RwLock, Weak};
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_device::DeviceMmio;

/// A bus whose devices can be added and removed at run time, for the
/// registration benchmarks and the removal-safety tests.
pub trait UpdatePeer: DispatchBus {
    /// What the VMM keeps of a device (and hands to the bus when
    /// registering it).
    type Dev: Clone;
    /// What a removal guarantees (for the report's notes): whether the
    /// device can still be called after the removal returned, and why.
    const REMOVAL: &'static str;
    /// A new [`Nop`] device, in this bus's device type.
    fn new_dev() -> Self::Dev;
    /// Registers `dev` at `r`.
    fn register(&self, r: IoRange, dev: Self::Dev);
    /// Unregisters the device at `r`; returns when the bus's removal
    /// returns (which for some designs is before the device's last call).
    fn unregister(&self, r: IoRange);
}

// ---------------------------------------------------------------------
// rust-vmm vm-device 0.1: IoManager behind a RwLock (or a Mutex).

impl DeviceMmio for Nop {
    #[inline]
    fn mmio_read(&self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    #[inline]
    fn mmio_write(&self, _base: MmioAddress, _offset: MmioAddressOffset, data: &[u8]) {
        black_box(data);
    }
}

/// A vm-device MMIO device as `IoManager` holds it.
pub type VmDev = Arc<dyn DeviceMmio + Send + Sync>;

fn mmio_range(r: IoRange) -> MmioRange {
    MmioRange::new(MmioAddress(r.addr()), r.len()).expect("valid MmioRange")
}

/// How a VMM shares vm-device's `IoManager` between vCPU threads: a
/// `RwLock` (dispatch under the read lock) or a `Mutex` (rust-vmm's
/// vmm-reference, `Arc<Mutex<IoManager>>`).
pub trait SharedIoManager: Default + Send + Sync + 'static {
    /// Key in JSON.
    const KEY: &'static str;
    /// Name for tables.
    const LABEL: &'static str;
    /// Runs `f` on the manager as a vCPU reaches it (read lock, or the
    /// mutex), held across the device call.
    fn shared<R>(&self, f: impl FnOnce(&IoManager) -> R) -> R;
    /// Runs `f` on the manager as an updater reaches it (write lock, or the
    /// mutex).
    fn exclusive<R>(&self, f: impl FnOnce(&mut IoManager) -> R) -> R;
}

impl SharedIoManager for RwLock<IoManager> {
    const KEY: &'static str = "vm_device_iomanager";
    const LABEL: &'static str = "vm-device IoManager in RwLock";
    #[inline]
    fn shared<R>(&self, f: impl FnOnce(&IoManager) -> R) -> R {
        f(&self.read().unwrap())
    }
    fn exclusive<R>(&self, f: impl FnOnce(&mut IoManager) -> R) -> R {
        f(&mut self.write().unwrap())
    }
}

impl SharedIoManager for Mutex<IoManager> {
    const KEY: &'static str = "vm_device_iomanager_mutex";
    const LABEL: &'static str = "vm-device IoManager in Mutex";
    #[inline]
    fn shared<R>(&self, f: impl FnOnce(&IoManager) -> R) -> R {
        f(&self.lock().unwrap())
    }
    fn exclusive<R>(&self, f: impl FnOnce(&mut IoManager) -> R) -> R {
        f(&mut self.lock().unwrap())
    }
}

/// `vm_device::device_manager::IoManager` shared as `L` says.
#[derive(Default)]
pub struct VmDeviceShared<L>(pub L);

/// `IoManager` in a `std::sync::RwLock`.
pub type VmDeviceBus = VmDeviceShared<RwLock<IoManager>>;

/// `IoManager` in a `std::sync::Mutex`, as rust-vmm's vmm-reference shares
/// it between vCPUs.
pub type VmDeviceMutexBus = VmDeviceShared<Mutex<IoManager>>;

impl<L: SharedIoManager> VmDeviceShared<L> {
    /// `register_mmio` under the exclusive lock.
    pub fn insert(&self, r: IoRange, dev: VmDev) {
        self.0
            .exclusive(|m| m.register_mmio(mmio_range(r), dev).expect("register_mmio"));
    }

    /// `deregister_mmio` under the exclusive lock: waits for every access
    /// in flight (each holds the shared lock across the device call).
    pub fn remove(&self, r: IoRange) -> Option<VmDev> {
        self.0
            .exclusive(|m| m.deregister_mmio(MmioAddress(r.addr())))
            .map(|(_, d)| d)
    }
}

impl<L: SharedIoManager> DispatchBus for VmDeviceShared<L> {
    const KEY: &'static str = L::KEY;
    const LABEL: &'static str = L::LABEL;
    fn with_devices(n: usize) -> Self {
        let b = Self::default();
        for i in 0..n {
            b.insert(range(i), Arc::new(Nop));
        }
        b
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        self.0
            .shared(|m| m.mmio_write(MmioAddress(addr), data).is_ok())
    }
}

impl UpdatePeer for VmDeviceBus {
    type Dev = VmDev;
    const REMOVAL: &'static str = "safe: deregister_mmio takes the write lock, which waits for \
        every access in flight (each holds the read lock across the device call)";
    fn new_dev() -> VmDev {
        Arc::new(Nop)
    }
    fn register(&self, r: IoRange, dev: VmDev) {
        self.insert(r, dev);
    }
    fn unregister(&self, r: IoRange) {
        self.remove(r).expect("deregister_mmio");
    }
}

// ---------------------------------------------------------------------
// Cloud Hypervisor's bus (vm-device/src/bus.rs), modelled.

/// Cloud Hypervisor's `BusDevice`: a device with `&mut self` handlers,
/// registered inside a `Mutex`.
pub trait ChBusDevice: Send {
    /// A read at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A write at `base + offset`; a barrier the vCPU waits on, if any.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>>;
}

/// Cloud Hypervisor's `BusDeviceSync`: what the bus holds (`&self`).
pub trait ChBusDeviceSync: Send + Sync {
    /// A read at `base + offset`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// A write at `base + offset`.
    fn write(&self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>>;
}

impl<B: ChBusDevice> ChBusDeviceSync for Mutex<B> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        self.lock()
            .expect("Failed to acquire device lock")
            .read(base, offset, data);
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
        self.lock()
            .expect("Failed to acquire device lock")
            .write(base, offset, data)
    }
}

impl ChBusDevice for Nop {
    #[inline]
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    #[inline]
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
        black_box(data);
        None
    }
}

/// Cloud Hypervisor's `BusRange`: ordered (and compared) by base only.
#[derive(Clone, Copy, Debug)]
struct ChRange {
    base: u64,
    len: u64,
}

impl ChRange {
    fn overlaps(&self, base: u64, len: u64) -> bool {
        self.base < base + len && base < self.base + self.len
    }
}

impl PartialEq for ChRange {
    fn eq(&self, o: &Self) -> bool {
        self.base == o.base
    }
}
impl Eq for ChRange {}
impl PartialOrd for ChRange {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ChRange {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.base.cmp(&o.base)
    }
}

/// Errors of [`ChBus`] (Cloud Hypervisor's `vm_device::bus::Error`).
#[derive(Debug, PartialEq, Eq)]
pub enum ChError {
    /// The new range overlaps a registered one.
    Overlap,
    /// Nothing is registered there.
    MissingAddressRange,
}

/// A device as [`ChBus`] holds it (the VMM keeps it alive).
pub type ChDev = Arc<dyn ChBusDeviceSync>;

/// Cloud Hypervisor's `vm_device::Bus`: `RwLock<BTreeMap<BusRange,
/// Weak<dyn BusDeviceSync>>>`, with the device manager's strong
/// references beside it (the bus alone would let its devices go).
#[derive(Default)]
pub struct ChBus {
    devices: RwLock<BTreeMap<ChRange, Weak<dyn ChBusDeviceSync>>>,
    /// The device manager's `Vec<Arc<dyn BusDeviceSync>>`.
    owned: Mutex<Vec<ChDev>>,
}

impl ChBus {
    /// As in Cloud Hypervisor: the read lock covers the lookup, the
    /// `Weak::upgrade` and an `Arc` clone, not the device call.
    #[inline]
    fn first_before(&self, addr: u64) -> Option<(ChRange, ChDev)> {
        let devices = self.devices.read().unwrap();
        let (range, dev) = devices
            .range(..=ChRange { base: addr, len: 1 })
            .next_back()?;
        #[allow(clippy::redundant_clone)] // what Cloud Hypervisor does
        dev.upgrade().map(|d| (*range, d.clone()))
    }

    #[inline]
    fn resolve(&self, addr: u64) -> Option<(u64, u64, ChDev)> {
        let (range, dev) = self.first_before(addr)?;
        let offset = addr - range.base;
        (offset < range.len).then_some((range.base, offset, dev))
    }

    /// Inserts `device` at `[base, base + len)`; the bus keeps a `Weak`
    /// only (the caller keeps `device` alive).
    pub fn insert(&self, device: &ChDev, base: u64, len: u64) -> Result<(), ChError> {
        if self
            .devices
            .read()
            .unwrap()
            .iter()
            .any(|(r, _)| r.overlaps(base, len))
        {
            return Err(ChError::Overlap);
        }
        if self
            .devices
            .write()
            .unwrap()
            .insert(ChRange { base, len }, Arc::downgrade(device))
            .is_some()
        {
            return Err(ChError::Overlap);
        }
        Ok(())
    }

    /// Removes the entry at `[base, base + len)` (under the write lock,
    /// which accesses do not hold while they call the device).
    pub fn remove(&self, base: u64, len: u64) -> Result<(), ChError> {
        match self.devices.write().unwrap().remove(&ChRange { base, len }) {
            Some(_) => Ok(()),
            None => Err(ChError::MissingAddressRange),
        }
    }

    /// A guest write.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<Arc<Barrier>>, ChError> {
        match self.resolve(addr) {
            Some((base, offset, dev)) => Ok(dev.write(base, offset, data)),
            None => Err(ChError::MissingAddressRange),
        }
    }

    /// Registers `dev` and keeps it alive, as the device manager does.
    pub fn add(&self, r: IoRange, dev: ChDev) {
        self.insert(&dev, r.addr(), r.len()).expect("insert");
        self.owned.lock().unwrap().push(dev);
    }
}

impl DispatchBus for ChBus {
    const KEY: &'static str = "ch_bus";
    const LABEL: &'static str = "Cloud Hypervisor bus (RwLock, Weak, Mutex<device>)";
    fn with_devices(n: usize) -> Self {
        let b = ChBus::default();
        for i in 0..n {
            b.add(range(i), Arc::new(Mutex::new(Nop)));
        }
        b
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        self.write(addr, data).is_ok()
    }
}

impl UpdatePeer for ChBus {
    type Dev = ChDev;
    const REMOVAL: &'static str = "NOT safe: an access drops the read lock before calling the \
        device it upgraded, so it may call the device after remove returned";
    fn new_dev() -> ChDev {
        Arc::new(Mutex::new(Nop))
    }
    /// `insert` only: the caller keeps the strong reference.
    fn register(&self, r: IoRange, dev: ChDev) {
        self.insert(&dev, r.addr(), r.len()).expect("insert");
    }
    fn unregister(&self, r: IoRange) {
        self.remove(r.addr(), r.len()).expect("remove");
    }
}

// ---------------------------------------------------------------------
// Dragonball: the table behind ArcSwap, copy-on-write.

/// Dragonball's `IoManager` (dbs-device): an immutable map from range to
/// device, replaced whole on every change.
pub type DbTable = Map;

/// Dragonball's device table: `Arc<ArcSwap<IoManager>>`, updated
/// copy-on-write under a mutex (its `DeviceManagerTx`), read with
/// `ArcSwap::load` per access.
pub struct DragonballBus {
    table: Arc<ArcSwap<DbTable>>,
    update: Mutex<()>,
}

impl Default for DragonballBus {
    fn default() -> Self {
        DragonballBus {
            table: Arc::new(ArcSwap::from_pointee(DbTable::new())),
            update: Mutex::new(()),
        }
    }
}

impl DragonballBus {
    fn update(&self, f: impl FnOnce(&mut DbTable)) {
        let _tx = self.update.lock().unwrap();
        let mut t = DbTable::clone(&self.table.load());
        f(&mut t);
        self.table.store(Arc::new(t));
    }

    /// Clone the table, insert, store.
    pub fn insert(&self, r: IoRange, dev: Arc<dyn IoDevice>) {
        self.update(|t| {
            let clash = t
                .range(..=r.last())
                .next_back()
                .is_some_and(|(&b, &(l, _))| b + l > r.addr());
            assert!(!clash, "overlap");
            t.insert(r.addr(), (r.len(), dev));
        });
    }

    /// Clone the table, remove, store: returns at once, whatever readers
    /// still hold the old table.
    pub fn remove(&self, r: IoRange) {
        self.update(|t| {
            t.remove(&r.addr()).expect("registered");
        });
    }
}

impl DispatchBus for DragonballBus {
    const KEY: &'static str = "dragonball_arcswap";
    const LABEL: &'static str = "Dragonball table in ArcSwap (load per access)";
    fn with_devices(n: usize) -> Self {
        let b = DragonballBus::default();
        b.update(|t| {
            for i in 0..n {
                let r = range(i);
                t.insert(r.addr(), (r.len(), Arc::new(Nop) as Arc<dyn IoDevice>));
            }
        });
        b
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        btree_dispatch(&self.table.load(), addr, data)
    }
}

impl UpdatePeer for DragonballBus {
    type Dev = Arc<dyn IoDevice>;
    const REMOVAL: &'static str = "NOT safe: store returns at once; a reader holding the old \
        table (Guard or Cache) may call the device after it";
    fn new_dev() -> Arc<dyn IoDevice> {
        Arc::new(Nop)
    }
    fn register(&self, r: IoRange, dev: Arc<dyn IoDevice>) {
        self.insert(r, dev);
    }
    fn unregister(&self, r: IoRange) {
        self.remove(r);
    }
}

type DbCache = Cache<Arc<ArcSwap<DbTable>>, Arc<DbTable>>;

thread_local! {
    /// This thread's (vCPU's) `IoManagerCached`.
    static DB_CACHE: RefCell<Option<DbCache>> = const { RefCell::new(None) };
}

/// [`DragonballBus`] read as Dragonball's vCPUs read it: through a
/// per-vCPU `arc_swap::Cache` (`IoManagerCached`), which checks the
/// current pointer and reloads only when it changed. The cache keeps the
/// table it last loaded (and its devices) alive until the vCPU's next
/// access.
#[derive(Default)]
pub struct DragonballCachedBus(pub DragonballBus);

impl DispatchBus for DragonballCachedBus {
    const KEY: &'static str = "dragonball_cache";
    const LABEL: &'static str = "Dragonball table in ArcSwap (per-vCPU Cache)";
    fn with_devices(n: usize) -> Self {
        DragonballCachedBus(DragonballBus::with_devices(n))
    }
    #[inline]
    fn dispatch(&self, addr: u64, data: &[u8]) -> bool {
        DB_CACHE.with(|c| {
            let mut c = c.borrow_mut();
            let c = match &mut *c {
                Some(c) if std::ptr::eq(c.arc_swap(), &*self.0.table) => c,
                other => other.insert(Cache::new(Arc::clone(&self.0.table))),
            };
            btree_dispatch(c.load(), addr, data)
        })
    }
}

// ---------------------------------------------------------------------
// Registration latencies of the peers, measured as kvm-bus's are
// (`bus::register_latency`, `bus::unregister_latency`).

/// Latency of registering one device into a bus of `P` that holds the
/// devices of the current batch only: `batch` devices are registered one
/// after another (each timed), then removed untimed; `reps` samples.
pub fn register_latency<P: UpdatePeer>(reps: usize, batch: usize) -> Stats {
    let bus = P::with_devices(0);
    let mut samples = Vec::with_capacity(reps);
    while samples.len() < reps {
        let n = batch.min(reps - samples.len());
        let mut devs = Vec::with_capacity(n);
        for i in 0..n {
            let d = P::new_dev();
            let dd = d.clone();
            let r = range(REG_BASE_INDEX + i);
            samples.push(time_ns(|| bus.register(r, dd)));
            devs.push(d);
        }
        for i in 0..n {
            bus.unregister(range(REG_BASE_INDEX + i));
        }
    }
    Stats { samples }
}

/// Latency of unregistering a device registered just before (untimed) on
/// an otherwise empty bus of `P`, with no readers.
pub fn unregister_latency<P: UpdatePeer>(reps: usize) -> Stats {
    let bus = P::with_devices(0);
    Stats::collect(reps, || {
        let d = P::new_dev();
        let r = range(REG_BASE_INDEX);
        bus.register(r, d.clone());
        let ns = time_ns(|| bus.unregister(r));
        drop(d);
        ns
    })
}

/// [`unregister_latency`] while `readers` threads dispatch continuously to
/// another device of the same bus (vCPUs running).
pub fn unregister_latency_busy<P: UpdatePeer>(reps: usize, readers: usize) -> Stats {
    let bus = P::with_devices(1);
    let addr = target(1);
    let data = [1u8, 2, 3, 4];
    with_background(
        readers,
        || {
            black_box(bus.dispatch(black_box(addr), &data));
        },
        || {
            Stats::collect(reps, || {
                let d = P::new_dev();
                let r = range(REG_BASE_INDEX);
                bus.register(r, d.clone());
                let ns = time_ns(|| bus.unregister(r));
                drop(d);
                ns
            })
        },
    )
    .0
}

#[cfg(test)]
mod tests {
    //! Removal safety, shown with a device that blocks inside a call: a
    //! vCPU thread's access enters the device and waits there; another
    //! thread removes the device. Safe designs return from the removal
    //! only after the call has left the device; unsafe ones return while it
    //! is still inside, and the device then runs on after its removal
    //! returned. Synchronisation is by channels only.

    use super::*;
    use kvm_bus::{Access, BusKind, Buses, Declined, WriteResult};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
    use std::time::Duration;

    /// The state of the blocking device.
    struct Probe {
        /// Taken by the first call, which signals it is inside the device.
        entered: Mutex<Option<Sender<()>>>,
        /// The first call waits here until the test releases it.
        release: Mutex<Receiver<()>>,
        in_call: AtomicBool,
        /// Set by the remover right after the removal returned.
        removed: AtomicBool,
        /// Device code that ran after the removal had returned.
        after_removal: AtomicUsize,
    }

    impl Probe {
        fn new() -> (Arc<Probe>, Receiver<()>, Sender<()>) {
            let (entered_tx, entered_rx) = mpsc::channel();
            let (release_tx, release_rx) = mpsc::channel();
            let p = Probe {
                entered: Mutex::new(Some(entered_tx)),
                release: Mutex::new(release_rx),
                in_call: AtomicBool::new(false),
                removed: AtomicBool::new(false),
                after_removal: AtomicUsize::new(0),
            };
            (Arc::new(p), entered_rx, release_tx)
        }

        fn call(&self) {
            self.in_call.store(true, SeqCst);
            let first = self.entered.lock().unwrap().take();
            if let Some(tx) = first {
                tx.send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            // The device's work (touching its state, raising an IRQ...).
            if self.removed.load(SeqCst) {
                self.after_removal.fetch_add(1, SeqCst);
            }
            self.in_call.store(false, SeqCst);
        }
    }

    /// One device type for every bus's device trait.
    struct ProbeDev(Arc<Probe>);

    impl IoDevice for ProbeDev {
        fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> {
            Err(Declined)
        }
        fn write(&self, _: Access, _: &[u8]) -> WriteResult {
            self.0.call();
            Ok(None)
        }
    }

    impl DeviceMmio for ProbeDev {
        fn mmio_read(&self, _: MmioAddress, _: MmioAddressOffset, _: &mut [u8]) {}
        fn mmio_write(&self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {
            self.0.call();
        }
    }

    impl ChBusDevice for ProbeDev {
        fn read(&mut self, _: u64, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: u64, _: &[u8]) -> Option<Arc<Barrier>> {
            self.0.call();
            None
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        /// The removal returned while the access was still in the device.
        returned_during_call: bool,
        /// Device code run after the removal returned.
        after_removal: usize,
    }

    const SAFE: Outcome = Outcome {
        returned_during_call: false,
        after_removal: 0,
    };
    const UNSAFE: Outcome = Outcome {
        returned_during_call: true,
        after_removal: 1,
    };

    /// Runs one access that blocks in the device (`dispatch`, on a "vCPU"
    /// thread) against one removal (`remove`, on another thread).
    ///
    /// For a design expected to be unsafe, the test waits (on a channel)
    /// for the removal to return while the device is still blocked, then
    /// releases it. For one expected to be safe, that would never happen:
    /// it observes for a while that the removal has not returned (this
    /// only strengthens the test; nothing depends on its length), then
    /// releases the device and waits for the removal.
    fn run(
        probe: &Arc<Probe>,
        entered: Receiver<()>,
        release: Sender<()>,
        dispatch: impl FnOnce() + Send,
        remove: impl FnOnce() + Send,
        expect_safe: bool,
    ) -> Outcome {
        std::thread::scope(|s| {
            let vcpu = s.spawn(dispatch);
            entered.recv().expect("the access reached the device");
            let (start_tx, start_rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel();
            let p = Arc::clone(probe);
            let remover = s.spawn(move || {
                start_tx.send(()).unwrap();
                remove();
                let during = p.in_call.load(SeqCst);
                p.removed.store(true, SeqCst);
                done_tx.send(during).unwrap();
            });
            start_rx.recv().unwrap();
            let early = if expect_safe {
                match done_rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(d) => Some(d),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(e) => panic!("remover: {e}"),
                }
            } else {
                Some(
                    done_rx
                        .recv_timeout(Duration::from_secs(60))
                        .expect("the removal returned while the device was blocked"),
                )
            };
            if expect_safe {
                assert_eq!(early, None, "removal returned while the device was busy");
            }
            release.send(()).unwrap();
            vcpu.join().unwrap();
            let during = match early {
                Some(d) => d,
                None => done_rx.recv().unwrap(),
            };
            remover.join().unwrap();
            Outcome {
                returned_during_call: during,
                after_removal: probe.after_removal.load(SeqCst),
            }
        })
    }

    const R: IoRange = match IoRange::new(0xd000_0000, 0x100) {
        Ok(r) => r,
        Err(_) => panic!(),
    };
    const ADDR: u64 = 0xd000_0010;

    /// kvm-bus with the device blocked inside an access while `remove`
    /// takes it off the bus.
    fn kvm_bus_case<F: srcu::Flavor>(
        buses: Buses<F>,
        remove: impl FnOnce(&Buses<F>, &Arc<dyn IoDevice>) + Send,
    ) -> Outcome {
        let (probe, entered, release) = Probe::new();
        let dev: Arc<dyn IoDevice> = Arc::new(ProbeDev(Arc::clone(&probe)));
        buses
            .register_dev(&mut buses.lock_slots(), BusKind::Mmio, R, Arc::clone(&dev))
            .unwrap();
        let out = run(
            &probe,
            entered,
            release,
            || buses.write(BusKind::Mmio, ADDR, &[1]).unwrap(),
            || remove(&buses, &dev),
            true,
        );
        assert_eq!(Arc::strong_count(&dev), 1, "kvm-bus let the device go");
        out
    }

    fn unregister_dev<F: srcu::Flavor>(buses: &Buses<F>, dev: &Arc<dyn IoDevice>) {
        buses
            .unregister_dev(&mut buses.lock_slots(), BusKind::Mmio, dev)
            .unwrap();
    }

    #[test]
    fn kvm_bus_removal_is_safe() {
        assert_eq!(kvm_bus_case(Buses::new(), unregister_dev), SAFE);
        assert_eq!(kvm_bus_case(Buses::new_fast(), unregister_dev), SAFE);
    }

    #[test]
    fn kvm_bus_start_unregister_completes_after_the_call() {
        // A removal started while the access is in the device: unpublished
        // at once, complete (Removal::wait returns) only after the call.
        let out = kvm_bus_case(Buses::new(), |buses, dev| {
            let removal = buses
                .start_unregister(&mut buses.lock_slots(), BusKind::Mmio, dev)
                .unwrap();
            assert!(buses.get_dev(BusKind::Mmio, ADDR).is_none());
            removal.wait().unwrap();
        });
        assert_eq!(out, SAFE);
    }

    fn vm_device_removal_is_safe<L: SharedIoManager>() {
        let (probe, entered, release) = Probe::new();
        let bus = VmDeviceShared::<L>::default();
        bus.insert(R, Arc::new(ProbeDev(Arc::clone(&probe))));
        let out = run(
            &probe,
            entered,
            release,
            || assert!(bus.dispatch(ADDR, &[1])),
            || {
                bus.remove(R).unwrap();
            },
            true,
        );
        assert_eq!(out, SAFE, "{}", L::LABEL);
    }

    #[test]
    fn vm_device_iomanager_removal_is_safe() {
        vm_device_removal_is_safe::<RwLock<IoManager>>();
        vm_device_removal_is_safe::<Mutex<IoManager>>();
    }

    #[test]
    fn cloud_hypervisor_bus_removal_is_unsafe() {
        let (probe, entered, release) = Probe::new();
        let bus = ChBus::default();
        let dev: ChDev = Arc::new(Mutex::new(ProbeDev(Arc::clone(&probe))));
        bus.insert(&dev, R.addr(), R.len()).unwrap();
        let out = run(
            &probe,
            entered,
            release,
            || assert!(bus.dispatch(ADDR, &[1])),
            || bus.remove(R.addr(), R.len()).unwrap(),
            false,
        );
        // The access that upgraded its Weak before the removal ran the
        // device after `remove` returned.
        assert_eq!(out, UNSAFE);
        assert!(!bus.dispatch(ADDR, &[1]), "new accesses miss it");
    }

    #[test]
    fn dragonball_arcswap_removal_is_unsafe() {
        for cached in [false, true] {
            let (probe, entered, release) = Probe::new();
            let bus = DragonballCachedBus::default();
            let dev: Arc<dyn IoDevice> = Arc::new(ProbeDev(Arc::clone(&probe)));
            bus.0.insert(R, Arc::clone(&dev));
            let out = run(
                &probe,
                entered,
                release,
                || {
                    assert!(if cached {
                        bus.dispatch(ADDR, &[1])
                    } else {
                        bus.0.dispatch(ADDR, &[1])
                    })
                },
                || bus.0.remove(R),
                false,
            );
            // The reader's snapshot (Guard or Cache) still held the device
            // when the new table was stored.
            assert_eq!(out, UNSAFE, "cached: {cached}");
            assert!(!bus.0.dispatch(ADDR, &[1]), "new accesses miss it");
        }
    }

    #[test]
    fn peers_dispatch_and_update() {
        fn check<P: UpdatePeer>() {
            let bus = P::with_devices(64);
            assert!(bus.dispatch(target(64), &[1, 2, 3, 4]));
            let r = range(REG_BASE_INDEX);
            let d = P::new_dev();
            bus.register(r, d.clone());
            assert!(bus.dispatch(r.addr() + 4, &[1]), "{}", P::LABEL);
            bus.unregister(r);
            assert!(!bus.dispatch(r.addr() + 4, &[1]), "{}", P::LABEL);
        }
        check::<VmDeviceBus>();
        check::<ChBus>();
        check::<DragonballBus>();
        let b = DragonballCachedBus::with_devices(64);
        assert!(b.dispatch(target(64), &[1]));
        // The cache follows a store.
        b.0.remove(range(32));
        assert!(!b.dispatch(target(64), &[1]));
        let m = VmDeviceMutexBus::with_devices(64);
        assert!(m.dispatch(target(64), &[1]));
    }
}
