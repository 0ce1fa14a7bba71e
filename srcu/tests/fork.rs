//! `fork()`: in the child, the callback worker and any grace-period driver
//! of the parent do not exist. The child must still run its callbacks
//! (a new worker), complete grace periods, and drop the domain cleanly.
//! Tests in their own binary, run one at a time by the lock below, so that
//! no other test thread holds a lock (the allocator's, say) at the moment
//! of a fork.
#![cfg(all(unix, not(loom)))]

use srcu::{Flavor, Srcu};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

/// One forking test at a time.
static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Forks; the child runs `child` and exits with 0 if it returned true (1
/// if false or if it panicked; SIGALRM kills it if it hangs for 20 s). The
/// parent asserts that the child exited with 0.
fn in_forked_child(what: &str, child: impl FnOnce() -> bool) {
    // SAFETY: fork in a test binary whose forking tests run one at a time;
    // the child only uses srcu and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm has no preconditions.
        unsafe { libc::alarm(20) };
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(false);
        // SAFETY: ends the child at once, without the parent's atexit state.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what}: child failed or hung (status {status:#x})"
    );
}

/// Queues a callback that sets a flag, waits for it with `barrier`, and
/// says whether it ran.
fn callback_runs<F: Flavor>(srcu: &Srcu<F>) -> bool {
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    srcu.call_srcu(move || r.store(true, SeqCst));
    srcu.barrier();
    ran.load(SeqCst)
}

#[test]
fn forked_child_runs_callbacks_and_grace_periods() {
    let _one = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    // An Option, so that the child can drop its copy of the domain.
    let mut domain = Some(Srcu::new_fast());
    let srcu = domain.as_ref().unwrap();
    srcu.call_srcu(|| {});
    srcu.barrier(); // the worker exists in the parent
    assert_eq!(srcu.stats().worker_starts, 1);
    in_forked_child("after a barrier", || {
        let srcu = domain.take().unwrap();
        let ran = callback_runs(&srcu);
        srcu.synchronize();
        let ok = ran && srcu.stats().worker_starts == 2;
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        srcu.call_srcu(move || d.store(true, SeqCst));
        drop(srcu);
        ok && dropped.load(SeqCst)
    });
    let srcu = domain.as_ref().unwrap();
    // The parent's domain is unaffected.
    assert!(callback_runs(srcu));
    assert_eq!(srcu.stats().worker_starts, 1);
}

/// Forks at arbitrary moments of the worker's life (right after queuing
/// callbacks, while it runs a batch, naps or drives a grace period): the
/// `atfork` handlers make sure the child never inherits an internal lock
/// held by a thread it does not have.
#[test]
fn fork_while_the_worker_is_busy() {
    let _one = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let srcu = Srcu::new();
    for round in 0..30 {
        for _ in 0..round % 4 {
            srcu.call_srcu(|| {});
        }
        if round % 3 == 0 {
            srcu.synchronize();
        }
        in_forked_child(&format!("round {round}"), || {
            let ran = callback_runs(&srcu);
            srcu.synchronize_expedited();
            ran
        });
    }
    srcu.barrier();
}

/// The parent's worker is inside a callback at the moment of the fork: the
/// batch it took lives on its stack, in the parent. The child must not wait
/// for it (`barrier` would hang): it gives it up and runs its own.
#[test]
fn fork_while_the_worker_runs_a_callback() {
    let _one = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let srcu = Srcu::new();
    let (inside_tx, inside_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    srcu.call_srcu(move || {
        inside_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    srcu.call_srcu(|| {}); // queued behind the running batch or with it
    inside_rx.recv().unwrap();
    in_forked_child("worker inside a callback", || {
        callback_runs(&srcu) && srcu.pending_callbacks() == 0
    });
    release_tx.send(()).unwrap();
    srcu.barrier();
    assert_eq!(srcu.pending_callbacks(), 0);
}

/// Sections held across the fork, one per counter path, end in the child
/// (on the child's copy of the thread that began them: the atomic path's
/// stand-in rseq area is at the same place there) and in the parent, and
/// both processes' grace periods complete with no reader left.
#[test]
fn sections_held_across_fork_end_on_both_sides() {
    let _one = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let atomic: Srcu<srcu::Fast> = Srcu::builder().force_atomic_counters(true).build();
    let rseq: Srcu<srcu::Fast> = Srcu::builder().build();
    let mut held = Some((atomic.read_lock(), rseq.read_lock()));
    in_forked_child("sections held across fork", || {
        let inherited = (atomic.readers(), rseq.readers());
        drop(held.take()); // the child's copies of both sections end here
        atomic.synchronize();
        rseq.synchronize();
        inherited == (1, 1) && atomic.readers() == 0 && rseq.readers() == 0
    });
    // The parent's own sections are still held, and end here.
    assert_eq!((atomic.readers(), rseq.readers()), (1, 1));
    drop(held.take());
    atomic.synchronize();
    rseq.synchronize();
    assert_eq!((atomic.readers(), rseq.readers()), (0, 0));
}
