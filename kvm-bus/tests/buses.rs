//! Integration tests of the update side, error paths and teardown.

use kvm_bus::{
    Access, BusError, BusKind, Buses, Classic, Declined, Fast, Flavor, IoBus, IoDevice, IoRange,
    Srcu, WriteResult, MAX_IO_BUS_DEVICES,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

/// Counts calls; sets a flag when dropped.
struct Probe {
    calls: AtomicUsize,
    dropped: Arc<AtomicBool>,
}

impl Probe {
    fn new() -> (Arc<Probe>, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let p = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            dropped: dropped.clone(),
        });
        (p, dropped)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped.store(true, SeqCst);
    }
}

impl IoDevice for Probe {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.calls.fetch_add(1, SeqCst);
        data.fill(0x5a);
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        Ok(None)
    }
}

fn r(addr: u64, len: u64) -> IoRange {
    IoRange::new(addr, len).unwrap()
}

fn dynp(p: &Arc<Probe>) -> Arc<dyn IoDevice> {
    p.clone()
}

/// Waits until the callback worker has nothing left to do: the deferred
/// frees ran, and the retired-table trims, which re-queue themselves until
/// they find no update since, have stopped. Afterwards no grace period is
/// in flight until something is queued again.
fn quiesce<F: Flavor>(buses: &Buses<F>) {
    while buses.srcu().pending_callbacks() > 0 {
        buses.srcu().barrier();
    }
}

/// Registers `devs` one by one (each `register_dev` retires a table) on
/// the PIO bus, 4 ports each from `base`.
fn register_one_by_one<F: Flavor>(
    buses: &Buses<F>,
    slots: &mut kvm_bus::SlotsGuard<'_>,
    base: u64,
    devs: &[Arc<dyn IoDevice>],
) {
    for (i, d) in devs.iter().enumerate() {
        buses
            .register_dev(slots, BusKind::Pio, r(base + 4 * i as u64, 4), d.clone())
            .unwrap();
    }
}

fn bus_ptr<F: Flavor>(buses: &Buses<F>, kind: BusKind) -> *const IoBus {
    let slots = buses.lock_slots();
    buses.get_bus(&slots, kind) as *const IoBus
}

#[test]
fn buses_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Buses<Classic>>();
    check::<Buses<Fast>>();
    check::<IoBus>();
    check::<BusError>();
}

#[test]
fn kinds_are_independent() {
    let buses = Buses::new();
    let (p, _) = Probe::new();
    buses
        .register_dev(&mut buses.lock_slots(), BusKind::Pio, r(0x60, 1), dynp(&p))
        .unwrap();
    assert!(buses.write(BusKind::Pio, 0x60, &[1]).is_ok());
    assert_eq!(
        buses.write(BusKind::Mmio, 0x60, &[1]),
        Err(BusError::Unhandled { addr: 0x60, len: 1 })
    );
    assert!(buses.write(BusKind::FastMmio, 0x60, &[1]).is_err());
    assert_eq!(p.calls.load(SeqCst), 1);
}

#[test]
fn unregister_drops_every_reference_before_returning() {
    for _ in 0..20 {
        let buses = Buses::new();
        let (p, dropped) = Probe::new();
        let (other, _) = Probe::new();
        let dev = dynp(&p);
        drop(p);
        let mut slots = buses.lock_slots();
        // Several registrations: each retires an old table (with a pointer
        // to `dev`), kept until a grace period or handed to call_srcu;
        // those must not keep `dev` alive.
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x1000, 8), dev.clone())
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x2000, 8), dynp(&other))
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x3000, 8), dev.clone())
            .unwrap();
        assert!(Arc::strong_count(&dev) > 1);
        buses
            .unregister_dev(&mut slots, BusKind::Mmio, &dev)
            .unwrap();
        assert_eq!(Arc::strong_count(&dev), 1, "buses still hold the device");
        assert!(!dropped.load(SeqCst));
        drop(dev);
        assert!(dropped.load(SeqCst), "last reference was ours");
        assert_eq!(buses.get_bus(&slots, BusKind::Mmio).len(), 1);
        drop(slots);
        assert!(buses.write(BusKind::Mmio, 0x1000, &[0]).is_err());
        assert!(buses.write(BusKind::Mmio, 0x2000, &[0]).is_ok());
    }
}

#[test]
fn unregister_many_one_grace_period_and_all_or_nothing() {
    let buses = Buses::new();
    let mut slots = buses.lock_slots();
    let probes: Vec<_> = (0..50).map(|_| Probe::new().0).collect();
    let devs: Vec<Arc<dyn IoDevice>> = probes.iter().map(dynp).collect();
    buses
        .register_many(
            &mut slots,
            BusKind::FastMmio,
            devs.iter()
                .enumerate()
                .map(|(i, d)| (r(0x1_0000 + 4 * i as u64, 4), d.clone())),
        )
        .unwrap();
    assert_eq!(buses.get_bus(&slots, BusKind::FastMmio).len(), 50);

    // One unknown device: error, nothing removed, no grace period.
    let (stranger, _) = Probe::new();
    let mut with_stranger = devs[..10].to_vec();
    with_stranger.push(dynp(&stranger));
    let before = bus_ptr_locked(&buses, &slots);
    let gps = buses.srcu().completed_grace_periods();
    assert_eq!(
        buses.unregister_many(&mut slots, BusKind::FastMmio, &with_stranger),
        Err(BusError::NotRegistered {
            kind: BusKind::FastMmio
        })
    );
    assert_eq!(bus_ptr_locked(&buses, &slots), before);
    assert_eq!(buses.get_bus(&slots, BusKind::FastMmio).len(), 50);

    // Empty batch: nothing.
    buses
        .unregister_many(&mut slots, BusKind::FastMmio, &[])
        .unwrap();
    assert_eq!(bus_ptr_locked(&buses, &slots), before);

    // Duplicates in the batch are fine.
    let mut batch = devs[..40].to_vec();
    batch.push(devs[0].clone());
    buses
        .unregister_many(&mut slots, BusKind::FastMmio, &batch)
        .unwrap();
    let spent = buses.srcu().completed_grace_periods() - gps;
    assert!(spent <= 4, "{spent} grace periods for one batch");
    assert_eq!(buses.get_bus(&slots, BusKind::FastMmio).len(), 10);
    drop(batch);
    drop(with_stranger);
    for (i, d) in devs.iter().enumerate() {
        assert_eq!(Arc::strong_count(d), if i < 40 { 2 } else { 3 }, "dev {i}");
    }
}

fn bus_ptr_locked(buses: &Buses, slots: &kvm_bus::SlotsGuard<'_>) -> *const IoBus {
    buses.get_bus(slots, BusKind::FastMmio) as *const IoBus
}

#[test]
fn errors_leave_the_published_bus_untouched() {
    let buses = Buses::with_srcu(Srcu::new(), 2);
    let (a, _) = Probe::new();
    let (b, _) = Probe::new();
    let (c, _) = Probe::new();
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(0x70, 2), dynp(&a))
            .unwrap();
    }
    let before = bus_ptr(&buses, BusKind::Pio);

    // Bad ranges never reach the bus: the type cannot hold them.
    assert_eq!(
        IoRange::new(0x70, 0),
        Err(BusError::ZeroLength { addr: 0x70 })
    );
    assert_eq!(
        IoRange::new(u64::MAX - 2, 4),
        Err(BusError::Overflow {
            addr: u64::MAX - 2,
            len: 4
        })
    );

    {
        let mut slots = buses.lock_slots();
        // Full (cap 2): a batch of two does not fit next to `a`.
        assert_eq!(
            buses.register_many(
                &mut slots,
                BusKind::Pio,
                [(r(0x80, 1), dynp(&b)), (r(0x81, 1), dynp(&c))]
            ),
            Err(BusError::BusFull {
                kind: BusKind::Pio,
                max: 2
            })
        );
        assert_eq!(buses.get_bus(&slots, BusKind::Pio) as *const IoBus, before);
        // Unknown device.
        assert_eq!(
            buses.unregister_dev(&mut slots, BusKind::Pio, &dynp(&b)),
            Err(BusError::NotRegistered { kind: BusKind::Pio })
        );
        // Registered, but on another bus.
        assert_eq!(
            buses.unregister_dev(&mut slots, BusKind::Mmio, &dynp(&a)),
            Err(BusError::NotRegistered {
                kind: BusKind::Mmio
            })
        );
        assert_eq!(buses.get_bus(&slots, BusKind::Pio) as *const IoBus, before);
        // Empty batch: no publish.
        buses
            .register_many(&mut slots, BusKind::Pio, std::iter::empty())
            .unwrap();
        assert_eq!(buses.get_bus(&slots, BusKind::Pio) as *const IoBus, before);
    }
    // Bad accesses: typed errors, nothing called, nothing changed.
    let mut nine = [0u8; 9];
    assert_eq!(
        buses.read(BusKind::Pio, 0x70, &mut nine),
        Err(BusError::InvalidAccessLength { addr: 0x70, len: 9 })
    );
    assert_eq!(
        buses.write(BusKind::Pio, 0x70, &[]),
        Err(BusError::InvalidAccessLength { addr: 0x70, len: 0 })
    );
    assert_eq!(
        buses.write(BusKind::Pio, 0x71, &[0, 0]),
        Err(BusError::Unhandled { addr: 0x71, len: 2 })
    );
    assert_eq!(
        buses.write(BusKind::Pio, u64::MAX, &[0; 8]),
        Err(BusError::Unhandled {
            addr: u64::MAX,
            len: 8
        })
    );
    assert_eq!(a.calls.load(SeqCst), 0);
    assert_eq!(bus_ptr(&buses, BusKind::Pio), before);

    // A successful update does publish a new bus.
    buses
        .register_dev(&mut buses.lock_slots(), BusKind::Pio, r(0x80, 1), dynp(&b))
        .unwrap();
    assert_ne!(bus_ptr(&buses, BusKind::Pio), before);
}

#[test]
fn default_cap_is_enforced() {
    let buses: Buses<Fast> = Buses::default();
    let mut slots = buses.lock_slots();
    let (p, _) = Probe::new();
    buses
        .register_many(
            &mut slots,
            BusKind::Mmio,
            (0..MAX_IO_BUS_DEVICES as u64).map(|i| (r(i * 8, 8), dynp(&p))),
        )
        .unwrap();
    assert_eq!(
        buses.register_dev(&mut slots, BusKind::Mmio, r(0xffff_0000, 1), dynp(&p)),
        Err(BusError::BusFull {
            kind: BusKind::Mmio,
            max: MAX_IO_BUS_DEVICES
        })
    );
    let mut v = [0u8; 8];
    drop(slots);
    buses.read(BusKind::Mmio, 999 * 8, &mut v).unwrap();
    assert_eq!(v, [0x5a; 8]);
    assert_eq!(p.calls.load(SeqCst), 1);
}

#[test]
fn zero_cap_bus_rejects_everything() {
    let buses = Buses::with_srcu(Srcu::new(), 0);
    let (p, _) = Probe::new();
    assert_eq!(
        buses.register_dev(&mut buses.lock_slots(), BusKind::Pio, r(0, 1), dynp(&p)),
        Err(BusError::BusFull {
            kind: BusKind::Pio,
            max: 0
        })
    );
}

#[test]
fn device_registered_at_several_ranges_and_buses() {
    let buses = Buses::new();
    let (p, _) = Probe::new();
    let dev = dynp(&p);
    let mut slots = buses.lock_slots();
    for kind in [BusKind::Mmio, BusKind::Pio] {
        buses
            .register_dev(&mut slots, kind, r(0x10, 4), dev.clone())
            .unwrap();
        buses
            .register_dev(&mut slots, kind, r(0x20, 4), dev.clone())
            .unwrap();
    }
    buses
        .unregister_dev(&mut slots, BusKind::Mmio, &dev)
        .unwrap();
    assert!(buses.get_bus(&slots, BusKind::Mmio).is_empty());
    assert_eq!(buses.get_bus(&slots, BusKind::Pio).len(), 2);
    assert_eq!(Arc::strong_count(&dev), 4); // p, dev, two PIO entries
}

#[test]
fn read_srcu_write_srcu_get_dev_write_cookie() {
    let buses = Buses::new_fast();
    let (p, _) = Probe::new();
    buses
        .register_dev(
            &mut buses.lock_slots(),
            BusKind::Mmio,
            r(0x100, 0x10),
            dynp(&p),
        )
        .unwrap();
    let g = buses.read_lock();
    let mut v = [0u8; 4];
    buses.read_srcu(&g, BusKind::Mmio, 0x10c, &mut v).unwrap();
    assert_eq!(v, [0x5a; 4]);
    buses.write_srcu(&g, BusKind::Mmio, 0x100, &[1]).unwrap();
    drop(g);
    assert_eq!(buses.write_cookie(BusKind::Mmio, 3, 0x108, &[1]), Ok(0));
    let d = buses.get_dev(BusKind::Mmio, 0x10f).unwrap();
    assert!(Arc::ptr_eq(&d, &dynp(&p)));
    assert!(buses.get_dev(BusKind::Mmio, 0x110).is_none());
    assert_eq!(p.calls.load(SeqCst), 3);
}

#[test]
fn foreign_slots_guard_panics() {
    let vm1 = Buses::new();
    let vm2 = Buses::new();
    let mut slots2 = vm2.lock_slots();
    let err = catch_unwind(AssertUnwindSafe(|| {
        vm1.get_bus(&slots2, BusKind::Mmio);
    }))
    .unwrap_err();
    let msg = err.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(msg.contains("another Buses"), "{msg}");
    let (p, _) = Probe::new();
    assert!(catch_unwind(AssertUnwindSafe(|| {
        let _ = vm1.register_dev(&mut slots2, BusKind::Mmio, r(0, 1), dynp(&p));
    }))
    .is_err());
    drop(slots2);
    // vm1 was not changed and its lock is free.
    assert!(vm1.get_bus(&vm1.lock_slots(), BusKind::Mmio).is_empty());
}

#[test]
fn foreign_read_guard_panics() {
    let vm1 = Buses::new();
    let vm2 = Buses::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let g2 = vm2.read_lock();
        vm1.get_bus_srcu(&g2, BusKind::Pio).len()
    }));
    assert!(r.is_err());
    // Both domains still work (the guard was released by unwinding).
    vm1.srcu().synchronize();
    vm2.srcu().synchronize();
    assert_eq!(vm2.srcu().readers(), 0);
}

/// Panics on every access.
struct Bomb;
impl IoDevice for Bomb {
    fn read(&self, access: Access, _: &mut [u8]) -> Result<(), Declined> {
        panic!("device exploded at {:#x}", access.addr())
    }
    fn write(&self, access: Access, _: &[u8]) -> WriteResult {
        panic!("device exploded at {:#x}", access.addr())
    }
}

fn panicking_handler<F: Flavor>(buses: Buses<F>) {
    let bomb: Arc<dyn IoDevice> = Arc::new(Bomb);
    let (p, _) = Probe::new();
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x1000, 4), bomb.clone())
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x2000, 4), dynp(&p))
            .unwrap();
    }
    for _ in 0..3 {
        assert!(catch_unwind(AssertUnwindSafe(|| buses.write(
            BusKind::Mmio,
            0x1000,
            &[1]
        )))
        .is_err());
        assert!(catch_unwind(AssertUnwindSafe(|| {
            let g = buses.read_lock();
            buses.read_srcu(&g, BusKind::Mmio, 0x1002, &mut [0, 0])
        }))
        .is_err());
    }
    // The read sections ended during unwinding, and this thread's record
    // of being in one too (or unregister below would refuse with
    // InReadSection).
    assert_eq!(buses.srcu().readers(), 0);
    assert!(!buses.srcu().in_read_section());
    // Still usable, and unregister (which waits for readers) returns, on
    // this very thread and promptly.
    buses.write(BusKind::Mmio, 0x2000, &[1]).unwrap();
    let mut slots = buses.lock_slots();
    let t = std::time::Instant::now();
    buses
        .unregister_dev(&mut slots, BusKind::Mmio, &bomb)
        .unwrap();
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
        "unregister took {took:?}"
    );
    assert_eq!(Arc::strong_count(&bomb), 1);
    drop(slots);
    assert!(buses.write(BusKind::Mmio, 0x1000, &[1]).is_err());
    assert_eq!(p.calls.load(SeqCst), 1);
}

/// A handler panic on another thread (a vCPU thread that dies) also ends
/// its section: an unregister of the device from this thread returns
/// (checked with a deadline, so a leaked section fails the test instead of
/// hanging it).
fn panicking_handler_on_another_thread<F: Flavor>(buses: Buses<F>) {
    let buses = Arc::new(buses);
    let bomb: Arc<dyn IoDevice> = Arc::new(Bomb);
    buses
        .register_dev(
            &mut buses.lock_slots(),
            BusKind::Pio,
            r(0x80, 1),
            bomb.clone(),
        )
        .unwrap();
    let vcpu = {
        let buses = buses.clone();
        std::thread::spawn(move || buses.write(BusKind::Pio, 0x80, &[1]))
    };
    assert!(vcpu.join().is_err(), "the handler panicked");
    assert_eq!(buses.srcu().readers(), 0);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let (buses, bomb) = (buses.clone(), bomb.clone());
        std::thread::spawn(move || {
            let r = buses.unregister_dev(&mut buses.lock_slots(), BusKind::Pio, &bomb);
            let _ = done_tx.send(r);
        });
    }
    let r = done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("unregister_dev did not return within 10 s after a handler panic");
    assert_eq!(r, Ok(()));
    assert_eq!(
        buses.write(BusKind::Pio, 0x80, &[1]),
        Err(BusError::Unhandled { addr: 0x80, len: 1 })
    );
}

#[test]
fn panicking_handler_on_another_thread_classic() {
    panicking_handler_on_another_thread(Buses::new());
}

#[test]
fn panicking_handler_on_another_thread_fast() {
    panicking_handler_on_another_thread(Buses::new_fast());
}

/// A device whose write handler tries to unregister itself from the
/// buses it is on (a reference it holds), the way a device model might
/// on a guest "eject" command. It records what each attempt returned.
struct SelfRemover<F: Flavor> {
    buses: std::sync::OnceLock<std::sync::Weak<Buses<F>>>,
    me: std::sync::OnceLock<std::sync::Weak<dyn IoDevice>>,
    calls: AtomicUsize,
    results: std::sync::Mutex<Vec<Result<(), BusError>>>,
}

impl<F: Flavor> IoDevice for SelfRemover<F> {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        data.fill(0x5a);
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        let buses = self.buses.get().unwrap().upgrade().unwrap();
        let me = self.me.get().unwrap().upgrade().unwrap();
        // Inside the dispatch's read section: every unregister must refuse
        // before changing anything (no other thread is unregistering, so
        // taking the slots lock here cannot deadlock; see lock_slots).
        let mut slots = buses.lock_slots();
        let mut results = self.results.lock().unwrap();
        results.push(buses.unregister_dev(&mut slots, BusKind::Pio, &me));
        results.push(buses.unregister_many(&mut slots, BusKind::Pio, std::slice::from_ref(&me)));
        results.push(buses.unregister_many(&mut slots, BusKind::Pio, &[]));
        Ok(None)
    }
}

fn unregister_from_own_handler_is_refused<F: Flavor>(buses: Buses<F>) {
    let buses = Arc::new(buses);
    let remover = Arc::new(SelfRemover::<F> {
        buses: Default::default(),
        me: Default::default(),
        calls: AtomicUsize::new(0),
        results: Default::default(),
    });
    let dev: Arc<dyn IoDevice> = remover.clone();
    remover.buses.set(Arc::downgrade(&buses)).unwrap();
    remover.me.set(Arc::downgrade(&dev)).unwrap();
    buses
        .register_dev(
            &mut buses.lock_slots(),
            BusKind::Pio,
            r(0x80, 1),
            dev.clone(),
        )
        .unwrap();
    // Let the registration's deferred work finish, so that any grace
    // period from here on would be the unregister's.
    quiesce(&buses);
    let before = buses.get_bus(&buses.lock_slots(), BusKind::Pio) as *const IoBus;
    let gps = buses.srcu().completed_grace_periods();
    let refused = Err(BusError::InReadSection { kind: BusKind::Pio });

    for round in 1..=3 {
        // The handler runs (and returns: no hang, no panic) ...
        assert_eq!(
            buses.write(BusKind::Pio, 0x80, &[1]),
            Ok(()),
            "round {round}"
        );
        assert_eq!(remover.calls.load(SeqCst), round);
        assert_eq!(*remover.results.lock().unwrap(), vec![refused; 3 * round]);
        // ... and nothing changed: same table, no grace period, still
        // registered and dispatched to (the next round shows it).
        assert_eq!(
            buses.get_bus(&buses.lock_slots(), BusKind::Pio) as *const IoBus,
            before
        );
        assert_eq!(buses.srcu().completed_grace_periods(), gps);
        assert!(Arc::ptr_eq(
            &buses.get_dev(BusKind::Pio, 0x80).unwrap(),
            &dev
        ));
        let mut b = [0];
        buses.read(BusKind::Pio, 0x80, &mut b).unwrap();
        assert_eq!(b, [0x5a]);
        assert_eq!(buses.srcu().readers(), 0);
    }
    // Outside any section it works.
    buses
        .unregister_dev(&mut buses.lock_slots(), BusKind::Pio, &dev)
        .unwrap();
    assert!(buses.get_dev(BusKind::Pio, 0x80).is_none());
    assert_eq!(Arc::strong_count(&dev), 2); // `dev` and `remover`
}

#[test]
fn unregister_from_own_handler_is_refused_classic() {
    unregister_from_own_handler_is_refused(Buses::new());
}

#[test]
fn unregister_from_own_handler_is_refused_fast() {
    unregister_from_own_handler_is_refused(Buses::new_fast());
}

fn unregister_holding_read_lock_is_refused<F: Flavor>(buses: Buses<F>) {
    let (p, _) = Probe::new();
    let dev = dynp(&p);
    let (q, _) = Probe::new();
    let other = dynp(&q);
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x1000, 8), dev.clone())
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x2000, 8), other.clone())
            .unwrap();
    }
    // No grace period in flight: none can complete while the section
    // below is held.
    quiesce(&buses);
    let refused = Err(BusError::InReadSection {
        kind: BusKind::Mmio,
    });
    let before = buses.get_bus(&buses.lock_slots(), BusKind::Mmio) as *const IoBus;
    let gps = buses.srcu().completed_grace_periods();
    {
        let guard = buses.read_lock();
        assert!(buses.srcu().in_read_section());
        let mut slots = buses.lock_slots();
        assert_eq!(
            buses.unregister_dev(&mut slots, BusKind::Mmio, &dev),
            refused
        );
        assert_eq!(
            buses.unregister_many(&mut slots, BusKind::Mmio, &[dev.clone(), other.clone()]),
            refused
        );
        assert_eq!(
            buses.unregister_many(&mut slots, BusKind::Mmio, &[]),
            refused
        );
        // Checked first: an unknown device gets the same answer.
        let (stranger, _) = Probe::new();
        assert_eq!(
            buses.unregister_dev(&mut slots, BusKind::Mmio, &dynp(&stranger)),
            refused
        );
        assert_eq!(buses.get_bus(&slots, BusKind::Mmio) as *const IoBus, before);
        assert_eq!(
            buses.srcu().completed_grace_periods(),
            gps,
            "nothing waited"
        );
        // Registering does not wait for a grace period: allowed here.
        buses
            .register_dev(&mut slots, BusKind::Pio, r(0x60, 1), dynp(&stranger))
            .unwrap();
        drop(slots);
        // Still dispatched to, in the held section and in a nested one.
        buses
            .write_srcu(&guard, BusKind::Mmio, 0x1000, &[1])
            .unwrap();
        buses.write(BusKind::Mmio, 0x2004, &[1]).unwrap();
        drop(guard);
    }
    assert_eq!(p.calls.load(SeqCst), 1);
    assert_eq!(q.calls.load(SeqCst), 1);
    assert!(!buses.srcu().in_read_section());

    // A section handed to another thread counts there, once adopted.
    std::thread::scope(|s| {
        let sendable = buses.read_lock().into_sendable();
        assert!(!buses.srcu().in_read_section());
        s.spawn(|| {
            let guard = sendable.adopt();
            assert_eq!(
                buses.unregister_dev(&mut buses.lock_slots(), BusKind::Mmio, &dev),
                refused
            );
            drop(guard);
        })
        .join()
        .unwrap();
    });

    // Section over: unregister works and waits as usual.
    buses
        .unregister_many(
            &mut buses.lock_slots(),
            BusKind::Mmio,
            &[dev.clone(), other],
        )
        .unwrap();
    assert_eq!(Arc::strong_count(&dev), 2); // `p` and `dev`
    assert!(buses.write(BusKind::Mmio, 0x1000, &[1]).is_err());
}

#[test]
fn unregister_holding_read_lock_is_refused_classic() {
    unregister_holding_read_lock_is_refused(Buses::new());
}

#[test]
fn unregister_holding_read_lock_is_refused_fast() {
    unregister_holding_read_lock_is_refused(Buses::new_fast());
}

#[test]
fn panicking_handler_classic() {
    panicking_handler(Buses::new());
}

#[test]
fn panicking_handler_fast() {
    panicking_handler(Buses::new_fast());
}

#[test]
fn destruction_takes_every_device() {
    let mut buses = Buses::new();
    let (p, dropped) = Probe::new();
    {
        let mut slots = buses.lock_slots();
        for kind in BusKind::ALL {
            buses
                .register_dev(&mut slots, kind, r(0x40, 4), dynp(&p))
                .unwrap();
        }
    }
    drop(p);
    let mut all = Vec::new();
    for kind in BusKind::ALL {
        all.extend(buses.take_devices(kind));
    }
    assert_eq!(all.len(), 3);
    // No barrier: the old tables still queued hold no references.
    drop(all);
    assert!(dropped.load(SeqCst));
    assert!(buses.write(BusKind::Pio, 0x40, &[0]).is_err());
}

#[test]
fn dropping_buses_frees_devices() {
    let (p, dropped) = Probe::new();
    {
        let buses = Buses::new_fast();
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(0x40, 4), dynp(&p))
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(0x50, 4), dynp(&p))
            .unwrap();
    }
    drop(p);
    assert!(dropped.load(SeqCst), "dropping Buses released every device");
}

/// Blocks inside its handler until released; records whether the
/// updater's `unregister_dev` had returned by the time it leaves.
struct Gate {
    entered: std::sync::mpsc::SyncSender<()>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    unregister_returned: Arc<AtomicBool>,
    saw_returned: AtomicBool,
}

impl IoDevice for Gate {
    fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> {
        Err(Declined)
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.entered.send(()).unwrap();
        self.release.lock().unwrap().recv().unwrap();
        self.saw_returned
            .store(self.unregister_returned.load(SeqCst), SeqCst);
        Ok(None)
    }
}

fn unregister_waits_for_handler<F: Flavor>(buses: Buses<F>) {
    let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let returned = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Gate {
        entered: entered_tx,
        release: std::sync::Mutex::new(release_rx),
        unregister_returned: returned.clone(),
        saw_returned: AtomicBool::new(true),
    });
    let dev: Arc<dyn IoDevice> = gate.clone();
    let (dummy, _) = Probe::new();
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x100, 4), dev.clone())
            .unwrap();
        // Churn the bus first so old tables are queued for their deferred
        // free: unregister's own grace period is still what must wait.
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0x200, 4), dynp(&dummy))
            .unwrap();
        buses
            .unregister_dev(&mut slots, BusKind::Mmio, &dynp(&dummy))
            .unwrap();
    }
    std::thread::scope(|s| {
        let vcpu = s.spawn(|| buses.write(BusKind::Mmio, 0x100, &[1]));
        entered_rx.recv().unwrap(); // the handler runs, in a read section
        let updater = s.spawn(|| {
            buses
                .unregister_dev(&mut buses.lock_slots(), BusKind::Mmio, &dev)
                .unwrap();
            returned.store(true, SeqCst);
        });
        // Wait until the new table is published: unregister has begun and
        // can only be in its grace period now, waiting for the handler.
        while buses.get_dev(BusKind::Mmio, 0x100).is_some() && !updater.is_finished() {
            std::thread::yield_now();
        }
        let early = returned.load(SeqCst);
        release_tx.send(()).unwrap(); // before asserting: never hang
        assert_eq!(vcpu.join().unwrap(), Ok(()));
        updater.join().unwrap();
        assert!(!early, "unregister returned while a handler ran");
    });
    assert!(!gate.saw_returned.load(SeqCst));
    assert!(returned.load(SeqCst));
    assert_eq!(Arc::strong_count(&dev), 2); // `dev` and `gate`
}

#[test]
fn unregister_waits_for_handler_classic() {
    unregister_waits_for_handler(Buses::new());
}

#[test]
fn unregister_waits_for_handler_fast() {
    unregister_waits_for_handler(Buses::new_fast());
}

/// Unpublished tables wait on the updater's side (`Buses::retired_tables`)
/// until a grace period has passed: a table a reader holds stays intact
/// through hundreds of registrations (each of which tries to free retired
/// tables; the reader checks its table after every one), and the first
/// unregistration after the reader leaves frees every table still kept.
/// (A table freed early hands its memory to a later table, which the
/// reader would then see.)
fn retired_tables_outlive_their_readers<F: Flavor>(buses: Buses<F>) {
    let buses = Arc::new(buses);
    let (p, _) = Probe::new();
    buses
        .register_dev(
            &mut buses.lock_slots(),
            BusKind::Mmio,
            r(0x1000, 4),
            dynp(&p),
        )
        .unwrap();
    let (check_tx, check_rx) = std::sync::mpsc::channel::<bool>();
    let (ok_tx, ok_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn({
        let buses = buses.clone();
        move || {
            let g = buses.read_lock();
            let bus = buses.get_bus_srcu(&g, BusKind::Mmio);
            let before: Vec<IoRange> = bus.iter().map(|(range, _)| range).collect();
            assert_eq!(before, [r(0x1000, 4)]);
            ok_tx.send(()).unwrap();
            // `true`: check and go on; `false`: check and leave.
            while let Ok(more) = check_rx.recv() {
                let now: Vec<IoRange> = bus.iter().map(|(range, _)| range).collect();
                assert_eq!(now, before, "the table changed under its reader");
                let mut v = [0u8; 4];
                bus.read(0x1000, &mut v).unwrap();
                assert_eq!(v, [0x5a; 4]);
                ok_tx.send(()).unwrap();
                if !more {
                    break;
                }
            }
        }
    });
    ok_rx.recv().unwrap();
    let mut slots = buses.lock_slots();
    let others: Vec<Arc<dyn IoDevice>> = (0..300).map(|_| dynp(&Probe::new().0)).collect();
    for (i, d) in others.iter().enumerate() {
        let range = r(0x10_0000 + 0x100 * i as u64, 0x10);
        buses
            .register_dev(&mut slots, BusKind::Mmio, range, d.clone())
            .unwrap();
        check_tx.send(true).unwrap();
        ok_rx
            .recv()
            .expect("the reader found its table changed (see its panic)");
    }
    // The reader is still inside its section: nothing retired since it
    // began can have been freed.
    let kept = buses.retired_tables(&slots);
    assert!(kept.tables > 10, "{kept:?}");
    assert!(kept.bytes <= 256 << 10, "{kept:?}");
    check_tx.send(false).unwrap();
    ok_rx.recv().expect("the reader's last check failed");
    drop(slots);
    reader.join().unwrap();
    let mut slots = buses.lock_slots();
    buses
        .unregister_dev(&mut slots, BusKind::Mmio, &others[0])
        .unwrap();
    assert_eq!(
        buses.retired_tables(&slots),
        kvm_bus::RetiredTables::default()
    );
    assert_eq!(p.calls.load(SeqCst), 301); // the reader read after each registration and once more
}

#[test]
fn retired_tables_outlive_their_readers_classic() {
    retired_tables_outlive_their_readers(Buses::new());
}

#[test]
fn retired_tables_outlive_their_readers_fast() {
    retired_tables_outlive_their_readers(Buses::new_fast());
}

/// The same from inside a read section of the updating thread, as in a
/// device handler that registers devices: `retired_tables` answers there
/// (it never blocks on the list), the tables the registrations retire stay
/// kept while the section that could still see them is open, even though
/// every registration tries to free old ones, and once it has ended the
/// next unregistration frees them all.
fn retired_tables_inside_a_read_section<F: Flavor>(buses: Buses<F>) {
    let devs: Vec<Arc<dyn IoDevice>> = (0..4).map(|_| dynp(&Probe::new().0)).collect();
    let g = buses.read_lock();
    let mut slots = buses.lock_slots();
    register_one_by_one(&buses, &mut slots, 0x60, &devs);
    // Four small tables unpublished, all kept (within `UNTRIMMED`, so no
    // trim; none can have a completed grace period: each would wait for
    // this section).
    let kept = buses.retired_tables(&slots);
    assert_eq!(kept.tables, 4, "{kept:?}");
    assert_eq!(
        buses.unregister_dev(&mut slots, BusKind::Pio, &devs[0]),
        Err(kvm_bus::BusError::InReadSection { kind: BusKind::Pio })
    );
    assert_eq!(
        buses.retired_tables(&slots),
        kept,
        "a refused update frees nothing"
    );
    drop(slots);
    drop(g);
    let mut slots = buses.lock_slots();
    buses
        .unregister_dev(&mut slots, BusKind::Pio, &devs[0])
        .unwrap();
    assert_eq!(
        buses.retired_tables(&slots),
        kvm_bus::RetiredTables::default()
    );
}

#[test]
fn retired_tables_inside_a_read_section_classic() {
    retired_tables_inside_a_read_section(Buses::new());
}

#[test]
fn retired_tables_inside_a_read_section_fast() {
    retired_tables_inside_a_read_section(Buses::new_fast());
}

/// Tables retired by registrations with no update after them are still
/// freed: the trim carried by the first table past `UNTRIMMED` (16 KiB;
/// here about the 20th registration, so the test needs more than that)
/// runs on the callback worker after its grace period and frees the rest
/// (re-queuing itself on the newest while some are pending). `barrier`
/// waits for each trim: no update, no sleep.
fn retired_tables_are_freed_without_another_update<F: Flavor>(buses: Buses<F>) {
    let devs: Vec<Arc<dyn IoDevice>> = (0..100).map(|_| dynp(&Probe::new().0)).collect();
    let mut slots = buses.lock_slots();
    register_one_by_one(&buses, &mut slots, 0x100, &devs);
    // (Some may be freed already: a trim can run as soon as its table's
    // grace period has passed.)
    let mut rounds = 0;
    while buses.retired_tables(&slots) != kvm_bus::RetiredTables::default() {
        rounds += 1;
        assert!(rounds <= 100, "{:?}", buses.retired_tables(&slots));
        buses.srcu().barrier();
    }
    assert_eq!(buses.get_bus(&slots, BusKind::Pio).len(), 100);
}

/// Isolated updates (a guest's BAR move, a hot plug after a quiet spell)
/// keep their tables without queuing anything while the kept tables stay
/// within 16 KiB (`UNTRIMMED` in retired.rs); the update that would pass
/// it queues one trim, which frees them all. Before, every update after a
/// quiet spell queued a trim, whose `call_srcu` woke the idle callback
/// worker (a futex wake: 6-12 µs to the waker on a 2-vCPU Firecracker
/// guest) and, in the fast flavor, ran a grace period of 3 `membarrier`s.
fn isolated_updates_queue_one_trim_per_16_kib<F: Flavor>(buses: Buses<F>) {
    let devs: Vec<Arc<dyn IoDevice>> = (0..60).map(|_| dynp(&Probe::new().0)).collect();
    let none = kvm_bus::RetiredTables::default();
    let mut slots = buses.lock_slots();
    let (mut trims, mut kept_most) = (0, 0);
    for (i, d) in devs.iter().enumerate() {
        let ran = buses.srcu().stats().callbacks_run;
        buses
            .register_dev(
                &mut slots,
                BusKind::Pio,
                r(0x100 + 4 * i as u64, 4),
                d.clone(),
            )
            .unwrap();
        // The quiet spell: whatever was queued has run. (The list is read
        // after it: a `retired_tables` that held the list while the trim
        // ran would queue the next trim itself, `trim_missed`.)
        quiesce(&buses);
        let kept = buses.retired_tables(&slots);
        match buses.srcu().stats().callbacks_run - ran {
            0 => {
                assert!(kept.bytes <= 16 << 10, "kept {kept:?} without a trim");
                kept_most = kept_most.max(kept.bytes);
            }
            1 => {
                trims += 1;
                assert_eq!(buses.retired_tables(&slots), none, "the trim freed them");
            }
            n => panic!("{n} callbacks for one registration"),
        }
    }
    assert!(kept_most > 12 << 10, "kept up to {kept_most} bytes only");
    assert!(
        (1..=devs.len() / 5).contains(&trims),
        "{trims} trims for {} isolated registrations",
        devs.len()
    );
}

#[test]
fn isolated_updates_queue_one_trim_per_16_kib_classic() {
    isolated_updates_queue_one_trim_per_16_kib(Buses::new());
}

#[test]
fn isolated_updates_queue_one_trim_per_16_kib_fast() {
    isolated_updates_queue_one_trim_per_16_kib(Buses::new_fast());
}

#[test]
fn retired_tables_are_freed_without_another_update_classic() {
    retired_tables_are_freed_without_another_update(Buses::new());
}

#[test]
fn retired_tables_are_freed_without_another_update_fast() {
    retired_tables_are_freed_without_another_update(Buses::new_fast());
}

/// A removal queues no callback. The table its unpublish retires waits in
/// the retired list for the removal's own grace period instead of carrying
/// a trim (a `call_srcu`, whose wake-up of the idle callback worker cost
/// the caller 6-12 µs on a 2-vCPU Firecracker guest: a `start_unregister`
/// in a device handler paid that on the vCPU's exit path, an
/// `unregister_dev` paid it for nothing). `wait` frees the table on its
/// thread; a removal dropped completes in the background, one callback
/// for its devices and its table.
fn removals_queue_no_callback<F: Flavor>(buses: Buses<F>) {
    let probes: Vec<_> = (0..3).map(|_| Probe::new().0).collect();
    let devs: Vec<Arc<dyn IoDevice>> = probes.iter().map(dynp).collect();
    let mut slots = buses.lock_slots();
    register_one_by_one(&buses, &mut slots, 0x100, &devs);
    // Three small tables: kept without a trim (`UNTRIMMED` in retired.rs).
    assert_eq!(buses.retired_tables(&slots).tables, 3);
    assert_eq!(buses.srcu().pending_callbacks(), 0);
    let none = kvm_bus::RetiredTables::default();

    // A blocking unregister: nothing queued, everything freed on return.
    buses
        .unregister_dev(&mut slots, BusKind::Pio, &devs[0])
        .unwrap();
    assert_eq!(
        buses.srcu().pending_callbacks(),
        0,
        "unregister_dev queued a callback"
    );
    assert_eq!(buses.retired_tables(&slots), none);
    assert_eq!(
        Arc::strong_count(&probes[0]),
        2,
        "the test's two handles only"
    );

    // Started (as a handler would), then waited for elsewhere.
    let removal = buses
        .start_unregister(&mut slots, BusKind::Pio, &devs[1])
        .unwrap();
    assert_eq!(
        buses.srcu().pending_callbacks(),
        0,
        "start_unregister queued a callback"
    );
    assert_eq!(
        buses.retired_tables(&slots).tables,
        1,
        "kept for the removal"
    );
    drop(slots);
    std::thread::scope(|s| s.spawn(|| removal.wait().unwrap()).join().unwrap());
    let mut slots = buses.lock_slots();
    assert_eq!(buses.retired_tables(&slots), none, "wait freed the table");
    assert_eq!(Arc::strong_count(&probes[1]), 2);
    assert_eq!(buses.srcu().pending_callbacks(), 0);

    // Completion reported by `on_complete`: the table is freed by then.
    let dev = dynp(&Probe::new().0);
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x200, 4), dev.clone())
        .unwrap();
    drop(slots);
    quiesce(&buses);
    let mut slots = buses.lock_slots();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    buses
        .start_unregister(&mut slots, BusKind::Pio, &dev)
        .unwrap()
        .on_complete(move || done_tx.send(()).unwrap());
    done_rx.recv().unwrap();
    assert_eq!(
        buses.retired_tables(&slots),
        none,
        "on_complete freed the table"
    );
    assert_eq!(Arc::strong_count(&dev), 1);
    quiesce(&buses); // (the batch that ran it is counted after it ran)

    // Dropped: completes in the background, one callback (which may
    // have run already: count it once the worker is idle).
    let before = buses.srcu().stats();
    drop(
        buses
            .start_unregister(&mut slots, BusKind::Pio, &devs[2])
            .unwrap(),
    );
    quiesce(&buses);
    assert_eq!(
        buses.srcu().stats().since(&before).callbacks_run,
        1,
        "the background completion"
    );
    assert_eq!(
        buses.retired_tables(&slots),
        none,
        "the completion freed the table"
    );
    assert_eq!(Arc::strong_count(&probes[2]), 2);
    assert!(buses.get_bus(&slots, BusKind::Pio).is_empty());
}

#[test]
fn removals_queue_no_callback_classic() {
    removals_queue_no_callback(Buses::new());
}

#[test]
fn removals_queue_no_callback_fast() {
    removals_queue_no_callback(Buses::new_fast());
}

/// Dropping a `Removal` completes it in the background (its docs, its
/// `must_use` message, the CHANGELOG): the devices are released on the
/// callback worker, never on the thread that drops it, which may be a
/// vCPU inside a handler's read section, or hold the slots lock or a VMM
/// lock that the device's `Drop` takes (a self-deadlock), or be
/// unwinding (a panicking device `Drop` would then abort). (From a review:
/// a `Removal` dropped after its grace period released the devices at
/// once, on the dropping thread.)
fn dropping_a_completed_removal_releases_in_the_background<F: Flavor>(buses: Buses<F>) {
    struct Tracked(Arc<std::sync::Mutex<Option<std::thread::ThreadId>>>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(std::thread::current().id());
        }
    }
    impl IoDevice for Tracked {
        fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> {
            Err(Declined)
        }
        fn write(&self, _: Access, _: &[u8]) -> WriteResult {
            Ok(None)
        }
    }
    let dropped_on = Arc::new(std::sync::Mutex::new(None));
    let dev: Arc<dyn IoDevice> = Arc::new(Tracked(dropped_on.clone()));
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x100, 4), dev.clone())
        .unwrap();
    let removal = buses
        .start_unregister(&mut slots, BusKind::Pio, &dev)
        .unwrap();
    drop(dev); // the removal holds the last reference
    while !removal.is_complete() {
        std::thread::yield_now();
    }
    drop(removal); // (still holding the slots lock)
    drop(slots);
    quiesce(&buses);
    let on = dropped_on.lock().unwrap().expect("the device was dropped");
    assert_ne!(
        on,
        std::thread::current().id(),
        "the device was dropped on the thread that dropped the Removal"
    );
}

#[test]
fn dropping_a_completed_removal_releases_in_the_background_classic() {
    dropping_a_completed_removal_releases_in_the_background(Buses::new());
}

#[test]
fn dropping_a_completed_removal_releases_in_the_background_fast() {
    dropping_a_completed_removal_releases_in_the_background(Buses::new_fast());
}

/// A `Removal::wait` whose grace period panics (a stall hook that panics,
/// as `srcu/tests/faults.rs` injects) does not strand the removal's
/// retired table: with no update to come, the table is still freed once
/// the reader has left. (From a review: the table carried no trim and the
/// `AfterRemoval` that owed it was dropped by the unwinding `wait`.)
fn a_panicking_wait_leaves_no_table_behind<F: Flavor>() {
    let armed = Arc::new(AtomicBool::new(true));
    let hook = armed.clone();
    let srcu = Srcu::<F>::builder()
        .stall_timeout(std::time::Duration::from_millis(5))
        .on_stall(move |r| {
            if hook.swap(false, SeqCst) {
                panic!("injected stall-hook panic: {r}");
            }
        })
        .build();
    let buses = Buses::with_srcu(srcu, MAX_IO_BUS_DEVICES);
    let dev = dynp(&Probe::new().0);
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x100, 4), dev.clone())
        .unwrap();
    drop(slots);
    quiesce(&buses);
    let none = kvm_bus::RetiredTables::default();
    // The registration's table is kept without a trim (`UNTRIMMED`).
    assert_eq!(buses.retired_tables(&buses.lock_slots()).tables, 1);

    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (leave_tx, leave_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let buses = &buses;
        s.spawn(move || {
            let g = buses.read_lock();
            entered_tx.send(()).unwrap();
            let _ = leave_rx.recv();
            drop(g);
        });
        entered_rx.recv().unwrap();
        let removal = buses
            .start_unregister(&mut buses.lock_slots(), BusKind::Pio, &dev)
            .unwrap();
        let err = catch_unwind(AssertUnwindSafe(|| removal.wait())).unwrap_err();
        assert!(err.downcast_ref::<String>().unwrap().contains("injected"));
        leave_tx.send(()).unwrap();
    });
    // The trim the unwinding `wait` queued runs after a grace period.
    quiesce(&buses);
    assert_eq!(
        buses.retired_tables(&buses.lock_slots()),
        none,
        "the removal's table stays"
    );
    assert_eq!(Arc::strong_count(&dev), 1, "the removal let the device go");
}

#[test]
fn a_panicking_wait_leaves_no_table_behind_classic() {
    a_panicking_wait_leaves_no_table_behind::<Classic>();
}

#[test]
fn a_panicking_wait_leaves_no_table_behind_fast() {
    a_panicking_wait_leaves_no_table_behind::<Fast>();
}

/// A device whose `Drop` panics, released by `Removal::wait`: the panic
/// reaches the caller of `wait`, after the removal's retired table was
/// freed (tables first), and the buses go on: nothing is kept, nothing is
/// queued, and the next registration and removal work.
fn a_panicking_device_drop_in_wait_leaves_the_buses_usable<F: Flavor>(buses: Buses<F>) {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("injected panic in a device's Drop");
        }
    }
    impl IoDevice for Bomb {
        fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> {
            Err(Declined)
        }
        fn write(&self, _: Access, _: &[u8]) -> WriteResult {
            Ok(None)
        }
    }
    let bomb: Arc<dyn IoDevice> = Arc::new(Bomb);
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x100, 4), bomb.clone())
        .unwrap();
    let removal = buses
        .start_unregister(&mut slots, BusKind::Pio, &bomb)
        .unwrap();
    drop(bomb); // the removal holds the last reference
    drop(slots);
    let err = catch_unwind(AssertUnwindSafe(|| removal.wait())).unwrap_err();
    assert!(err.downcast_ref::<&str>().unwrap().contains("injected"));
    let none = kvm_bus::RetiredTables::default();
    let mut slots = buses.lock_slots();
    assert_eq!(buses.retired_tables(&slots), none, "freed before the panic");
    assert_eq!(buses.srcu().pending_callbacks(), 0);
    assert!(buses.get_bus(&slots, BusKind::Pio).is_empty());
    let (p, _) = Probe::new();
    let d = dynp(&p);
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x100, 4), d.clone())
        .unwrap();
    buses.write(BusKind::Pio, 0x100, &[1]).unwrap();
    assert_eq!(p.calls.load(SeqCst), 1);
    buses.unregister_dev(&mut slots, BusKind::Pio, &d).unwrap();
    assert_eq!(buses.retired_tables(&slots), none);
    assert_eq!(Arc::strong_count(&p), 2, "the test's two handles only");
}

#[test]
fn a_panicking_device_drop_in_wait_leaves_the_buses_usable_classic() {
    a_panicking_device_drop_in_wait_leaves_the_buses_usable(Buses::new());
}

#[test]
fn a_panicking_device_drop_in_wait_leaves_the_buses_usable_fast() {
    a_panicking_device_drop_in_wait_leaves_the_buses_usable(Buses::new_fast());
}
