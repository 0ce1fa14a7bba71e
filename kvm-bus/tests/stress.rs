//! Multi-threaded stress test without KVM, for both SRCU flavors: updater
//! threads register and unregister devices while reader threads dispatch.
//!
//! Checks:
//! (a) no access is delivered to a device after its `unregister_dev` (or
//!     `unregister_many`) returned: the updater sets the device's `removed`
//!     flag right after the call returns, and a delivery that sees it set
//!     is a violation;
//! (b) the observation guarantee: the updater registers a device, then
//!     stores its generation into a plain per-slot flag (Relaxed, standing
//!     in for guest memory); a reader that loads the flag (Relaxed), then
//!     enters a section and dispatches through `get_bus_srcu`, must reach
//!     that device, unless its removal started meanwhile (a per-slot
//!     removal counter, read before the flag and again after a miss, tells).
//!
//! Bounded by time (about a second per flavor), synchronised by atomics and
//! a start barrier only.

use kvm_bus::{Access, BusKind, Buses, Declined, Flavor, IoDevice, IoRange, WriteResult};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const SLOTS: usize = 8;
const UPDATERS: usize = 2;
const READERS: usize = 3;
const RUN: Duration = Duration::from_millis(1000);
const KIND: BusKind = BusKind::Mmio;

fn slot_addr(k: usize) -> u64 {
    0x1_0000 + 0x1000 * k as u64
}

#[derive(Default)]
struct Counters {
    /// (a) deliveries to a device whose unregistration had returned.
    after_unregister: AtomicU64,
    /// (b) flag seen, device not found, no removal started.
    observation: AtomicU64,
    deliveries: AtomicU64,
    observation_checks: AtomicU64,
    registrations: AtomicU64,
    unregistrations: AtomicU64,
}

/// The progress a run must show: registrations, and deliveries and
/// observation checks by the readers.
const MIN_REGISTRATIONS: u64 = 10;
const MIN_READS: u64 = 100;

impl Counters {
    /// Every side has made the progress the checks require.
    fn progressed(&self) -> bool {
        self.registrations.load(Relaxed) > MIN_REGISTRATIONS
            && self.deliveries.load(Relaxed) > MIN_READS
            && self.observation_checks.load(Relaxed) > MIN_READS
    }
}

struct Dev {
    generation: u64,
    removed: AtomicBool,
    stats: Arc<Counters>,
}

impl Dev {
    fn deliver(&self) {
        self.stats.deliveries.fetch_add(1, Relaxed);
        if self.removed.load(SeqCst) {
            self.stats.after_unregister.fetch_add(1, Relaxed);
        }
    }
}

impl IoDevice for Dev {
    fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.deliver();
        data.copy_from_slice(&self.generation.to_le_bytes()[..data.len()]);
        Ok(())
    }
    fn write(&self, _: Access, _: &[u8]) -> WriteResult {
        self.deliver();
        Ok(None)
    }
}

struct Slot {
    /// The "guest memory" flag: generation of the registered device, or 0.
    flag: AtomicU64,
    /// Removals begun; bumped before a device is unpublished.
    removals: AtomicU64,
}

struct Shared<F: Flavor> {
    buses: Buses<F>,
    slots: Vec<Slot>,
    stats: Arc<Counters>,
    stop: AtomicBool,
}

fn updater<F: Flavor>(sh: &Shared<F>, me: usize) {
    let mine: Vec<usize> = (0..SLOTS).filter(|k| k % UPDATERS == me).collect();
    let mut present: Vec<Option<Arc<Dev>>> = vec![None; SLOTS];
    let mut next_gen = (me as u64 + 1) << 48;
    let mut round = 0u64;
    let start_removal = |k: usize| {
        // Flag first, then the counter (see the module docs): a reader
        // that saw this removal's count also sees the cleared flag.
        sh.slots[k].flag.store(0, Relaxed);
        sh.slots[k].removals.fetch_add(1, SeqCst);
    };
    // Unregisters `d` (slot `k`) and marks it removed once that returned.
    let remove = |k: usize, d: &Arc<Dev>| {
        start_removal(k);
        let dev: Arc<dyn IoDevice> = d.clone();
        let mut slots = sh.buses.lock_slots();
        sh.buses.unregister_dev(&mut slots, KIND, &dev).unwrap();
        drop(slots);
        d.removed.store(true, SeqCst);
    };
    while !sh.stop.load(Relaxed) {
        round += 1;
        if round.is_multiple_of(4) {
            // Batch removal of everything this updater has.
            let batch: Vec<(usize, Arc<Dev>)> = mine
                .iter()
                .filter_map(|&k| present[k].take().map(|d| (k, d)))
                .collect();
            for &(k, _) in &batch {
                start_removal(k);
            }
            let devs: Vec<Arc<dyn IoDevice>> = batch
                .iter()
                .map(|(_, d)| d.clone() as Arc<dyn IoDevice>)
                .collect();
            let mut slots = sh.buses.lock_slots();
            sh.buses.unregister_many(&mut slots, KIND, &devs).unwrap();
            drop(slots);
            for (_, d) in &batch {
                d.removed.store(true, SeqCst);
            }
            sh.stats
                .unregistrations
                .fetch_add(batch.len() as u64, Relaxed);
            continue;
        }
        for &k in &mine {
            if let Some(d) = present[k].take() {
                remove(k, &d);
                sh.stats.unregistrations.fetch_add(1, Relaxed);
            } else {
                next_gen += 1;
                let d = Arc::new(Dev {
                    generation: next_gen,
                    removed: AtomicBool::new(false),
                    stats: sh.stats.clone(),
                });
                let mut slots = sh.buses.lock_slots();
                sh.buses
                    .register_dev(
                        &mut slots,
                        KIND,
                        IoRange::new(slot_addr(k), 8).unwrap(),
                        d.clone(),
                    )
                    .unwrap();
                drop(slots);
                // The plain flag, standing in for guest memory.
                sh.slots[k].flag.store(next_gen, Relaxed);
                present[k] = Some(d);
                sh.stats.registrations.fetch_add(1, Relaxed);
            }
        }
    }
    // Leave nothing behind; every device must then be ours alone.
    for &k in &mine {
        if let Some(d) = present[k].take() {
            remove(k, &d);
            assert_eq!(Arc::strong_count(&d), 1, "buses kept a reference");
        }
    }
}

fn reader<F: Flavor>(sh: &Shared<F>, me: usize) {
    let mut k = me;
    let mut n = 0u64;
    while !sh.stop.load(Relaxed) {
        k = (k + 1) % SLOTS;
        n += 1;
        let slot = &sh.slots[k];
        let r1 = slot.removals.load(SeqCst);
        let seen = slot.flag.load(Relaxed);
        let mut data = [0u8; 8];
        let result = {
            let guard = sh.buses.read_lock();
            let bus = sh.buses.get_bus_srcu(&guard, KIND);
            if n.is_multiple_of(3) {
                // Also exercise the write paths ((a) only).
                let _ = bus.write_cookie(n as usize % 4, slot_addr(k) + 4, &[1, 2, 3, 4]);
            }
            bus.read(slot_addr(k), &mut data)
        };
        if n.is_multiple_of(5) {
            let _ = sh.buses.write(KIND, slot_addr(k), &[0]);
        }
        if n.is_multiple_of(64) {
            // Outside any section: lets updaters (and their grace periods)
            // run on a machine with fewer CPUs than threads. Not used for
            // synchronisation.
            std::thread::yield_now();
        }
        if seen != 0 {
            sh.stats.observation_checks.fetch_add(1, Relaxed);
            let found = result.is_ok() && u64::from_le_bytes(data) == seen;
            if !found && slot.removals.load(SeqCst) == r1 {
                sh.stats.observation.fetch_add(1, Relaxed);
            }
        }
    }
}

fn stress<F: Flavor>(buses: Buses<F>) {
    let sh = Shared {
        buses,
        slots: (0..SLOTS)
            .map(|_| Slot {
                flag: AtomicU64::new(0),
                removals: AtomicU64::new(0),
            })
            .collect(),
        stats: Arc::new(Counters::default()),
        stop: AtomicBool::new(false),
    };
    let start = Barrier::new(UPDATERS + READERS + 1);
    std::thread::scope(|s| {
        for u in 0..UPDATERS {
            let (sh, start) = (&sh, &start);
            s.spawn(move || {
                start.wait();
                updater(sh, u)
            });
        }
        for r in 0..READERS {
            let (sh, start) = (&sh, &start);
            s.spawn(move || {
                start.wait();
                reader(sh, r)
            });
        }
        start.wait();
        let t0 = Instant::now();
        // RUN at least, and on a slow host (valgrind runs one thread at a
        // time) longer, up to 60 s, until every side has made the progress
        // the checks below require.
        while t0.elapsed() < RUN
            || (!sh.stats.progressed() && t0.elapsed() < Duration::from_secs(60))
        {
            std::thread::yield_now();
        }
        sh.stop.store(true, Relaxed);
    });
    let st = &sh.stats;
    let (a, b) = (
        st.after_unregister.load(Relaxed),
        st.observation.load(Relaxed),
    );
    println!(
        "{}: {} registrations, {} unregistrations, {} deliveries, {} observation checks; \
         violations: (a) after unregister {a}, (b) observation {b}",
        F::NAME,
        st.registrations.load(Relaxed),
        st.unregistrations.load(Relaxed),
        st.deliveries.load(Relaxed),
        st.observation_checks.load(Relaxed),
    );
    assert_eq!(a, 0, "accesses delivered after unregister returned");
    assert_eq!(b, 0, "registrations observed but not seen by get_bus_srcu");
    assert!(
        st.registrations.load(Relaxed) > MIN_REGISTRATIONS,
        "updaters made no progress"
    );
    assert!(
        st.deliveries.load(Relaxed) > MIN_READS,
        "readers made no progress"
    );
    assert!(st.observation_checks.load(Relaxed) > MIN_READS);
    let slots = sh.buses.lock_slots();
    assert!(sh.buses.get_bus(&slots, KIND).is_empty());
}

#[test]
fn stress_classic() {
    stress(Buses::new());
}

#[test]
fn stress_fast() {
    stress(Buses::new_fast());
}
