//! rcutorture-style stress test, for both flavors on both counter paths.
//!
//! Four reader threads and two updaters on (typically) two cores. Updaters
//! replace the value of an [`SrcuCell`] and free old objects after
//! `synchronize`, `synchronize_expedited`, a polled grace period or
//! `call_srcu`; a free first overwrites the object's canary (poisoning).
//! Readers nest sections, sleep or yield inside them, hand guards to another
//! thread to drop, and check every object they see:
//!
//! * poisoned: the canary is not `LIVE` (the object was freed while a
//!   reader could still reach it);
//! * stale: the object was unpublished before a grace period that
//!   *completed before the reader's section began* (the reader should have
//!   seen a newer value).
//!
//! At the end, every lock increment must be matched by an unlock increment
//! (a lost per-CPU update would show here, or hang a grace period: the stall
//! hook turns a 20 s stall into a failure).
//!
//! `SRCU_TORTURE_SECS` sets the duration of each configuration (default 2 s
//! split over the four; CI runs the default).
#![cfg(not(loom))]

mod common;

use srcu::{Classic, Fast, Flavor, Srcu, SrcuCell, UpdateLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LIVE: u64 = 0x5AFE_5AFE_5AFE_5AFE;
const POISON: u64 = 0xDEAD_DEAD_DEAD_DEAD;
const NOT_REMOVED: u64 = u64::MAX;

struct Obj {
    canary: AtomicU64,
    seq: u64,
    /// Completed grace periods when it was unpublished.
    removed_at: AtomicU64,
}

impl Drop for Obj {
    fn drop(&mut self) {
        self.canary.store(POISON, Relaxed);
    }
}

/// An object pointer travelling with the guard that protects it.
struct ObjPtr(*const Obj);
// SAFETY: `Obj` is `Sync`; the pointer is only dereferenced while the guard
// sent along with it is alive.
unsafe impl Send for ObjPtr {}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    nested: AtomicU64,
    handed_off: AtomicU64,
    updates: AtomicU64,
    poisoned: AtomicU64,
    stale: AtomicU64,
}

fn duration() -> Duration {
    let secs: f64 = std::env::var("SRCU_TORTURE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.5);
    Duration::from_secs_f64(secs)
}

fn check(obj: &Obj, started_at: u64, stats: &Stats) {
    if obj.canary.load(Relaxed) != LIVE {
        stats.poisoned.fetch_add(1, Relaxed);
    }
    let r = obj.removed_at.load(Relaxed);
    // Unpublished when `r` grace periods had completed: grace period r + 2
    // started after that; if it completed before this section began, the
    // section must have seen a newer object.
    if r != NOT_REMOVED && started_at >= r + 2 {
        stats.stale.fetch_add(1, Relaxed);
    }
}

/// A domain for a torture phase, and a fresh object maker. A stall of 20 s
/// (a lost counter update or a missed wake-up) ends the process: a panic in
/// the callback worker's grace period would be survived and retried, which
/// would hang the test instead of failing it.
fn torture_domain<F: Flavor>(name: &'static str, force_atomic: bool) -> Srcu<F> {
    Srcu::<F>::builder()
        .force_atomic_counters(force_atomic)
        .stall_timeout(Duration::from_secs(20))
        .on_stall(move |r| {
            eprintln!("torture {name}: {r}: a lost counter update or a missed wake-up");
            std::process::exit(101);
        })
        .build()
}

fn new_obj(seq: u64) -> Obj {
    Obj {
        canary: AtomicU64::new(LIVE),
        seq,
        removed_at: AtomicU64::new(NOT_REMOVED),
    }
}

fn torture<F: Flavor>(name: &'static str, force_atomic: bool) {
    let srcu: Srcu<F> = torture_domain(name, force_atomic);
    let lock = UpdateLock::new(0u64);
    let cell = SrcuCell::new(&srcu, &lock, Some(new_obj(0)));
    let stats = Stats::default();
    let stop = AtomicBool::new(false);
    let dur = duration();
    let (handoff_tx, handoff_rx) = mpsc::channel::<(srcu::SendableReadGuard<'_, F>, ObjPtr, u64)>();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        // Drops guards handed over by readers, after checking the object.
        s.spawn(|| {
            for (guard, obj, started_at) in handoff_rx {
                let guard = guard.adopt();
                // SAFETY: the object was read under `guard`, which is still
                // alive: the grace period that frees it waits for it.
                check(unsafe { &*obj.0 }, started_at, &stats);
                drop(guard);
            }
        });
        for r in 0..4u64 {
            let (srcu, cell, stats, stop, tx) = (&srcu, &cell, &stats, &stop, handoff_tx.clone());
            s.spawn(move || {
                let mut i = 0u64;
                let mut last_seq = 0;
                while !stop.load(Relaxed) {
                    i += 1;
                    let started_at = srcu.completed_grace_periods();
                    let g = srcu.read_lock();
                    let obj = cell.dereference(&g).expect("never empty");
                    check(obj, started_at, stats);
                    assert!(
                        obj.seq >= last_seq || r == u64::MAX,
                        "values go backwards within a reader"
                    );
                    last_seq = obj.seq;
                    match (i + r) % 64 {
                        0 => std::thread::sleep(Duration::from_micros(50)),
                        1..=4 => std::thread::yield_now(),
                        5 => {
                            let inner = srcu.read_lock();
                            let o2 = cell.dereference(&inner).expect("never empty");
                            check(o2, started_at, stats);
                            drop(inner);
                            stats.nested.fetch_add(1, Relaxed);
                        }
                        6 => {
                            // Hand the section to another thread to end it.
                            stats.handed_off.fetch_add(1, Relaxed);
                            let p = ObjPtr(obj);
                            tx.send((g.into_sendable(), p, started_at)).unwrap();
                            stats.reads.fetch_add(1, Relaxed);
                            continue;
                        }
                        _ => std::hint::spin_loop(),
                    }
                    // Still alive after sleeping inside the section?
                    check(obj, started_at, stats);
                    drop(g);
                    stats.reads.fetch_add(1, Relaxed);
                }
            });
        }
        drop(handoff_tx);
        for u in 0..2u64 {
            let (srcu, cell, stats, stop, lock) = (&srcu, &cell, &stats, &stop, &lock);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    i += 1;
                    let mut g = lock.lock();
                    *g += 1;
                    let seq = *g;
                    let old: *const Obj = cell.dereference_protected(&g).expect("never empty");
                    let stale = cell.assign(new_obj(seq), &mut g).expect("never empty");
                    // Recorded after the unpublish (program order): a later
                    // `completed` only makes the stale check weaker.
                    let r = srcu.completed_grace_periods();
                    // SAFETY: `old` was just unpublished and is freed only
                    // by `stale` below (after a grace period); we hold it.
                    unsafe { (*old).removed_at.store(r, Relaxed) };
                    drop(g);
                    match (i + u) % 4 {
                        0 => drop(stale.synchronize()),
                        1 => {
                            srcu.synchronize_expedited();
                            drop(stale.synchronize());
                        }
                        2 => {
                            let c = srcu.start_poll();
                            while !srcu.poll(c) {
                                std::thread::yield_now();
                            }
                            drop(stale); // deferred anyway
                        }
                        _ => drop(stale), // call_srcu
                    }
                    stats.updates.fetch_add(1, Relaxed);
                }
            });
        }
        while t0.elapsed() < dur {
            std::thread::sleep(Duration::from_millis(10)); // the test's clock, not synchronisation
        }
        stop.store(true, Relaxed);
    });
    srcu.barrier();
    let balanced = srcu::__private::balanced(&srcu);
    println!(
        "torture {name} ({:?}, {:?}): {:.1} s, {} reads ({} nested, {} handed off), {} updates, {} grace periods, {} poisoned, {} stale, counters {}",
        srcu.reader_mode(),
        srcu.counter_path(),
        t0.elapsed().as_secs_f64(),
        stats.reads.load(Relaxed),
        stats.nested.load(Relaxed),
        stats.handed_off.load(Relaxed),
        stats.updates.load(Relaxed),
        srcu.completed_grace_periods(),
        stats.poisoned.load(Relaxed),
        stats.stale.load(Relaxed),
        if balanced { "balanced" } else { "UNBALANCED" },
    );
    assert_eq!(
        stats.poisoned.load(Relaxed),
        0,
        "{name}: a reader saw a freed object"
    );
    assert_eq!(
        stats.stale.load(Relaxed),
        0,
        "{name}: a reader saw a value unpublished before a completed grace period"
    );
    assert!(
        balanced,
        "{name}: lock and unlock counts differ: a per-CPU increment was lost"
    );
    assert!(stats.reads.load(Relaxed) > 0 && stats.updates.load(Relaxed) > 0);
}

#[test]
fn torture_classic_rseq() {
    torture::<Classic>("classic", false);
}

#[test]
fn torture_classic_atomic() {
    torture::<Classic>("classic-atomic", true);
}

#[test]
fn torture_fast_rseq() {
    torture::<Fast>("fast", false);
}

#[test]
fn torture_fast_atomic() {
    torture::<Fast>("fast-atomic", true);
}

/// Oversubscribed tight loops of empty sections: the kernel preempts
/// threads in the middle of the per-CPU increment all the time, and another
/// thread on the same CPU bumps the same counter meanwhile. Without the
/// rseq restart the lost updates unbalance the counters within a second.
fn counters_exact<F: Flavor>(name: &str) {
    let srcu: Srcu<F> = Srcu::<F>::builder().build();
    let stop = AtomicBool::new(false);
    let sections = AtomicU64::new(0);
    let t0 = Instant::now();
    let dur = duration().max(Duration::from_millis(300));
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    for _ in 0..1024 {
                        drop(std::hint::black_box(srcu.read_lock()));
                    }
                    n += 1024;
                }
                sections.fetch_add(n, Relaxed);
            });
        }
        while t0.elapsed() < dur {
            std::thread::sleep(Duration::from_millis(10)); // the test's clock
        }
        stop.store(true, Relaxed);
    });
    let readers = srcu.readers();
    println!(
        "counters {name} ({:?}): {} sections on 6 threads in {:.1} s, imbalance {}",
        srcu.counter_path(),
        sections.load(Relaxed),
        t0.elapsed().as_secs_f64(),
        readers as isize
    );
    assert_eq!(
        readers, 0,
        "{name}: per-CPU increments were lost under preemption"
    );
    srcu.synchronize();
}

#[test]
fn counters_exact_under_preemption_classic() {
    counters_exact::<Classic>("classic");
}

#[test]
fn counters_exact_under_preemption_fast() {
    counters_exact::<Fast>("fast");
}

/// Grace periods at the maximum rate, one reader per core entering and
/// leaving short sections back to back: the load that exposes a reader on a
/// stale index. Such a reader loaded the index just before a flip and
/// incremented it just after the scan of that index; only the *next* grace
/// period's first scan (of the then-inactive index) waits for it, which is
/// why srcutree scans both indices. Remove that scan
/// (`--cfg srcu_teeth="scan1"`, see scripts/teeth.sh) and an object is
/// poisoned while this reader still looks at it.
///
/// Freed objects are poisoned and kept (a graveyard), not returned to the
/// allocator, so a premature free is seen as poison deterministically
/// rather than through undefined behaviour.
fn max_rate<F: Flavor>(name: &'static str, force_atomic: bool) {
    let srcu: Srcu<F> = torture_domain(name, force_atomic);
    let lock = UpdateLock::new(0u64);
    let cell = SrcuCell::new(&srcu, &lock, Some(new_obj(0)));
    let poisoned = AtomicU64::new(0);
    let sections = AtomicU64::new(0);
    let lingered = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let readers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dur = duration().max(Duration::from_millis(500));
    let t0 = Instant::now();
    let mut graveyard: Vec<Box<Obj>> = Vec::new();
    std::thread::scope(|s| {
        for r in 0..readers {
            let (srcu, cell, poisoned, sections, stop, lingered) =
                (&srcu, &cell, &poisoned, &sections, &stop, &lingered);
            s.spawn(move || {
                let mut n = 0u64;
                let _ = r;
                while !stop.load(Relaxed) {
                    let g = srcu.read_lock();
                    let obj = cell.dereference(&g).expect("never empty");
                    let mut dead = obj.canary.load(Relaxed) != LIVE;
                    if g.index() != srcu::__private::current_index(srcu) {
                        // The index flipped around this read_lock: the
                        // section may sit on the index being retired, or on
                        // a stale one. Linger across the next two grace
                        // periods (bounded: with both scans in place they
                        // wait for us), so that a grace period that does
                        // not wait for this section frees `obj` under it.
                        lingered.fetch_add(1, Relaxed);
                        let gp0 = srcu.completed_grace_periods();
                        let t = Instant::now();
                        while srcu.completed_grace_periods() < gp0 + 2
                            && t.elapsed() < Duration::from_micros(40)
                        {
                            std::hint::spin_loop();
                        }
                        dead |= obj.canary.load(Relaxed) != LIVE;
                    }
                    if dead {
                        poisoned.fetch_add(1, Relaxed);
                    }
                    drop(g);
                    n += 1;
                }
                sections.fetch_add(n, Relaxed);
            });
        }
        let mut seq = 0;
        // At least one batch: on a slow or serialising host (valgrind runs
        // one thread at a time) the spinning readers may hold the CPU
        // until `dur` has passed before this thread first runs.
        loop {
            for _ in 0..64 {
                seq += 1;
                let mut g = lock.lock();
                let stale = cell.assign(new_obj(seq), &mut g).expect("never empty");
                drop(g);
                let old = stale.synchronize();
                old.canary.store(POISON, Relaxed);
                graveyard.push(old);
            }
            if t0.elapsed() >= dur {
                break;
            }
        }
        stop.store(true, Relaxed);
    });
    let stats = srcu.stats();
    println!(
        "max-rate {name} ({:?}, {:?}): {:.1} s, {readers} readers, {} sections ({} on a flipping index), {} grace periods ({:.0}/s), {} membarriers, {} poisoned",
        srcu.reader_mode(),
        srcu.counter_path(),
        t0.elapsed().as_secs_f64(),
        sections.load(Relaxed),
        lingered.load(Relaxed),
        stats.grace_periods,
        stats.grace_periods as f64 / t0.elapsed().as_secs_f64(),
        stats.membarriers,
        poisoned.load(Relaxed),
    );
    assert_eq!(
        poisoned.load(Relaxed),
        0,
        "{name}: a reader saw an object freed by a grace period that did not wait for it"
    );
    assert!(sections.load(Relaxed) > 0 && !graveyard.is_empty());
    assert!(srcu::__private::balanced(&srcu));
}

#[test]
fn max_rate_classic() {
    max_rate::<Classic>("classic", false);
}

#[test]
fn max_rate_fast() {
    max_rate::<Fast>("fast", false);
}

#[test]
fn max_rate_fast_atomic() {
    max_rate::<Fast>("fast-atomic", true);
}

/// The fast flavor without membarrier (its fallback: barrier B a full
/// fence in `read_lock`, the end of a section retrying its sequence out of
/// line): the torture and max-rate phases of the fast flavor again, in a
/// child process of this test binary with `SRCU_NO_MEMBARRIER=1` (a
/// process learns once whether it may use membarrier). A lost or
/// misplaced count fails the child through the phases' stall hook.
#[test]
fn fast_without_membarrier() {
    common::rerun_without_membarrier(
        &["torture_fast_rseq", "max_rate_fast"],
        &["torture fast (FullBarrier", "max-rate fast (FullBarrier"],
    );
}
