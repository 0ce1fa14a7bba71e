//! The device interface in the rust-vmm shape: `(base, offset)` and the
//! vCPU index in [`Access`], `&mut self` devices behind a `Mutex`, and write
//! completions waited for outside the read section.

use kvm_bus::{
    Access, BusKind, Buses, Completion, Declined, IoDevice, IoRange, MutIoDevice, WriteResult,
};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::Duration;

fn r(addr: u64, len: u64) -> IoRange {
    IoRange::new(addr, len).unwrap()
}

/// Records every access it gets.
#[derive(Default)]
struct Seen(Mutex<Vec<Access>>);

impl IoDevice for Seen {
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.0.lock().unwrap().push(access);
        data.fill(access.offset as u8);
        Ok(())
    }
    fn write(&self, access: Access, _: &[u8]) -> WriteResult {
        self.0.lock().unwrap().push(access);
        Ok(None)
    }
}

#[test]
fn handlers_get_base_offset_and_vcpu() {
    let buses = Buses::new();
    let dev = Arc::new(Seen::default());
    let mut slots = buses.lock_slots();
    // An i8042 at 0x60 and 0x64: the device tells the two apart by base.
    buses
        .register_many(
            &mut slots,
            BusKind::Pio,
            [
                (r(0x60, 1), dev.clone() as Arc<dyn IoDevice>),
                (r(0x64, 1), dev.clone() as _),
            ],
        )
        .unwrap();
    buses
        .register_dev(
            &mut slots,
            BusKind::Mmio,
            r(0xd000_0000, 0x100),
            dev.clone(),
        )
        .unwrap();
    drop(slots);
    buses.write(BusKind::Pio, 0x64, &[0xfe]).unwrap();
    buses.write(BusKind::Pio, 0x60, &[0x01]).unwrap();
    let mut b = [0u8; 4];
    buses.read(BusKind::Mmio, 0xd000_0010, &mut b).unwrap();
    assert_eq!(b, [0x10; 4]);
    {
        let g = buses.read_lock();
        let bus = buses.get_bus_srcu(&g, BusKind::Mmio);
        bus.read_by(Some(3), 0xd000_00fc, &mut b).unwrap();
        assert!(bus.write_by(Some(1), 0xd000_0000, &[0]).unwrap().is_none());
    }
    let seen = dev.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            Access::new(0x64, 0, None),
            Access::new(0x60, 0, None),
            Access::new(0xd000_0000, 0x10, None),
            Access::new(0xd000_0000, 0xfc, Some(3)),
            Access::new(0xd000_0000, 0, Some(1)),
        ]
    );
}

/// A plain `&mut self` device: a latch.
struct Latch {
    value: u8,
    writes: usize,
}

impl MutIoDevice for Latch {
    fn read(&mut self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        data.fill(self.value);
        Ok(())
    }
    fn write(&mut self, _: Access, data: &[u8]) -> WriteResult {
        if data[0] == 0xee {
            panic!("latch: bad value");
        }
        self.value = data[0];
        self.writes += 1;
        Ok(None)
    }
}

#[test]
fn mut_device_behind_a_mutex_survives_a_panic() {
    let buses = Buses::new_fast();
    let latch = Arc::new(Mutex::new(Latch {
        value: 0,
        writes: 0,
    }));
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Pio, r(0x80, 1), latch.clone())
        .unwrap();
    drop(slots);
    buses.write(BusKind::Pio, 0x80, &[7]).unwrap();
    // Many vCPUs at once: the mutex serialises them.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..1000u32 {
                    buses.write(BusKind::Pio, 0x80, &[(i % 200) as u8]).unwrap();
                }
            });
        }
    });
    assert_eq!(latch.lock().unwrap().writes, 4001);
    // A panic inside the handler poisons the lock; the device goes on.
    let r = std::panic::catch_unwind(|| buses.write(BusKind::Pio, 0x80, &[0xee]));
    assert!(r.is_err());
    assert!(latch.is_poisoned());
    buses.write(BusKind::Pio, 0x80, &[9]).unwrap();
    let mut b = [0];
    buses.read(BusKind::Pio, 0x80, &mut b).unwrap();
    assert_eq!(b, [9]);
}

/// A write that hands work to "the device manager" and returns a
/// completion for the vCPU to wait on.
struct Reprogram {
    barrier: Arc<Barrier>,
    calls: AtomicUsize,
}

impl IoDevice for Reprogram {
    fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> {
        self.calls.fetch_add(1, SeqCst);
        Err(Declined)
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.calls.fetch_add(1, SeqCst);
        Ok(Some(Completion::from(self.barrier.clone())))
    }
}

/// While the writer waits on the completion, its read section has ended:
/// unregistering that very device returns, and the device is not called
/// again.
#[test]
fn completion_is_waited_for_outside_the_read_section() {
    let buses = Arc::new(Buses::new());
    let barrier = Arc::new(Barrier::new(2));
    let dev = Arc::new(Reprogram {
        barrier: barrier.clone(),
        calls: AtomicUsize::new(0),
    });
    let d: Arc<dyn IoDevice> = dev.clone();
    let mut slots = buses.lock_slots();
    buses
        .register_dev(&mut slots, BusKind::Mmio, r(0x1000, 4), d.clone())
        .unwrap();
    drop(slots);
    let (wrote_tx, wrote_rx) = mpsc::channel();
    let b2 = buses.clone();
    let vcpu = std::thread::spawn(move || {
        b2.write(BusKind::Mmio, 0x1000, &[1]).unwrap();
        wrote_tx.send(()).unwrap();
    });
    // The vCPU is in the device (call counted) or waiting on the barrier.
    while dev.calls.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    let (unreg_tx, unreg_rx) = mpsc::channel();
    let b3 = buses.clone();
    let d3 = d.clone();
    std::thread::spawn(move || {
        let mut slots = b3.lock_slots();
        b3.unregister_dev(&mut slots, BusKind::Mmio, &d3).unwrap();
        unreg_tx.send(()).unwrap();
    });
    unreg_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("unregister waited for a vCPU parked on a completion");
    assert!(
        wrote_rx.try_recv().is_err(),
        "the vCPU must still be waiting on the completion"
    );
    barrier.wait(); // the device manager finishes
    wrote_rx.recv().unwrap();
    vcpu.join().unwrap();
    assert!(buses.write(BusKind::Mmio, 0x1000, &[1]).is_err());
    assert_eq!(dev.calls.load(SeqCst), 1, "never called after its removal");
}
