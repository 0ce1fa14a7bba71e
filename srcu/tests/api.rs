//! Unit tests of every public item of `srcu`, on both flavors and both
//! counter paths.
#![cfg(not(loom))]

use srcu::{
    Classic, CounterPath, Fast, Flavor, GpCookie, ReaderMode, Srcu, SrcuCell, StallReport,
    UpdateLock,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Barrier};
use std::time::Duration;

fn domains<F: Flavor>() -> Vec<Srcu<F>> {
    vec![
        Srcu::<F>::builder().build(),
        Srcu::<F>::builder().force_atomic_counters(true).build(),
    ]
}

/// Dropping the canary's owner sets the flag: used to see when frees happen.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[test]
fn modes_are_reported() {
    let c = Srcu::new();
    assert_eq!(c.reader_mode(), ReaderMode::FullBarrier);
    let forced = Srcu::<Classic>::builder()
        .force_atomic_counters(true)
        .build();
    assert_eq!(forced.counter_path(), CounterPath::Atomic);
    let f = Srcu::new_fast();
    // This machine's kernel (6.x) has membarrier; CI runs here too.
    if cfg!(target_os = "linux") && std::env::var_os("SRCU_NO_MEMBARRIER").is_none() {
        assert_eq!(f.reader_mode(), ReaderMode::Membarrier);
    }
    // glibc 2.35+ registers rseq for every thread on this machine, so CI
    // must exercise the rseq path. Set SRCU_EXPECT_RSEQ=0 where rseq is
    // legitimately absent (under valgrind, or with glibc.pthread.rseq=0).
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    if std::env::var("SRCU_EXPECT_RSEQ").map_or(true, |v| v != "0") {
        assert_eq!(
            c.counter_path(),
            CounterPath::Rseq,
            "glibc 2.35+ registers rseq on this machine"
        );
    }
    let dbg = format!("{f:?}");
    assert!(dbg.contains("fast"), "{dbg}");
}

fn read_lock_counts_readers<F: Flavor>() {
    for s in domains::<F>() {
        assert_eq!(s.readers(), 0);
        let g1 = s.read_lock();
        let g2 = s.read_lock(); // nested
        assert_eq!(s.readers(), 2);
        g2.mb_after_read_lock();
        assert!(g1.index() < 2);
        assert!(std::ptr::eq(g1.srcu(), &s));
        drop(g2);
        assert_eq!(s.readers(), 1);
        drop(g1);
        assert_eq!(s.readers(), 0);
    }
}

#[test]
fn read_lock_counts_readers_classic() {
    read_lock_counts_readers::<Classic>();
}

#[test]
fn read_lock_counts_readers_fast() {
    read_lock_counts_readers::<Fast>();
}

fn synchronize_waits_for_preexisting_reader<F: Flavor>() {
    for s in domains::<F>() {
        let s = &s;
        let in_section = AtomicBool::new(false);
        let synced = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::scope(|sc| {
            let g = s.read_lock();
            sc.spawn(|| {
                s.synchronize();
                // The reader must have left before we get here.
                assert!(
                    !in_section.load(SeqCst),
                    "synchronize returned while a pre-existing reader was inside"
                );
                synced.store(true, SeqCst);
                tx.send(()).unwrap();
            });
            in_section.store(true, SeqCst);
            // Give the updater every chance to (wrongly) finish early: wait
            // for a few grace-period-driver naps' worth of its progress.
            assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
            assert!(!synced.load(SeqCst));
            in_section.store(false, SeqCst);
            drop(g);
            rx.recv().unwrap();
        });
        assert!(synced.load(SeqCst));
    }
}

#[test]
fn synchronize_waits_for_preexisting_reader_classic() {
    synchronize_waits_for_preexisting_reader::<Classic>();
}

#[test]
fn synchronize_waits_for_preexisting_reader_fast() {
    synchronize_waits_for_preexisting_reader::<Fast>();
}

#[test]
fn synchronize_does_not_wait_for_later_readers() {
    // A reader that keeps re-entering never blocks the grace period: the
    // two-index flip moves new readers to the other index.
    let s = Srcu::new();
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(SeqCst) {
                let _g = s.read_lock();
                std::hint::spin_loop();
            }
        });
        for _ in 0..200 {
            s.synchronize();
            s.synchronize_expedited();
        }
        stop.store(true, SeqCst);
    });
    assert!(s.completed_grace_periods() >= 200);
}

#[test]
fn guard_dropped_on_another_thread() {
    for s in domains::<Classic>().into_iter().chain(std::iter::empty()) {
        let s = &s;
        std::thread::scope(|sc| {
            let g = s.read_lock();
            let g = g.into_sendable();
            sc.spawn(move || drop(g)).join().unwrap();
        });
        assert_eq!(s.readers(), 0);
        s.synchronize();
    }
    for s in domains::<Fast>() {
        let s = &s;
        std::thread::scope(|sc| {
            let g = s.read_lock();
            let g = g.into_sendable();
            sc.spawn(move || drop(g)).join().unwrap();
        });
        assert_eq!(s.readers(), 0);
        s.synchronize_expedited();
    }
}

#[test]
fn concurrent_synchronize_calls_share_grace_periods() {
    let s = Srcu::new();
    let before = s.completed_grace_periods();
    let n = 8;
    let barrier = Barrier::new(n);
    let g = s.read_lock(); // holds everybody up, so they all pile in
    std::thread::scope(|sc| {
        for _ in 0..n {
            sc.spawn(|| {
                barrier.wait();
                s.synchronize();
            });
        }
        // Wait until one drives (stuck on our reader) and the other 7 are
        // blocked on its grace periods; then let them all go.
        while srcu::__private::waiters(&s) != (n as u32 - 1, true) {
            std::thread::yield_now();
        }
        drop(g);
    });
    let used = s.completed_grace_periods() - before;
    // The driver's grace period was already running when the others
    // asked, so they need one more, and they all share it.
    assert!(
        (1..=2).contains(&used),
        "8 concurrent callers used {used} grace periods; they should share"
    );
}

#[test]
fn call_srcu_runs_after_grace_period_and_batches() {
    let s = Srcu::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let g = s.read_lock();
    for _ in 0..100 {
        let r = ran.clone();
        s.call_srcu(move || {
            r.fetch_add(1, SeqCst);
        });
    }
    // A pre-existing reader holds every callback back.
    assert_eq!(ran.load(SeqCst), 0);
    assert_eq!(s.pending_callbacks(), 100);
    let gp_before = s.completed_grace_periods();
    drop(g);
    s.barrier();
    assert_eq!(ran.load(SeqCst), 100);
    assert_eq!(s.pending_callbacks(), 0);
    // 100 callbacks queued before one grace period began: at most a couple
    // of grace periods retire them all, not 100.
    assert!(s.completed_grace_periods() - gp_before <= 3);
}

#[test]
fn call_srcu_panicking_callback_does_not_stop_others() {
    let s = Srcu::new();
    let ran = Arc::new(AtomicBool::new(false));
    s.call_srcu(|| panic!("callback panics on purpose"));
    let r = ran.clone();
    s.call_srcu(move || r.store(true, SeqCst));
    s.barrier();
    assert!(ran.load(SeqCst));
}

#[test]
fn dropping_domain_runs_pending_callbacks() {
    let ran = Arc::new(AtomicUsize::new(0));
    {
        let s = Srcu::new_fast();
        for _ in 0..10 {
            let r = ran.clone();
            s.call_srcu(move || {
                r.fetch_add(1, SeqCst);
            });
        }
    }
    assert_eq!(ran.load(SeqCst), 10);
}

#[test]
fn polled_grace_periods() {
    let s = Srcu::new();
    let g = s.read_lock();
    let c: GpCookie = s.start_poll();
    assert!(
        !s.poll(c),
        "a grace period cannot complete while a pre-existing reader is inside"
    );
    let state = s.get_state();
    assert!(state >= c);
    drop(g);
    // The worker drives it; wait without sleeping as synchronisation: a
    // synchronize started now covers the polled one.
    s.synchronize();
    assert!(s.poll(c));
}

#[test]
fn counters_wrap() {
    for s in [
        Srcu::<Classic>::builder()
            .preset_counters(usize::MAX - 3)
            .build(),
        Srcu::<Classic>::builder()
            .preset_counters(usize::MAX - 3)
            .force_atomic_counters(true)
            .build(),
    ] {
        for _ in 0..10 {
            let g = s.read_lock();
            let g2 = s.read_lock();
            drop(g);
            s.call_srcu(|| {});
            drop(g2);
            s.synchronize();
        }
        assert_eq!(s.readers(), 0);
        s.barrier();
    }
    let f = Srcu::<Fast>::builder().preset_counters(usize::MAX).build();
    let g = f.read_lock();
    assert_eq!(f.readers(), 1);
    drop(g);
    f.synchronize();
}

#[test]
fn cpu_slots_fewer_than_cpus_use_shared_slots() {
    let s = Srcu::<Fast>::builder().cpu_slots(1).build();
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..10_000 {
                    let _g = s.read_lock();
                }
            });
        }
        for _ in 0..20 {
            s.synchronize();
        }
    });
    assert_eq!(s.readers(), 0);
}

#[test]
fn stall_hook_reports_once_with_reader_count() {
    let reports = Arc::new(parking_lot::Mutex::new(Vec::<StallReport>::new()));
    let r2 = reports.clone();
    let s = Srcu::<Classic>::builder()
        .stall_timeout(Duration::from_millis(20))
        .on_stall(move |r| r2.lock().push(r.clone()))
        .build();
    let s = &s;
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let g = s.read_lock();
        let g2 = s.read_lock();
        sc.spawn(move || {
            s.synchronize();
            tx.send(()).unwrap();
        });
        // Wait until the hook fired (it is what we are testing), then end the section.
        while reports.lock().is_empty() {
            std::thread::yield_now();
        }
        drop((g, g2));
        rx.recv().unwrap();
    });
    let reports = reports.lock();
    assert_eq!(reports.len(), 1, "one report per stalled grace period");
    assert_eq!(reports[0].readers, 2);
    assert!(reports[0].waited >= Duration::from_millis(20));
    assert!(reports[0].to_string().contains("stalled"));
}

#[test]
fn synchronize_inside_own_section_panics_in_every_build() {
    let s = Srcu::new();
    let g = s.read_lock();
    let err =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.synchronize())).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("inside a read section"), "{msg}");
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.barrier())).unwrap_err();
    assert!(err.downcast_ref::<String>().unwrap().contains("barrier"));
    drop(g);
    s.synchronize(); // fine now
                     // Another domain's section does not count.
    let other = Srcu::new();
    let _og = other.read_lock();
    s.synchronize();
}

#[test]
fn panic_inside_section_ends_it() {
    let s = Srcu::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = s.read_lock();
        panic!("reader panics");
    }));
    assert!(r.is_err());
    assert_eq!(s.readers(), 0);
    s.synchronize(); // does not hang
}

#[test]
fn cell_read_update_destroy() {
    let s = Srcu::new();
    let lock = UpdateLock::new(0u32);
    let freed = Arc::new(AtomicBool::new(false));
    let mut cell = SrcuCell::new(&s, &lock, Some((1, DropFlag(freed.clone()))));
    {
        let g = s.read_lock();
        assert_eq!(cell.dereference(&g).map(|v| v.0), Some(1));
    }
    {
        let mut ug = lock.lock();
        *ug += 1;
        assert_eq!(cell.dereference_protected(&ug).map(|v| v.0), Some(1));
        let g = s.read_lock();
        let seen = cell.dereference(&g).unwrap();
        let stale = cell
            .assign((2, DropFlag(Arc::new(AtomicBool::new(false)))), &mut ug)
            .unwrap();
        drop(stale); // deferred: the reader above still sees the old value
        assert_eq!(seen.0, 1);
        assert!(!freed.load(SeqCst), "freed while a reader held it");
        drop(g);
    }
    s.barrier();
    assert!(freed.load(SeqCst));
    assert_eq!(cell.get_mut().map(|v| v.0), Some(2));
    let taken = cell.take(&mut lock.lock()).unwrap().synchronize();
    assert_eq!(taken.0, 2);
    {
        let g = s.read_lock();
        assert!(cell.dereference(&g).is_none());
    }
    assert!(cell
        .replace(
            Some((3, DropFlag(Arc::new(AtomicBool::new(false))))),
            &mut lock.lock()
        )
        .is_none());
    assert_eq!(cell.into_inner().map(|v| v.0), Some(3));
}

#[test]
#[should_panic(expected = "another Srcu domain")]
fn cell_rejects_guard_of_other_domain() {
    let a = Srcu::new();
    let b = Srcu::new();
    let lock = UpdateLock::new(());
    let cell = SrcuCell::new(&a, &lock, Some(1));
    let g = b.read_lock();
    let _ = cell.dereference(&g);
}

#[test]
#[should_panic(expected = "another UpdateLock")]
fn cell_rejects_guard_of_other_lock() {
    let s = Srcu::new();
    let lock = UpdateLock::new(());
    let other = UpdateLock::new(());
    let cell = SrcuCell::new(&s, &lock, Some(1));
    let _ = cell.dereference_protected(&other.lock());
}

#[test]
fn stale_dropped_after_domain_is_freed_at_once() {
    let lock = UpdateLock::new(());
    let freed = Arc::new(AtomicBool::new(false));
    let cell;
    {
        let s = Srcu::new();
        cell = SrcuCell::new(&s, &lock, Some(DropFlag(freed.clone())));
    }
    // The domain handle is gone: no reader can exist, the free is immediate.
    drop(cell.take(&mut lock.lock()));
    assert!(freed.load(SeqCst));
}

#[test]
fn independent_domains_do_not_wait_for_each_other() {
    let a = Srcu::new();
    let b = Srcu::new_fast();
    let _ga = a.read_lock();
    b.synchronize(); // would hang if domains shared readers
    let _gb = b.read_lock();
    let c = Srcu::new();
    c.synchronize();
}

#[test]
fn domain_and_guard_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Srcu>();
    send_sync::<Srcu<Fast>>();
    send::<srcu::SendableReadGuard<'static, Classic>>();
    send_sync::<SrcuCell<String>>();
    send_sync::<UpdateLock<u32>>();
}

#[test]
fn call_srcu_runs_without_anyone_waiting() {
    // Nobody calls barrier: the worker must get to the callbacks by itself,
    // both when it was idle (woken) and while it naps after a batch.
    let s = Srcu::new();
    for round in 0..3 {
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        s.call_srcu(move || r.store(true, SeqCst));
        let t = std::time::Instant::now();
        while !ran.load(SeqCst) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "round {round}: callback never ran"
            );
            std::thread::yield_now();
        }
    }
}

/// `Stale::try_take` against a reader that still holds the value: while a
/// section that began before the unpublish is open, it keeps refusing,
/// even with another thread driving grace periods as fast as it can (they
/// wait for the reader, none completes); once the reader leaves, polling
/// alone (no grace period asked for by `try_take`) gets the value back
/// after the driver's next grace period.
fn try_take_refuses_while_a_reader_holds_the_value<F: Flavor>() {
    for srcu in domains::<F>() {
        let srcu = Arc::new(srcu);
        let lock = UpdateLock::new(());
        let cell = Arc::new(SrcuCell::new(&srcu, &lock, Some(7u64)));
        let (held_tx, held_rx) = mpsc::channel();
        let (leave_tx, leave_rx) = mpsc::channel::<()>();
        let reader = std::thread::spawn({
            let (srcu, cell) = (srcu.clone(), cell.clone());
            move || {
                let g = srcu.read_lock();
                let v = cell.dereference(&g).copied();
                held_tx.send(()).unwrap();
                leave_rx.recv().unwrap();
                assert_eq!(v, Some(7));
                assert_eq!(cell.dereference(&g), Some(&8));
            }
        });
        held_rx.recv().unwrap();
        let mut old = cell.replace(Some(8), &mut lock.lock()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let driver = std::thread::spawn({
            let (srcu, stop) = (srcu.clone(), stop.clone());
            move || {
                while !stop.load(SeqCst) {
                    srcu.synchronize_expedited();
                }
            }
        });
        for _ in 0..1000 {
            old = old.try_take().expect_err("handed back under a reader");
        }
        leave_tx.send(()).unwrap();
        reader.join().unwrap();
        let value = loop {
            match old.try_take() {
                Ok(v) => break v,
                Err(pending) => old = pending,
            }
            std::thread::yield_now();
        };
        assert_eq!(*value, 7);
        stop.store(true, SeqCst);
        driver.join().unwrap();
    }
}

#[test]
fn try_take_refuses_while_a_reader_holds_the_value_classic() {
    try_take_refuses_while_a_reader_holds_the_value::<Classic>();
}

#[test]
fn try_take_refuses_while_a_reader_holds_the_value_fast() {
    try_take_refuses_while_a_reader_holds_the_value::<Fast>();
}
