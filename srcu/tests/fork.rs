//! `fork()`: in the child, the callback worker and any grace-period driver
//! of the parent do not exist. The child must still run its callbacks
//! (a new worker), complete grace periods, and drop the domain cleanly.
//! Tests in their own binary, run one at a time by the harness's lock
//! below, so that no other test thread holds a lock (the allocator's, say)
//! at the moment of a fork.
#![cfg(all(unix, not(loom)))]

use srcu::Srcu;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

/// One forking test at a time.
static FORKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn forked_child_runs_callbacks_and_grace_periods() {
    let _one = FORKING.lock().unwrap_or_else(|e| e.into_inner());
    let srcu = Srcu::new_fast();
    srcu.call_srcu(|| {});
    srcu.barrier(); // the worker exists in the parent
    assert_eq!(srcu.stats().worker_starts, 1);
    // SAFETY: fork in a test binary with a single test; the child only
    // uses the domain and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // Child: if anything hangs, SIGALRM kills it and the parent fails.
        // SAFETY: alarm has no preconditions.
        unsafe { libc::alarm(20) };
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        srcu.call_srcu(move || r.store(true, SeqCst));
        srcu.barrier();
        srcu.synchronize();
        let ok = ran.load(SeqCst) && srcu.stats().worker_starts == 2;
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        srcu.call_srcu(move || d.store(true, SeqCst));
        drop(srcu);
        let code = if ok && dropped.load(SeqCst) { 0 } else { 1 };
        // SAFETY: ends the child without running the parent's atexit state.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed or hung (status {status:#x})"
    );
    // The parent's domain is unaffected.
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    srcu.call_srcu(move || r.store(true, SeqCst));
    srcu.barrier();
    assert!(ran.load(SeqCst));
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
        // SAFETY: as above; the child only uses the domain and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: alarm has no preconditions.
            unsafe { libc::alarm(20) };
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            srcu.call_srcu(move || r.store(true, SeqCst));
            srcu.barrier();
            srcu.synchronize_expedited();
            let code = if ran.load(SeqCst) { 0 } else { 1 };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "round {round}: child failed or hung (status {status:#x})"
        );
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
    // SAFETY: as above; the child only uses the domain and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm has no preconditions.
        unsafe { libc::alarm(20) };
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        srcu.call_srcu(move || r.store(true, SeqCst));
        srcu.barrier();
        let code = if ran.load(SeqCst) && srcu.pending_callbacks() == 0 {
            0
        } else {
            1
        };
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    release_tx.send(()).unwrap();
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed or hung (status {status:#x})"
    );
    srcu.barrier();
    assert_eq!(srcu.pending_callbacks(), 0);
}
