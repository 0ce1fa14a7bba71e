//! Retired tables under fire, both flavors: two readers hold sections of
//! random length (spinning or sleeping) on a table they re-check and
//! dispatch through again and again, a third thread completes grace
//! periods now and then (so that updates do free retired tables), and the
//! updater registers, moves and removes devices (blocking and
//! `start_unregister` removals). A table or a device freed while a reader
//! can still reach it shows up as a changed table or a device whose drop
//! has run (it reads back 0 instead of its tag). The retired tables stay
//! within their budget throughout. (From a review of `retired.rs`.)
//!
//! Bounded by time (`KVM_BUS_RETIRED_STRESS_MS`, default 1000 per flavor);
//! the sleeps only vary the readers' section lengths.

use kvm_bus::{Access, BusKind, Buses, Declined, Flavor, IoDevice, IoRange, WriteResult};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TAG: u8 = 0xa5;

/// Updates made and reader checks done that a run must exceed.
const MIN_PROGRESS: u64 = 100;

/// Reads back its tag until dropped.
struct Tagged {
    tag: AtomicU8,
}

impl Drop for Tagged {
    fn drop(&mut self) {
        self.tag.store(0, SeqCst);
    }
}

impl IoDevice for Tagged {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        data.fill(self.tag.load(SeqCst));
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        Ok(None)
    }
}

fn tagged() -> Arc<dyn IoDevice> {
    Arc::new(Tagged {
        tag: AtomicU8::new(TAG),
    })
}

/// xorshift64 from a fixed seed: numbers below `n`.
fn rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

fn range(rnd: &mut impl FnMut(u64) -> u64) -> IoRange {
    IoRange::new(rnd(0xf00) * 0x10, 1 + rnd(0x20)).unwrap()
}

fn run<F: Flavor>(buses: Buses<F>) {
    let run_for = Duration::from_millis(
        std::env::var("KVM_BUS_RETIRED_STRESS_MS").map_or(1000, |s| s.parse().unwrap()),
    );
    let buses = Arc::new(buses);
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let (buses, stop, checks) = (buses.clone(), stop.clone(), checks.clone());
        threads.push(std::thread::spawn(move || {
            let mut rnd = rng(0x1234 + t);
            while !stop.load(Relaxed) {
                let guard = buses.read_lock();
                let kind = [BusKind::Mmio, BusKind::Pio][rnd(2) as usize];
                let bus = buses.get_bus_srcu(&guard, kind);
                let before: Vec<IoRange> = bus.iter().map(|(r, _)| r).collect();
                for _ in 0..1 + rnd(4) {
                    if rnd(4) == 0 {
                        std::thread::sleep(Duration::from_micros(rnd(200)));
                    } else {
                        for _ in 0..rnd(2000) {
                            std::hint::spin_loop();
                        }
                    }
                    let now: Vec<IoRange> = bus.iter().map(|(r, _)| r).collect();
                    assert_eq!(now, before, "a table changed under its reader");
                    for r in &before {
                        let mut v = [0u8; 1];
                        bus.read(r.addr(), &mut v).unwrap();
                        assert_eq!(v, [TAG], "a device dropped under its reader");
                    }
                    checks.fetch_add(1, Relaxed);
                }
                drop(guard);
            }
        }));
    }
    {
        let (buses, stop) = (buses.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut rnd = rng(99);
            while !stop.load(Relaxed) {
                match rnd(3) {
                    0 => buses.srcu().synchronize(),
                    1 => buses.srcu().synchronize_expedited(),
                    _ => std::thread::sleep(Duration::from_micros(rnd(300))),
                }
            }
        }));
    }
    let t0 = Instant::now();
    let mut rnd = rng(7);
    let mut registered: Vec<(BusKind, IoRange, Arc<dyn IoDevice>)> = Vec::new();
    let (mut updates, mut most_kept) = (0u64, 0);
    // `run_for` at least, and on a slow host (valgrind runs one thread at
    // a time) longer, up to 60 s, until both sides have made the progress
    // the checks below require.
    while t0.elapsed() < run_for
        || ((updates <= MIN_PROGRESS || checks.load(Relaxed) <= MIN_PROGRESS)
            && t0.elapsed() < Duration::from_secs(60))
    {
        let mut slots = buses.lock_slots();
        let kind = [BusKind::Mmio, BusKind::Pio][rnd(2) as usize];
        let op = rnd(100);
        if registered.len() < 40 || (op < 55 && registered.len() < 300) {
            let (r, d) = (range(&mut rnd), tagged());
            if rnd(4) == 0 {
                buses
                    .register_many(&mut slots, kind, [(r, d.clone())])
                    .unwrap();
            } else {
                buses.register_dev(&mut slots, kind, r, d.clone()).unwrap();
            }
            registered.push((kind, r, d));
        } else if op < 75 {
            let i = rnd(registered.len() as u64) as usize;
            let to = range(&mut rnd);
            let (k, from, d) = registered[i].clone();
            buses.move_range(&mut slots, k, &d, from, to).unwrap();
            registered[i].1 = to;
        } else if op < 90 {
            let (k, r, d) = registered.swap_remove(rnd(registered.len() as u64) as usize);
            let removal = buses.start_unregister_range(&mut slots, k, r, &d).unwrap();
            drop(d);
            if rnd(2) == 0 {
                drop(removal); // completes in the background
            } else {
                drop(slots);
                removal.wait().unwrap();
                updates += 1;
                continue;
            }
        } else {
            let (k, r, d) = registered.swap_remove(rnd(registered.len() as u64) as usize);
            buses.unregister_range(&mut slots, k, r, &d).unwrap();
        }
        let kept = buses.retired_tables(&slots);
        assert!(kept.bytes <= 256 << 10, "{kept:?}");
        most_kept = most_kept.max(kept.tables);
        updates += 1;
    }
    stop.store(true, Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let checks = checks.load(Relaxed);
    eprintln!(
        "{}: {updates} updates, {checks} reader checks, at most {most_kept} tables kept",
        F::NAME
    );
    assert!(
        updates > MIN_PROGRESS && checks > MIN_PROGRESS,
        "{updates} updates, {checks} checks"
    );
    assert!(most_kept > 0, "retired tables were kept");
}

#[test]
fn retired_tables_under_fire_classic() {
    run(Buses::new());
}

#[test]
fn retired_tables_under_fire_fast() {
    run(Buses::new_fast());
}
