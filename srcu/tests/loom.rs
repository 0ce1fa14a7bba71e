//! loom models of the classic algorithm (the atomic counter path, which is
//! the same algorithm the rseq path runs, with barrier C as a release).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p srcu --release --test loom`
//!
//! Freed objects are modelled with `loom::cell::UnsafeCell`: the updater
//! "poisons" the object (a write) after the grace period, the reader reads it
//! inside its section. loom fails the model if the two accesses are not
//! ordered by happens-before, i.e. if `synchronize` returned while a
//! pre-existing reader could still access the object, and the poison value
//! catches a reader that sees a freed object through a stale pointer.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use srcu::{Srcu, SrcuCell, UpdateLock};

const LIVE: u32 = 0x11FE;
const POISON: u32 = 0xDEAD;

/// The object's memory is leaked (never reused), so even a broken model
/// only ever reads valid memory; dropping the handle is the "free".
struct Shared {
    value: u32,
    canary: UnsafeCell<u32>,
}

struct Obj(&'static Shared);

// SAFETY: every access to the canary goes through loom's UnsafeCell,
// whose whole point is to check that concurrent accesses are ordered.
unsafe impl Sync for Shared {}

impl Obj {
    fn new(value: u32) -> Self {
        Obj(Box::leak(Box::new(Shared {
            value,
            canary: UnsafeCell::new(LIVE),
        })))
    }
    /// Reader side: the object must not have been freed.
    fn check(&self) -> u32 {
        // SAFETY: loom checks this read against the poisoning write
        // and fails the model if they are not ordered.
        let c = self.0.canary.with(|p| unsafe { *p });
        assert_eq!(c, LIVE, "reader saw a freed object");
        self.0.value
    }
}

impl Drop for Obj {
    /// The free: poison the canary (a write loom orders against readers).
    fn drop(&mut self) {
        // SAFETY: as in `check`.
        self.0.canary.with_mut(|p| unsafe { *p = POISON });
    }
}

struct World {
    srcu: Srcu,
    lock: UpdateLock<()>,
    cell: SrcuCell<Obj>,
}

fn world() -> Arc<World> {
    let srcu = Srcu::builder().build();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&srcu, &lock, Some(Obj::new(1)));
    Arc::new(World { srcu, lock, cell })
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(5);
    }
    b.check(f);
}

fn read_once(w: &World) -> u32 {
    let g = w.srcu.read_lock();
    let v = w.cell.dereference(&g).map_or(0, Obj::check);
    drop(g);
    v
}

/// Replace, synchronize, poison the old object.
fn update_sync(w: &World, value: u32) {
    let stale = w.cell.assign(Obj::new(value), &mut w.lock.lock()).unwrap();
    drop(stale.synchronize());
}

#[test]
fn reader_updater() {
    model(|| {
        let w = world();
        let w2 = w.clone();
        let r = thread::spawn(move || read_once(&w2));
        update_sync(&w, 2);
        let seen = r.join().unwrap();
        assert!(seen == 1 || seen == 2);
    });
}

#[test]
fn reader_updater_second_reader() {
    model(|| {
        let w = world();
        let (w1, w2) = (w.clone(), w.clone());
        let r1 = thread::spawn(move || read_once(&w1));
        let r2 = thread::spawn(move || read_once(&w2));
        update_sync(&w, 2);
        r1.join().unwrap();
        r2.join().unwrap();
    });
}

#[test]
fn two_grace_periods_against_one_reader() {
    // The reader may straddle the flip of the first grace period; the
    // second must still wait for it if it started before.
    model(|| {
        let w = world();
        let w2 = w.clone();
        let r = thread::spawn(move || read_once(&w2));
        update_sync(&w, 2);
        update_sync(&w, 3);
        r.join().unwrap();
    });
}

#[test]
fn nested_sections() {
    model(|| {
        let w = world();
        let w2 = w.clone();
        let r = thread::spawn(move || {
            let outer = w2.srcu.read_lock();
            let inner = w2.srcu.read_lock();
            let a = w2.cell.dereference(&inner).map_or(0, Obj::check);
            drop(inner);
            // Still protected by the outer section.
            let b = w2.cell.dereference(&outer).map_or(0, Obj::check);
            drop(outer);
            (a, b)
        });
        update_sync(&w, 2);
        let (a, b) = r.join().unwrap();
        assert!(a <= b, "values only move forward");
    });
}

#[test]
fn guard_dropped_on_another_thread() {
    model(|| {
        let w = world();
        let w2 = w.clone();
        let r = thread::spawn(move || {
            // SAFETY: `w2` outlives the guard, which is dropped on
            // the spawned thread joined below, before `w2` goes away.
            let srcu: &'static Srcu = unsafe { &*(&w2.srcu as *const Srcu) };
            // SAFETY: as above, `w2` (which owns the cell) outlives every use.
            let cell: &'static SrcuCell<Obj> = unsafe { &*(&w2.cell as *const SrcuCell<Obj>) };
            let g = srcu.read_lock();
            let obj: &'static Shared = cell.dereference(&g).unwrap().0;
            let t = thread::spawn(move || {
                // SAFETY: as in `Obj::check`.
                assert_eq!(obj.canary.with(|p| unsafe { *p }), LIVE);
                drop(g);
            });
            t.join().unwrap();
            drop(w2);
        });
        update_sync(&w, 2);
        r.join().unwrap();
    });
}

#[test]
fn call_srcu_defers_the_free() {
    model(|| {
        let w = world();
        let w2 = w.clone();
        let r = thread::spawn(move || read_once(&w2));
        // Dropping the Stale queues the free with call_srcu.
        drop(w.cell.assign(Obj::new(2), &mut w.lock.lock()));
        r.join().unwrap();
        w.srcu.barrier();
    });
}
