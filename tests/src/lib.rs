//! Helpers for the workspace's integration tests (real-KVM tests in
//! `tests/vm*.rs`).

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vm {
    //! KVM gating, recording devices and vCPU thread helpers.

    use std::io::Write;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kvm_bus::kvm::{run_vcpu, MiniVm, StatsSnapshot, VcpuStats, VmExit};
    use kvm_bus::{Access, Buses, Declined, Flavor, IoDevice, MutIoDevice, WriteResult};
    use kvm_ioctls::VcpuFd;
    use parking_lot::Mutex;
    use vm_superio::serial::NoEvents;
    use vmm_sys_util::eventfd::EventFd;

    /// Proof that KVM is usable (returned by [`kvm_or_skip`]). It also
    /// holds a process-wide lock: VM tests of one test binary run one at a
    /// time, because each one keeps two or three host threads busy and the
    /// test machines have two cores (in parallel they only slow each other
    /// down).
    #[derive(Debug)]
    pub struct Kvm(#[allow(dead_code)] parking_lot::MutexGuard<'static, ()>);

    static VM_TESTS: Mutex<()> = Mutex::new(());

    /// `Some` if `/dev/kvm` is usable. If not: panics when `KVM_REQUIRED=1`
    /// (so CI on a KVM machine never skips silently), else prints a loud
    /// `SKIPPED` line and returns `None`.
    pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
        match MiniVm::probe() {
            Ok(()) => Some(Kvm(VM_TESTS.lock())),
            Err(e) => {
                if std::env::var("KVM_REQUIRED").as_deref() == Ok("1") {
                    panic!("KVM_REQUIRED=1 but KVM is unusable for test {test}: {e}");
                }
                // Straight to the stderr handle, not eprintln!: the test
                // harness captures the print macros of passing tests, and a
                // skip must be seen.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: /dev/kvm unusable, test {test} did not run: {e} \
                     (set KVM_REQUIRED=1 to make this a failure)"
                );
                None
            }
        }
    }

    /// One access a [`Recorder`] saw.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Logged {
        /// A read at `addr` of `len` bytes, answered with `data`.
        Read {
            /// Address.
            addr: u64,
            /// The bytes the device returned.
            data: Vec<u8>,
        },
        /// A write at `addr` of `data`.
        Write {
            /// Address.
            addr: u64,
            /// The bytes the guest wrote.
            data: Vec<u8>,
        },
    }

    /// The bytes a [`Recorder`] returns for its `seq`-th read (0-based) of
    /// `len` bytes: never 0xff, different for every read.
    pub fn pattern(seq: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| 1 + ((seq * 8 + i) % 200) as u8).collect()
    }

    /// A device that logs every access in order and answers reads with
    /// [`pattern`].
    #[derive(Debug, Default)]
    pub struct Recorder {
        log: Mutex<Vec<Logged>>,
        reads: AtomicUsize,
    }

    impl Recorder {
        /// A copy of the log.
        pub fn log(&self) -> Vec<Logged> {
            self.log.lock().clone()
        }
    }

    impl IoDevice for Recorder {
        fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            let seq = self.reads.fetch_add(1, Ordering::Relaxed);
            data.copy_from_slice(&pattern(seq, data.len()));
            self.log.lock().push(Logged::Read {
                addr: access.addr(),
                data: data.to_vec(),
            });
            Ok(())
        }
        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            self.log.lock().push(Logged::Write {
                addr: access.addr(),
                data: data.to_vec(),
            });
            Ok(None)
        }
    }

    /// A device that counts accesses, remembers the last written value
    /// (little-endian, up to 8 bytes), and counts its own drops.
    #[derive(Debug, Default)]
    pub struct Counter {
        /// Accesses accepted.
        pub hits: AtomicU64,
        /// Last value written.
        pub last: AtomicU64,
        drops: Option<Arc<AtomicUsize>>,
    }

    impl Counter {
        /// A counter that increments `drops` when dropped.
        pub fn with_drop_counter(drops: Arc<AtomicUsize>) -> Counter {
            Counter {
                hits: AtomicU64::new(0),
                last: AtomicU64::new(0),
                drops: Some(drops),
            }
        }

        /// Accesses accepted so far.
        pub fn hits(&self) -> u64 {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for Counter {
        fn drop(&mut self) {
            if let Some(d) = &self.drops {
                d.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl IoDevice for Counter {
        fn read(&self, _addr: Access, data: &mut [u8]) -> Result<(), Declined> {
            self.hits.fetch_add(1, Ordering::SeqCst);
            data.fill(0x5a);
            Ok(())
        }
        fn write(&self, _addr: Access, data: &[u8]) -> WriteResult {
            let mut v = [0u8; 8];
            v[..data.len()].copy_from_slice(data);
            self.last.store(u64::from_le_bytes(v), Ordering::SeqCst);
            self.hits.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
    }

    /// A device the guest writes to in order to wake a VMM thread that
    /// blocks in [`Doorbell::wait_for`] (a condition variable, no polling):
    /// a guest-to-VMM handshake that costs no CPU while waiting.
    #[derive(Debug, Default)]
    pub struct Doorbell {
        value: Mutex<u64>,
        rung: parking_lot::Condvar,
    }

    impl Doorbell {
        /// Blocks until the last value written is `value`; panics after
        /// `timeout` (a failing test, not a synchronisation).
        pub fn wait_for(&self, value: u64, timeout: std::time::Duration) {
            let deadline = std::time::Instant::now() + timeout;
            let mut v = self.value.lock();
            while *v != value {
                if self.rung.wait_until(&mut v, deadline).timed_out() {
                    panic!(
                        "doorbell: waited {timeout:?} for {value}, last value {}",
                        *v
                    );
                }
            }
        }

        /// The last value written (0 before any).
        pub fn value(&self) -> u64 {
            *self.value.lock()
        }
    }

    impl IoDevice for Doorbell {
        fn read(&self, _addr: Access, _data: &mut [u8]) -> Result<(), Declined> {
            Err(Declined)
        }
        fn write(&self, _addr: Access, data: &[u8]) -> WriteResult {
            let mut b = [0u8; 8];
            b[..data.len()].copy_from_slice(data);
            *self.value.lock() = u64::from_le_bytes(b);
            self.rung.notify_all();
            Ok(None)
        }
    }

    /// Runs `vcpu` until it halts; panics on any other exit or error.
    pub fn run_to_halt<F: Flavor>(vcpu: &mut VcpuFd, buses: &Buses<F>, stats: &VcpuStats) {
        match run_vcpu(vcpu, buses, stats) {
            Ok(VmExit::Hlt) => {}
            other => {
                let regs = vcpu.get_regs().ok();
                panic!("vCPU stopped with {other:?}, regs {regs:?}")
            }
        }
    }

    /// Runs one vCPU to `hlt` on the current thread and returns its stats.
    /// Handlers see `Access::vcpu == Some(0)`.
    pub fn run_single<F: Flavor>(vm: &mut MiniVm, buses: &Buses<F>) -> StatsSnapshot {
        let mut vcpu = vm.take_vcpus().remove(0);
        let stats = VcpuStats::for_vcpu(0);
        run_to_halt(&mut vcpu, buses, &stats);
        stats.snapshot()
    }

    /// Runs every vCPU on its own thread (scoped) until it halts, while
    /// `vmm` runs on the calling thread with the per-vCPU stats. Returns
    /// the final stats and `vmm`'s result. vCPU `i`'s stats are
    /// `VcpuStats::for_vcpu(i)`, so its handlers see `Access::vcpu ==
    /// Some(i)`.
    ///
    /// If `vmm` panics, the process aborts (after printing the panic): the
    /// vCPUs may spin in the guest forever waiting for a VMM that is gone.
    pub fn run_all<F: Flavor, R>(
        vcpus: Vec<VcpuFd>,
        buses: &Buses<F>,
        vmm: impl FnOnce(&[Arc<VcpuStats>]) -> R,
    ) -> (Vec<StatsSnapshot>, R) {
        let stats: Vec<Arc<VcpuStats>> = (0..vcpus.len())
            .map(|i| Arc::new(VcpuStats::for_vcpu(i as u32)))
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = vcpus
                .into_iter()
                .zip(&stats)
                .map(|(mut vcpu, st)| s.spawn(move || run_to_halt(&mut vcpu, buses, st)))
                .collect();
            let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vmm(&stats))) {
                Ok(r) => r,
                Err(payload) => {
                    // The vCPUs may spin in the guest forever waiting for a
                    // VMM that is gone: do not hang the test run. Print the
                    // panic to the real stderr (the harness's capture dies
                    // with the process).
                    let msg = payload
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| payload.downcast_ref::<&str>().copied())
                        .unwrap_or("(non-string panic)");
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "VMM side of a VM test panicked: {msg}\naborting (vCPU threads cannot be joined)"
                    );
                    std::process::abort();
                }
            };
            for h in handles {
                h.join().expect("vCPU thread panicked");
            }
            (stats.iter().map(|s| s.snapshot()).collect(), r)
        })
    }

    /// Spins (yielding) until `done()`; panics after 20 s (a failure, not a
    /// synchronisation: every wait here is for an event the guest or the
    /// devices signal).
    pub fn wait_for(what: &str, done: impl FnMut() -> bool) {
        wait_for_within(what, Duration::from_secs(20), done);
    }

    /// [`wait_for`] with another limit.
    pub fn wait_for_within(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        let mut spins = 0u32;
        while !done() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
                if spins.is_multiple_of(1024) && start.elapsed() > limit {
                    panic!("timed out ({limit:?}) waiting for {what}");
                }
            }
        }
    }

    /// Waits (sleeping 1 ms between looks) until `progress()` reaches
    /// `target`; panics if it stands still for `stall`: a watchdog for
    /// long guest runs, which may take long in all but must keep moving.
    pub fn wait_progress(
        what: &str,
        target: u64,
        stall: Duration,
        mut progress: impl FnMut() -> u64,
    ) {
        let (mut last, mut since) = (progress(), Instant::now());
        while last < target {
            std::thread::sleep(Duration::from_millis(1));
            let now = progress();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > stall {
                panic!("{what}: stuck at {last} of {target} for {stall:?}");
            }
        }
    }

    /// vm-superio's interrupt / reset line as an eventfd (the `Trigger` a
    /// VMM gives `Serial` and `I8042Device`).
    #[derive(Debug)]
    pub struct EventFdTrigger(pub EventFd);

    impl EventFdTrigger {
        /// A non-blocking eventfd.
        pub fn new() -> EventFdTrigger {
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        }

        /// A second handle on the same eventfd (for the VMM side).
        pub fn try_clone(&self) -> EventFdTrigger {
            EventFdTrigger(self.0.try_clone().expect("dup eventfd"))
        }

        /// The count signalled since the last call (0 if none).
        pub fn take(&self) -> u64 {
            self.0.read().unwrap_or(0)
        }
    }

    impl Default for EventFdTrigger {
        fn default() -> Self {
            EventFdTrigger::new()
        }
    }

    impl vm_superio::Trigger for EventFdTrigger {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.write(1)
        }
    }

    /// `vm_superio::Serial` (an 8250/16550A UART) as a [`MutIoDevice`]:
    /// register it as `Mutex::new(Uart::new(...))` over 8 ports. Each
    /// byte of an access goes to the register at its offset.
    pub struct Uart<W: Write + Send>(pub vm_superio::Serial<EventFdTrigger, NoEvents, W>);

    impl<W: Write + Send> Uart<W> {
        /// A UART whose transmitter writes to `out`.
        pub fn new(out: W) -> Uart<W> {
            Uart(vm_superio::Serial::new(EventFdTrigger::new(), out))
        }
    }

    impl<W: Write + Send> MutIoDevice for Uart<W> {
        fn read(&mut self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.read((access.offset + i as u64) as u8);
            }
            Ok(())
        }
        fn write(&mut self, access: Access, data: &[u8]) -> WriteResult {
            for (i, &b) in data.iter().enumerate() {
                // A byte the output refused is lost, as on a real line.
                let _ = self.0.write((access.offset + i as u64) as u8, b);
            }
            Ok(None)
        }
    }

    /// `vm_superio::I8042Device` as a [`MutIoDevice`], registered at its
    /// data port 0x60 and its command port 0x64 (two ranges of one
    /// device: [`Access::base`] tells them apart).
    pub struct I8042(pub vm_superio::I8042Device<EventFdTrigger>);

    /// The i8042's data port.
    pub const I8042_DATA: u64 = 0x60;
    /// The i8042's command port (a write of 0xfe resets the machine).
    pub const I8042_COMMAND: u64 = 0x64;

    impl MutIoDevice for I8042 {
        fn read(&mut self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            let offset = access.addr().wrapping_sub(I8042_DATA) as u8;
            data.fill(self.0.read(offset));
            Ok(())
        }
        fn write(&mut self, access: Access, data: &[u8]) -> WriteResult {
            let offset = access.addr().wrapping_sub(I8042_DATA) as u8;
            let _ = self.0.write(offset, data[0]);
            Ok(None)
        }
    }

    /// A `Write` into a shared buffer, to capture a UART's output.
    #[derive(Clone, Debug, Default)]
    pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// What was written so far.
        pub fn bytes(&self) -> Vec<u8> {
            self.0.lock().clone()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
