//! Guest-driven reconfiguration: moving a range and starting a removal
//! from inside a device handler, by-range removal, range validation, the
//! opt-in overlap check, and the dispatch order among overlapping ranges.

use kvm_bus::{
    Access, BusError, BusKind, Buses, Classic, Declined, Fast, Flavor, IoDevice, IoRange, Removal,
    WriteResult,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

fn r(addr: u64, len: u64) -> IoRange {
    IoRange::new(addr, len).unwrap()
}

/// Counts calls; reads return `tag`.
struct Probe {
    tag: u8,
    calls: AtomicUsize,
}

impl Probe {
    fn new(tag: u8) -> Arc<Probe> {
        Arc::new(Probe {
            tag,
            calls: AtomicUsize::new(0),
        })
    }
}

impl IoDevice for Probe {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.calls.fetch_add(1, SeqCst);
        data.fill(self.tag);
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        Ok(None)
    }
}

fn read_tag<F: Flavor>(buses: &Buses<F>, kind: BusKind, addr: u64) -> Option<u8> {
    let mut b = [0u8; 1];
    buses.read(kind, addr, &mut b).ok().map(|()| b[0])
}

#[test]
fn move_range_is_one_publication_without_a_grace_period() {
    let buses = Buses::new();
    let dev = Probe::new(7);
    let d: Arc<dyn IoDevice> = dev.clone();
    let (a, b) = (r(0xe000_0000, 0x1000), r(0xf000_0000, 0x2000));
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Mmio, a, d.clone())
        .unwrap();
    let counts = Arc::strong_count(&dev);
    let gps = buses.srcu().completed_grace_periods();
    buses
        .move_range(&mut slots, BusKind::Mmio, &d, a, b)
        .unwrap();
    assert_eq!(buses.srcu().completed_grace_periods(), gps, "no wait");
    assert_eq!(Arc::strong_count(&dev), counts, "still registered once");
    assert_eq!(buses.get_bus(&slots, BusKind::Mmio).len(), 1);
    drop(slots);
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0xe000_0000), None);
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0xf000_1fff), Some(7));
    // Errors change nothing.
    let mut slots = buses.lock_slots();
    let before = buses.get_bus(&slots, BusKind::Mmio) as *const _;
    assert_eq!(
        buses.move_range(&mut slots, BusKind::Mmio, &d, a, b),
        Err(BusError::NotRegistered {
            kind: BusKind::Mmio
        })
    );
    let pio_d = d.clone();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x3f8, 8), pio_d)
        .unwrap();
    assert_eq!(
        buses.move_range(&mut slots, BusKind::Pio, &d, r(0x3f8, 8), r(0xfffc, 8)),
        Err(BusError::OutsideBus {
            kind: BusKind::Pio,
            range: r(0xfffc, 8)
        })
    );
    assert_eq!(buses.get_bus(&slots, BusKind::Mmio) as *const _, before);
    // Unregistering after a move releases exactly the counts taken.
    buses.unregister_dev(&mut slots, BusKind::Mmio, &d).unwrap();
    buses.unregister_dev(&mut slots, BusKind::Pio, &d).unwrap();
    drop(d);
    assert_eq!(Arc::strong_count(&dev), 1);
}

#[test]
fn unregister_range_removes_one_entry_only() {
    let buses = Buses::new_fast();
    let dev = Probe::new(1);
    let d: Arc<dyn IoDevice> = dev.clone();
    let mut slots = buses.lock_slots();
    buses
        .register_many(
            &mut slots,
            BusKind::Pio,
            [(r(0x60, 1), d.clone()), (r(0x64, 1), d.clone())],
        )
        .unwrap();
    let counts = Arc::strong_count(&dev);
    buses
        .unregister_range(&mut slots, BusKind::Pio, r(0x64, 1), &d)
        .unwrap();
    assert_eq!(Arc::strong_count(&dev), counts - 1);
    assert_eq!(
        buses.unregister_range(&mut slots, BusKind::Pio, r(0x64, 1), &d),
        Err(BusError::NotRegistered { kind: BusKind::Pio })
    );
    drop(slots);
    assert_eq!(read_tag(&buses, BusKind::Pio, 0x60), Some(1));
    assert_eq!(read_tag(&buses, BusKind::Pio, 0x64), None);
}

#[test]
fn pio_ranges_past_port_ffff_are_refused() {
    let buses = Buses::new();
    let mut slots = buses.lock_slots();
    let d: Arc<dyn IoDevice> = Probe::new(1);
    for range in [r(0x1_0000, 8), r(0xfffe, 4)] {
        assert_eq!(
            buses.register_dev(&mut slots, BusKind::Pio, range, d.clone()),
            Err(BusError::OutsideBus {
                kind: BusKind::Pio,
                range
            })
        );
    }
    assert!(buses.get_bus(&slots, BusKind::Pio).is_empty());
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0xfffc, 4), d.clone())
        .unwrap();
    // The same range is fine on the MMIO bus.
    buses
        .register_dev(&mut slots, BusKind::Mmio, r(0x1_0000, 8), d)
        .unwrap();
}

#[test]
fn overlap_check_is_opt_in_per_bus() {
    let buses = Buses::new();
    let mut slots = buses.lock_slots();
    let d = || -> Arc<dyn IoDevice> { Probe::new(1) };
    // Default: overlaps accepted, as in Linux.
    assert!(!buses.rejects_overlaps(&slots, BusKind::Mmio));
    buses
        .register_many(
            &mut slots,
            BusKind::Mmio,
            [(r(0x1000, 0x100), d()), (r(0x1010, 4), d())],
        )
        .unwrap();
    buses.set_reject_overlaps(&mut slots, BusKind::Pio, true);
    let a = r(0x60, 8);
    buses
        .register_dev(&mut slots, BusKind::Pio, a, d())
        .unwrap();
    for range in [r(0x67, 1), r(0x50, 0x11), r(0x60, 8)] {
        assert_eq!(
            buses.register_dev(&mut slots, BusKind::Pio, range, d()),
            Err(BusError::Overlap {
                kind: BusKind::Pio,
                range,
                existing: a
            })
        );
    }
    // Inside one batch.
    assert!(matches!(
        buses.register_many(
            &mut slots,
            BusKind::Pio,
            [(r(0x100, 4), d()), (r(0x102, 4), d())]
        ),
        Err(BusError::Overlap { .. })
    ));
    assert_eq!(buses.get_bus(&slots, BusKind::Pio).len(), 1);
    // A move may overlap its own old range, not another one.
    let m = d();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x70, 4), m.clone())
        .unwrap();
    buses
        .move_range(&mut slots, BusKind::Pio, &m, r(0x70, 4), r(0x72, 4))
        .unwrap();
    assert_eq!(
        buses.move_range(&mut slots, BusKind::Pio, &m, r(0x72, 4), r(0x66, 4)),
        Err(BusError::Overlap {
            kind: BusKind::Pio,
            range: r(0x66, 4),
            existing: a
        })
    );
}

#[test]
fn zero_length_ranges_are_refused_with_a_typed_error() {
    assert_eq!(
        IoRange::new(0xfe00_0000, 0),
        Err(BusError::ZeroLength { addr: 0xfe00_0000 })
    );
}

/// With A = [0, 0x100), B = [0x10, 0x14), C = [0x50, 0x58), a write at
/// 0x50 goes to C, as in Linux.
#[test]
fn dispatch_order_linux_example() {
    let buses = Buses::new();
    let (a, b, c) = (Probe::new(0xa), Probe::new(0xb), Probe::new(0xc));
    let mut slots = buses.lock_slots();
    buses
        .register_many(
            &mut slots,
            BusKind::Mmio,
            [
                (r(0, 0x100), a.clone() as Arc<dyn IoDevice>),
                (r(0x10, 4), b.clone() as _),
                (r(0x50, 8), c.clone() as _),
            ],
        )
        .unwrap();
    drop(slots);
    buses.write(BusKind::Mmio, 0x50, &[1]).unwrap();
    assert_eq!(
        (
            a.calls.load(SeqCst),
            b.calls.load(SeqCst),
            c.calls.load(SeqCst)
        ),
        (0, 0, 1)
    );
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0x12), Some(0xb));
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0x20), Some(0xa));
}

/// A device whose handler reconfigures the buses it sits on.
struct SelfMover<F: Flavor> {
    buses: OnceLock<Weak<Buses<F>>>,
    me: OnceLock<Weak<dyn IoDevice>>,
    at: Mutex<IoRange>,
    /// Before taking the slots lock, the handler runs this (the test uses
    /// it to make sure an unregister is waiting for this very handler).
    before_lock: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    removal: Mutex<Option<Removal>>,
    calls: AtomicUsize,
}

impl<F: Flavor> SelfMover<F> {
    fn new(buses: &Arc<Buses<F>>, at: IoRange) -> Arc<SelfMover<F>> {
        let dev = Arc::new(SelfMover {
            buses: OnceLock::new(),
            me: OnceLock::new(),
            at: Mutex::new(at),
            before_lock: Mutex::new(None),
            removal: Mutex::new(None),
            calls: AtomicUsize::new(0),
        });
        let _ = dev.buses.set(Arc::downgrade(buses));
        let me: Arc<dyn IoDevice> = dev.clone();
        let _ = dev.me.set(Arc::downgrade(&me));
        dev
    }
}

impl<F: Flavor> IoDevice for SelfMover<F> {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.calls.fetch_add(1, SeqCst);
        data.fill(0x42);
        Ok(())
    }
    /// Write 1: move my window up by 0x1000 (a BAR write). Write 2: eject
    /// myself.
    fn write(&self, _: Access, data: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        let buses = self.buses.get().unwrap().upgrade().unwrap();
        let me = self.me.get().unwrap().upgrade().unwrap();
        if let Some(f) = self.before_lock.lock().unwrap().take() {
            f();
        }
        let mut slots = buses.lock_slots();
        match data[0] {
            1 => {
                let mut at = self.at.lock().unwrap();
                let to = IoRange::new(at.addr() + 0x1000, at.len()).unwrap();
                buses
                    .move_range(&mut slots, BusKind::Mmio, &me, *at, to)
                    .unwrap();
                *at = to;
            }
            2 => {
                // The blocking form is refused here...
                assert_eq!(
                    buses.unregister_dev(&mut slots, BusKind::Mmio, &me),
                    Err(BusError::InReadSection {
                        kind: BusKind::Mmio
                    })
                );
                // ...the starting form is not.
                let removal = buses
                    .start_unregister(&mut slots, BusKind::Mmio, &me)
                    .unwrap();
                drop(slots);
                *self.removal.lock().unwrap() = Some(removal);
            }
            _ => return Err(Declined),
        }
        Ok(None)
    }
}

/// The handler moves its own window while another thread's unregister
/// (of an unrelated device) is waiting for the grace period that waits for
/// this handler: no deadlock, because the unregister does not hold the
/// slots lock while it waits.
fn bar_move_from_handler_during_unregister<F: Flavor>() {
    let buses = Arc::new(Buses::<F>::default());
    let dev = SelfMover::new(&buses, r(0xe000_0000, 0x100));
    let other: Arc<dyn IoDevice> = Probe::new(9);
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(
                &mut slots,
                BusKind::Mmio,
                r(0xe000_0000, 0x100),
                dev.clone(),
            )
            .unwrap();
        buses
            .register_dev(&mut slots, BusKind::Pio, r(0x80, 1), other.clone())
            .unwrap();
    }
    let (done_tx, done_rx) = mpsc::channel();
    let (buses2, other2) = (buses.clone(), other.clone());
    let (started_tx, started_rx) = mpsc::channel::<()>();
    *dev.before_lock.lock().unwrap() = Some(Box::new(move || {
        // Start an unregister elsewhere and wait until it is waiting for
        // the grace period (which waits for this handler).
        let b = buses2.clone();
        std::thread::spawn(move || {
            let mut slots = b.lock_slots();
            started_tx.send(()).unwrap();
            b.unregister_dev(&mut slots, BusKind::Pio, &other2).unwrap();
        });
        started_rx.recv().unwrap();
        // Unpublished: the unregister is at (or right before) its wait for
        // the grace period that waits for this handler.
        while buses2.get_dev(BusKind::Pio, 0x80).is_some() {
            std::thread::yield_now();
        }
    }));
    let buses3 = buses.clone();
    // Not scoped: if the handler deadlocks, the test fails instead of
    // hanging in the join.
    std::thread::spawn(move || {
        buses3.write(BusKind::Mmio, 0xe000_0010, &[1]).unwrap();
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("deadlock: the handler could not take the slots lock");
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0xe000_0010), None);
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0xe000_1010), Some(0x42));
    // The other device's unregister completed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while Arc::strong_count(&other) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "unregister never returned"
        );
        std::thread::yield_now();
    }
}

#[test]
fn bar_move_from_handler_during_unregister_classic() {
    bar_move_from_handler_during_unregister::<Classic>();
}

#[test]
fn bar_move_from_handler_during_unregister_fast() {
    bar_move_from_handler_during_unregister::<Fast>();
}

/// The guest ejects the device from its own handler: unpublished at once,
/// completed after the section; never called again; no reference kept.
fn eject_from_handler<F: Flavor>() {
    let buses = Arc::new(Buses::<F>::default());
    let dev = SelfMover::new(&buses, r(0xd000_0000, 0x10));
    {
        let mut slots = buses.lock_slots();
        buses
            .register_dev(&mut slots, BusKind::Mmio, r(0xd000_0000, 0x10), dev.clone())
            .unwrap();
    }
    let counts = Arc::strong_count(&dev);
    buses.write(BusKind::Mmio, 0xd000_0000, &[2]).unwrap();
    let removal = dev
        .removal
        .lock()
        .unwrap()
        .take()
        .expect("handler started it");
    assert_eq!(read_tag(&buses, BusKind::Mmio, 0xd000_0000), None);
    let calls = dev.calls.load(SeqCst);
    removal.wait().unwrap();
    assert_eq!(Arc::strong_count(&dev), counts - 1, "buses let go");
    assert!(buses.write(BusKind::Mmio, 0xd000_0000, &[2]).is_err());
    assert_eq!(dev.calls.load(SeqCst), calls, "never called again");
}

#[test]
fn eject_from_handler_classic() {
    eject_from_handler::<Classic>();
}

#[test]
fn eject_from_handler_fast() {
    eject_from_handler::<Fast>();
}

#[test]
fn removal_polls_notifies_and_refuses_to_wait_inside_a_section() {
    let buses = Buses::new();
    let d: Arc<dyn IoDevice> = Probe::new(1);
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x70, 2), d.clone())
        .unwrap();
    let removal = buses
        .start_unregister(&mut slots, BusKind::Pio, &d)
        .unwrap();
    drop(slots);
    let g = buses.read_lock();
    assert_eq!(
        removal.wait(),
        Err(BusError::InReadSection { kind: BusKind::Pio })
    );
    drop(g);
    // That removal completes in the background, its retired table freed
    // with it (the registration's too: the grace period covered both).
    buses.srcu().barrier();
    assert_eq!(Arc::strong_count(&d), 1);
    assert_eq!(
        buses.retired_tables(&buses.lock_slots()),
        kvm_bus::RetiredTables::default()
    );
    // Polling completes a removal by itself; on_complete notifies.
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x70, 2), d.clone())
        .unwrap();
    let removal = buses
        .start_unregister(&mut slots, BusKind::Pio, &d)
        .unwrap();
    drop(slots);
    while !removal.is_complete() {
        std::thread::yield_now();
    }
    removal.wait().unwrap();
    assert_eq!(Arc::strong_count(&d), 1);
    let ran = Arc::new(AtomicBool::new(false));
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x70, 2), d.clone())
        .unwrap();
    let r2 = ran.clone();
    buses
        .start_unregister(&mut slots, BusKind::Pio, &d)
        .unwrap()
        .on_complete(move || r2.store(true, SeqCst));
    drop(slots);
    buses.srcu().barrier();
    assert!(ran.load(SeqCst));
    assert_eq!(Arc::strong_count(&d), 1);
}

/// A panic in the middle of a blocking unregister (here: the stall hook,
/// while the unregister waits for a reader with the slots lock released)
/// leaves the buses working: the guard is locked again, the device stays
/// unpublished, and the buses' references are released after a grace
/// period anyway.
#[test]
fn panic_during_unregister_wait_leaves_the_buses_working() {
    // The stall hook runs on the thread that drives the stalled grace
    // period. That is almost always the unregistering thread, but the
    // callback worker may drive it instead (it takes over grace periods
    // others want); then the hook lets the reader go, the unregister
    // returns normally, and the attempt is made again.
    let test_thread = std::thread::current().id();
    let armed = Arc::new(AtomicBool::new(true));
    let release: Arc<Mutex<Option<mpsc::Sender<()>>>> = Arc::new(Mutex::new(None));
    let (a2, release2) = (armed.clone(), release.clone());
    let srcu = kvm_bus::Srcu::<Classic>::builder()
        .stall_timeout(Duration::from_millis(5))
        .on_stall(move |r| {
            if std::thread::current().id() != test_thread {
                if let Some(tx) = &*release2.lock().unwrap() {
                    let _ = tx.send(());
                }
            } else if a2.swap(false, SeqCst) {
                panic!("injected stall-hook panic: {r}");
            }
        })
        .build();
    let buses = Buses::with_srcu(srcu, 16);
    let dev = Probe::new(1);
    let d: Arc<dyn IoDevice> = dev.clone();
    for attempt in 0.. {
        assert!(
            attempt < 20,
            "the unregistering thread never drove the grace period"
        );
        buses
            .register_dev(&mut buses.lock_slots(), BusKind::Pio, r(0x70, 2), d.clone())
            .unwrap();
        let (entered_tx, entered_rx) = mpsc::channel();
        let (leave_tx, leave_rx) = mpsc::channel::<()>();
        *release.lock().unwrap() = Some(leave_tx.clone());
        let panicked = std::thread::scope(|s| {
            let buses = &buses;
            s.spawn(move || {
                let g = buses.read_lock();
                entered_tx.send(()).unwrap();
                let _ = leave_rx.recv();
                drop(g);
            });
            entered_rx.recv().unwrap();
            let mut slots = buses.lock_slots();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                buses.unregister_dev(&mut slots, BusKind::Pio, &d)
            }));
            // Either way the guard is locked again and sees the device gone.
            assert!(buses.get_bus(&slots, BusKind::Pio).is_empty());
            drop(slots);
            // (The reader may have been let go by the hook already.)
            let _ = leave_tx.send(());
            match result {
                Err(_) => true,
                Ok(unregistered) => {
                    unregistered.unwrap();
                    false
                }
            }
        });
        if panicked {
            break;
        }
    }
    assert!(!armed.load(SeqCst));
    // Nothing is lost: the removal completes in the background.
    buses.srcu().barrier();
    assert_eq!(Arc::strong_count(&dev), 2, "only `d` and `dev` remain");
    // And the buses go on.
    buses
        .register_dev(&mut buses.lock_slots(), BusKind::Pio, r(0x70, 2), d.clone())
        .unwrap();
    assert_eq!(read_tag(&buses, BusKind::Pio, 0x70), Some(1));
    let mut slots = buses.lock_slots();
    buses.unregister_dev(&mut slots, BusKind::Pio, &d).unwrap();
    assert_eq!(Arc::strong_count(&dev), 2);
    // Nor are the tables retired before the panic (the panicking
    // unregister never reached its free of them): this grace period covers
    // them all, and this unregister frees them.
    assert_eq!(
        buses.retired_tables(&slots),
        kvm_bus::RetiredTables::default()
    );
}
