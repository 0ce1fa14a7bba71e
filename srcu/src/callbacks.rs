//! `call_srcu` and `barrier`: deferred work after a grace period.
//!
//! Callbacks go into one queue per domain. A worker thread, started by the
//! first `call_srcu` or `start_poll`, takes the whole queue as one batch,
//! waits for one grace period that started after it took the batch (so the
//! grace period covers every callback in it), and runs the batch in order.
//! Callbacks queued meanwhile form the next batch, so under a steady stream
//! one grace period retires everything queued during the previous one.
//!
//! `call_srcu` never waits for a grace period: it takes the queue mutex
//! (held only for a push or a swap), and wakes the worker only if it is
//! idle; after a batch the worker naps (`NAP`) and collects what arrives
//! meanwhile without being woken.
//! The worker also drives grace periods requested through `start_poll`.
//!
//! When the domain's handle is dropped, the worker drains the queue (one
//! more grace period) and exits; afterwards no reader can exist (guards
//! borrow the handle), so any late `call_srcu` (a stale value dropped after
//! its domain) runs its callback at once.

use crate::domain::{Inner, Srcu};
use crate::flavor::Flavor;
use crate::stats::Stats;
use crate::sync::{Arc, Condvar, JoinHandle, Mutex};

/// What the queue holds: a `call_srcu` closure, or a value to drop (a
/// [`crate::Stale`] going out of scope), both run by [`Deferred::run`].
pub(crate) type Callback = Box<dyn Deferred>;

/// Work that runs once, after a grace period.
pub(crate) trait Deferred: Send {
    fn run(self: Box<Self>);
}

impl<F: FnOnce() + Send> Deferred for F {
    fn run(self: Box<Self>) {
        (*self)()
    }
}

/// A value whose drop is deferred: queued as the very box it already
/// lives in, so that deferring a free costs no allocation of its own (a
/// closure capturing the box would be one more allocation, made by the
/// updater and freed by the worker).
#[repr(transparent)]
struct DropLater<T>(T);

impl<T: Send> Deferred for DropLater<T> {
    fn run(self: Box<Self>) {
        drop(self);
    }
}

/// The callback that drops `value`, in its own allocation.
pub(crate) fn drop_later<T: Send + 'static>(value: Box<T>) -> Callback {
    // SAFETY: `DropLater<T>` is `repr(transparent)` over `T`, so a
    // `Box<T>`'s allocation (same size and alignment) is a valid
    // `Box<DropLater<T>>`, and dropping it drops the `T`.
    unsafe { Box::from_raw(Box::into_raw(value).cast::<DropLater<T>>()) }
}

#[derive(Default)]
struct State {
    queue: Vec<Callback>,
    /// Callbacks ever queued / ever run; `barrier` waits for `done` to
    /// reach the `queued` it saw.
    queued: u64,
    done: u64,
    worker_started: bool,
    /// The fork generation the worker was started in (`fork.rs`): in a
    /// forked child the worker thread does not exist.
    worker_fork: u64,
    /// The worker's thread, so that `barrier` from a callback can refuse.
    #[cfg(not(loom))]
    worker_thread: Option<std::thread::ThreadId>,
    /// The worker sleeps without a timeout: producers must wake it.
    worker_idle: bool,
    /// The worker naps after a batch (`NAP`): producers need not wake it,
    /// which keeps the futex wake-up off `call_srcu` under a steady stream.
    worker_napping: bool,
    /// A `barrier` caller waits: do not nap.
    hurry: u32,
    shutdown: bool,
}

impl State {
    /// True if a worker thread of this process exists for the queue.
    fn worker_alive(&self) -> bool {
        self.worker_started && self.worker_fork == crate::fork::generation()
    }
}

/// How long the worker keeps collecting callbacks after a batch before it
/// goes to sleep for good (like the jiffies of delay Linux gives
/// non-expedited SRCU callbacks). Frees are delayed by at most this much; in
/// exchange `call_srcu` wakes the worker once per quiet spell, not once per
/// call. A wake-up is a futex call plus, when the worker's CPU is busy
/// running a vCPU, a reschedule IPI: in the demo VM this took `register_dev`
/// from 7.5 µs to 150 ns (median) with one device plugged every ~1.5 ms.
/// `barrier`, `start_poll` and dropping the domain cut the nap short.
#[cfg(not(loom))]
const NAP: std::time::Duration = std::time::Duration::from_millis(5);

pub(crate) struct Callbacks {
    state: Mutex<State>,
    /// The worker waits here for work.
    work: Condvar,
    /// `barrier` callers wait here for `done`.
    done: Condvar,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Callbacks {
    pub(crate) fn new() -> Self {
        Callbacks {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            worker: Mutex::new(None),
        }
    }

    /// `fork` support (`fork.rs`): takes the internal locks, in the
    /// crate's lock order, and hands the guards to `keep`.
    #[cfg(all(unix, not(loom)))]
    pub(crate) fn lock_for_fork<'a>(&'a self, keep: &mut impl FnMut(crate::fork::Held<'a>)) {
        keep(Box::new(self.state.lock()));
        keep(Box::new(self.worker.lock()));
    }

    /// True once the domain's handle has been dropped: no read section can
    /// exist any more.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.state.lock().shutdown
    }

    /// Stops the worker after it has run everything queued. Called by the
    /// handle's `Drop`. If there is no worker (never started, or this is a
    /// forked child), the queue is drained here: nothing queued is lost.
    pub(crate) fn shutdown(&self, inner: &Inner) {
        let mut st = self.state.lock();
        st.shutdown = true;
        let alive = st.worker_alive();
        if st.worker_started && !alive {
            forget_parent_worker(&mut st);
        }
        self.work.notify_all();
        drop(st);
        let handle = self.worker.lock().take();
        if !alive {
            if let Some(h) = handle {
                // A handle inherited across fork names a thread of the
                // parent: neither join nor detach it.
                core::mem::forget(h);
            }
            drain_here(inner);
            return;
        }
        if let Some(h) = handle {
            #[cfg(not(loom))]
            if h.thread().id() == std::thread::current().id() {
                // The last handle was dropped by a callback: the worker
                // drains the queue and exits by itself.
                return;
            }
            let _ = h.join();
        }
    }
}

/// Makes sure the worker runs: starts it, or wakes it if it sleeps.
pub(crate) fn kick(inner: &Arc<Inner>) {
    let mut st = inner.cbs.state.lock();
    if st.worker_napping {
        inner.cbs.work.notify_all();
    }
    wake_locked(inner, &mut st);
}

fn wake_locked(inner: &Arc<Inner>, st: &mut State) {
    if st.shutdown {
        return;
    }
    if st.worker_started && !st.worker_alive() {
        // Forked child: the worker stayed in the parent. Start another.
        forget_parent_worker(st);
        if let Some(h) = inner.cbs.worker.lock().take() {
            core::mem::forget(h);
        }
    }
    if !st.worker_started {
        let inner2 = inner.clone();
        match crate::sync::spawn(move || worker(inner2)) {
            Ok(handle) => {
                st.worker_started = true;
                st.worker_fork = crate::fork::generation();
                #[cfg(not(loom))]
                {
                    st.worker_thread = Some(handle.thread().id());
                }
                Stats::add(&inner.stats.worker_starts, 1);
                *inner.cbs.worker.lock() = Some(handle);
            }
            Err(e) => {
                // Callbacks stay queued: the next `call_srcu` tries again,
                // and `barrier` or the domain's drop run them inline.
                eprintln!("srcu: cannot start the callback worker ({e}); callbacks stay queued");
            }
        }
    } else if st.worker_idle || (st.worker_napping && st.hurry > 0) {
        inner.cbs.work.notify_all();
    }
}

/// In a forked child: the parent's worker does not exist here. A batch it
/// had taken at the moment of the fork lives on that worker's stack, in
/// the parent, which runs it; the child gives it up (it counts as done, or
/// `barrier` would wait for it forever) and keeps everything still queued.
fn forget_parent_worker(st: &mut State) {
    st.worker_started = false;
    st.worker_idle = false;
    st.worker_napping = false;
    st.done = st.queued - st.queue.len() as u64;
}

fn worker(inner: Arc<Inner>) {
    let cbs = &inner.cbs;
    let mut just_ran = false;
    loop {
        let mut st = cbs.state.lock();
        let batch = loop {
            if !st.queue.is_empty() {
                break core::mem::take(&mut st.queue);
            }
            if inner.gp.wanted().is_some() {
                break Vec::new();
            }
            if st.shutdown {
                return;
            }
            #[cfg(not(loom))]
            if just_ran && st.hurry == 0 {
                just_ran = false;
                st.worker_napping = true;
                cbs.work.wait_for(&mut st, NAP);
                st.worker_napping = false;
                continue;
            }
            let _ = just_ran;
            st.worker_idle = true;
            cbs.work.wait(&mut st);
            st.worker_idle = false;
        };
        drop(st);
        if batch.is_empty() {
            // A polled grace period: drive it, or wait for its driver.
            if let Some(target) = inner.gp.wanted() {
                let _ = survive(|| inner.wait_for_gp(target));
            }
            continue;
        }
        // The grace period starts after the batch was taken, so it waits
        // for every reader that could see what the callbacks free.
        if survive(|| inner.synchronize_inner()).is_err() {
            // The grace period was abandoned (its state is restored, see
            // grace_period.rs): put the batch back in front, in order, and
            // wait for a new grace period for it.
            let mut st = cbs.state.lock();
            let later = core::mem::replace(&mut st.queue, batch);
            st.queue.extend(later);
            continue;
        }
        run_batch(&inner, batch);
        just_ran = true;
    }
}

/// Runs `f`; a panic in it (a stall hook, a failing system call) is caught
/// and reported, so that the worker survives it.
fn survive(f: impl FnOnce()) -> Result<(), ()> {
    #[cfg(not(loom))]
    {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
            eprintln!("srcu: the callback worker's grace period panicked; retrying it");
        })
    }
    #[cfg(loom)]
    {
        f();
        Ok(())
    }
}

/// Runs a batch whose grace period has completed and records it as done.
fn run_batch(inner: &Inner, batch: Vec<Callback>) {
    let n = batch.len() as u64;
    for cb in batch {
        run(inner, cb);
    }
    Stats::add(&inner.stats.callbacks_run, n);
    let mut st = inner.cbs.state.lock();
    st.done += n;
    // `barrier` callers raise `hurry` under the lock before they sleep.
    if st.hurry > 0 {
        inner.cbs.done.notify_all();
    }
}

/// Without a worker: takes the queue, waits a grace period and runs it on
/// the calling thread, until the queue is empty.
fn drain_here(inner: &Inner) {
    loop {
        let batch = core::mem::take(&mut inner.cbs.state.lock().queue);
        if batch.is_empty() {
            return;
        }
        inner.synchronize_inner();
        run_batch(inner, batch);
    }
}

fn run(inner: &Inner, cb: Callback) {
    #[cfg(not(loom))]
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb.run())).is_err() {
        Stats::add(&inner.stats.callback_panics, 1);
        eprintln!("srcu: a call_srcu callback panicked; the remaining callbacks still run");
    }
    #[cfg(loom)]
    {
        let _ = inner;
        cb.run();
    }
}

impl<F: Flavor> Srcu<F> {
    /// Queues `f` to run after a grace period: after every read section that
    /// began before this call has ended. Never waits for the grace period.
    ///
    /// Callbacks run in order on the domain's worker thread; one grace
    /// period retires every callback queued before it began. A callback
    /// that panics is reported on stderr and the others still run. If the
    /// worker's grace period panics (a stall hook), the worker survives
    /// and retries it; in a `fork`ed child a new worker is started. Each
    /// callback runs exactly once, at the latest when the domain is
    /// dropped.
    ///
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
    /// let srcu = srcu::Srcu::new();
    /// let ran = Arc::new(AtomicBool::new(false));
    /// let r = ran.clone();
    /// srcu.call_srcu(move || r.store(true, Ordering::SeqCst));
    /// srcu.barrier();
    /// assert!(ran.load(Ordering::SeqCst));
    /// ```
    pub fn call_srcu(&self, f: impl FnOnce() + Send + 'static) {
        call_srcu_inner(&self.inner, Box::new(f));
    }

    /// Waits until every callback queued (by any thread) before this call
    /// has run.
    ///
    /// # Panics
    ///
    /// In every build: if the calling thread holds a read section of this
    /// domain (the callbacks wait for a grace period that waits for it),
    /// or if it is called from a `call_srcu` callback of this domain (the
    /// worker would wait for itself; the panic is caught like any callback
    /// panic and the worker goes on).
    pub fn barrier(&self) {
        crate::held::assert_not_reading(self.inner.held_slot(), "barrier");
        let cbs = &self.inner.cbs;
        let mut st = cbs.state.lock();
        #[cfg(not(loom))]
        if st.worker_alive() && st.worker_thread == Some(std::thread::current().id()) {
            drop(st);
            barrier_in_callback();
        }
        let target = st.queued;
        if st.done >= target {
            return;
        }
        if !st.worker_alive() {
            wake_locked(&self.inner, &mut st);
            if !st.worker_started {
                // No worker could be started: run the queue here.
                drop(st);
                drain_here(&self.inner);
                return;
            }
        }
        st.hurry += 1;
        if st.worker_napping {
            cbs.work.notify_all();
        }
        while st.done < target {
            cbs.done.wait(&mut st);
        }
        st.hurry -= 1;
    }

    /// Callbacks queued but not yet run.
    pub fn pending_callbacks(&self) -> u64 {
        let st = self.inner.cbs.state.lock();
        st.queued - st.done
    }
}

#[cold]
#[inline(never)]
#[cfg(not(loom))]
fn barrier_in_callback() -> ! {
    panic!(
        "srcu: barrier() called from a call_srcu callback of the same domain; \
         the callback worker would wait for itself forever"
    )
}

pub(crate) fn call_srcu_inner(inner: &Arc<Inner>, f: Callback) {
    let mut st = inner.cbs.state.lock();
    if st.shutdown {
        // The handle is gone, so no read section can exist.
        drop(st);
        run(inner, f);
        Stats::add(&inner.stats.callbacks_run, 1);
        return;
    }
    st.queue.push(f);
    st.queued += 1;
    wake_locked(inner, &mut st);
}
