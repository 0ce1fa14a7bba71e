//! The fast flavor without membarrier: its fallback, in which `read_lock`
//! executes barrier B as a full fence (as classic does) and the end of a
//! section takes the out-of-line atomic path. A process learns once
//! whether it may use membarrier, so this runs in a child process of the
//! test binary with `SRCU_NO_MEMBARRIER=1` set.
#![cfg(not(loom))]

use srcu::{ReaderMode, Srcu, SrcuCell, UpdateLock};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// Set in the child process.
const CHILD: &str = "SRCU_FALLBACK_TEST_CHILD";

/// A value whose `alive` flag the updater clears after the grace period
/// that follows its unpublish, before freeing it.
struct Canary {
    alive: AtomicBool,
}

/// Sets the flag when dropped, unwinding included.
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn fast_flavor_without_membarrier() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "fast_flavor_without_membarrier",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SRCU_NO_MEMBARRIER", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("fallback child: ok"),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
}

/// Readers on every CPU enter and leave sections back to back (nested, and
/// some ended on another thread) and check that the value they read is
/// alive, while an updater replaces it and waits for a grace period before
/// killing the old one, as fast as it can. Then every counter balances.
fn child() {
    // A grace period that never ends (a section counted wrong) fails the
    // test instead of hanging it: the stall hook ends this child process,
    // whichever thread drives the grace period (the callback worker
    // survives a panicking hook and retries).
    let srcu = Srcu::<srcu::Fast>::builder()
        .stall_timeout(Duration::from_secs(10))
        .on_stall(|report| {
            eprintln!("fallback child: grace period stalled: {report:?}");
            std::process::exit(3);
        })
        .build();
    assert_eq!(srcu.reader_mode(), ReaderMode::FullBarrier, "fallback mode");
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(
        &srcu,
        &lock,
        Some(Canary {
            alive: AtomicBool::new(true),
        }),
    );
    let stop = AtomicBool::new(false);
    let (sections, grace_periods) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let readers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for r in 0..readers {
            let (srcu, cell, stop, sections) = (&srcu, &cell, &stop, &sections);
            s.spawn(move || {
                let mut n = 0usize;
                while !stop.load(SeqCst) {
                    let g = srcu.read_lock();
                    let v = cell.dereference(&g).expect("a value");
                    let inner = srcu.read_lock(); // nested
                    assert!(v.alive.load(SeqCst), "reader {r}: a dead value");
                    drop(inner);
                    if n.is_multiple_of(64) {
                        // End this section on another thread.
                        let moved = g.into_sendable();
                        std::thread::scope(|t| {
                            t.spawn(move || drop(moved.adopt()));
                        });
                    } else {
                        assert!(v.alive.load(SeqCst), "reader {r}: a dead value");
                        drop(g);
                    }
                    n += 1;
                    if n.is_multiple_of(256) {
                        sections.fetch_add(256, SeqCst);
                    }
                }
            });
        }
        let (srcu, cell, lock, stop) = (&srcu, &cell, &lock, &stop);
        let (gps, sections) = (&grace_periods, &sections);
        s.spawn(move || {
            // Stops the readers however this thread ends.
            let _stop_readers = StopOnDrop(stop);
            // At least 2,000 grace periods, and on until the readers have
            // made 200,000 sections (they start late).
            while gps.load(SeqCst) < 2_000 || sections.load(SeqCst) < 200_000 {
                let old = cell
                    .replace(
                        Some(Canary {
                            alive: AtomicBool::new(true),
                        }),
                        &mut lock.lock(),
                    )
                    .expect("the old value");
                let old = old.synchronize();
                old.alive.store(false, SeqCst);
                gps.fetch_add(1, SeqCst);
            }
            assert_eq!(srcu.stats().membarriers, 0, "no membarrier in fallback");
        });
    });
    assert_eq!(srcu.readers(), 0, "every section counted out");
    assert!(grace_periods.load(SeqCst) >= 2_000);
    // (`Rseq` where glibc registers rseq: then the lock side is a locked
    // add on the CPU's slot and the unlock side the atomic path.)
    println!(
        "fallback child: ok ({} sections, {} grace periods, {:?} counters)",
        sections.load(SeqCst),
        grace_periods.load(SeqCst),
        srcu.counter_path()
    );
}
