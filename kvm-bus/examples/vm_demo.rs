//! A real VM on real KVM, with devices on the SRCU buses that come and go
//! while the vCPUs run.
//!
//! ```text
//! cargo run --release -p kvm-bus --features test-vm --example vm_demo [-- --vcpus N --seconds S]
//! ```
//!
//! The guest code is built in Rust (`kvm_bus::kvm::Asm`) and embedded: no
//! image to download. Each vCPU prints a greeting through a serial-like PIO
//! device, then loops: it pokes a hot-plugged PIO device (which a VMM
//! thread registers and unregisters all the time, so some pokes hit and
//! some are unhandled), writes and reads back an MMIO mailbox, and checks a
//! stop flag in guest memory. The VMM sets the flag after a few seconds;
//! every vCPU says goodbye and halts, and the demo prints a table.
//!
//! Without a usable `/dev/kvm` it prints one line saying why and what to
//! do, and exits with status 1.

#[cfg(all(feature = "test-vm", target_os = "linux", target_arch = "x86_64"))]
fn main() -> std::process::ExitCode {
    demo::main()
}

#[cfg(not(all(feature = "test-vm", target_os = "linux", target_arch = "x86_64")))]
fn main() -> std::process::ExitCode {
    eprintln!("vm_demo: needs Linux on x86_64 and the `test-vm` feature of kvm-bus");
    std::process::ExitCode::from(1)
}

#[cfg(all(feature = "test-vm", target_os = "linux", target_arch = "x86_64"))]
mod demo {
    use std::io::Write as _;
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kvm_bus::kvm::{
        run_vcpu, timed, Asm, Cond, Latency, MiniVm, Reg, StatsSnapshot, VcpuStats, VmExit, Width,
        DATA_ADDR,
    };
    use kvm_bus::{Access, BusKind, Buses, Declined, IoDevice, IoRange, WriteResult};
    use parking_lot::Mutex;

    /// Serial-like device: one port per vCPU, a line buffer per port.
    const SERIAL: u64 = 0x3f8;
    /// The hot-plugged device's port.
    const HOT_PORT: u64 = 0x700;
    /// Free port for the KVM_IOEVENTFD timing (the guest never touches it).
    const IOEVENTFD_PORT: u16 = 0x7f0;
    const IOEVENTFD_ROUNDS: usize = 50;
    /// MMIO mailbox: 8 bytes per vCPU, outside RAM.
    const MAILBOX: u64 = 0xd000_0000;
    /// Guest-memory layout (offsets from DATA_ADDR).
    const STOP: i32 = 0;
    const TEXT: u64 = 0x1000; // greeting of vCPU i at TEXT + 0x100 * i: [len, bytes...]
    const BYE: u64 = 0x8000; // goodbye of vCPU i at BYE + 0x100 * i

    struct Serial {
        lines: Mutex<Vec<Vec<u8>>>,
    }

    impl IoDevice for Serial {
        fn read(&self, _addr: Access, data: &mut [u8]) -> Result<(), Declined> {
            data.fill(0); // "line status": never busy
            Ok(())
        }
        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            let mut lines = self.lines.lock();
            let Some(line) = lines.get_mut((access.addr() - SERIAL) as usize) else {
                return Err(Declined);
            };
            for &b in data {
                if b == b'\n' {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "  [serial {:#x}] {}",
                        access.addr(),
                        String::from_utf8_lossy(line)
                    );
                    line.clear();
                } else {
                    line.push(b);
                }
            }
            Ok(None)
        }
    }

    /// MMIO mailbox: a write stores the value; a read returns the last value
    /// plus one.
    struct Mailbox {
        slots: Vec<AtomicU64>,
    }

    impl IoDevice for Mailbox {
        fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            let slot = self
                .slots
                .get(((access.addr() - MAILBOX) / 8) as usize)
                .ok_or(Declined)?;
            let v = slot.load(Ordering::Relaxed).wrapping_add(1).to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
            Ok(())
        }
        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            let slot = self
                .slots
                .get(((access.addr() - MAILBOX) / 8) as usize)
                .ok_or(Declined)?;
            let mut v = [0u8; 8];
            v[..data.len()].copy_from_slice(data);
            slot.store(u64::from_le_bytes(v), Ordering::Relaxed);
            Ok(None)
        }
    }

    /// The hot-plugged device: counts what reaches it.
    #[derive(Default)]
    struct Hot {
        hits: AtomicU64,
    }

    impl IoDevice for Hot {
        fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
            data.fill(0);
            self.hits.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn write(&self, _: Access, _: &[u8]) -> WriteResult {
            self.hits.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
    }

    /// Prints `text_base + 0x100 * rbx` ([len, bytes]) with `rep outsb` to
    /// port SERIAL + rbx.
    fn emit_print(a: &mut Asm, text_base: u64) {
        a.mov_reg(Reg::Rsi, Reg::Rbx);
        a.shl_imm(Reg::Rsi, 8);
        a.add_imm(Reg::Rsi, (DATA_ADDR + text_base) as i32);
        a.mov_imm(Reg::Rcx, 0);
        a.load(Width::B1, Reg::Rcx, Reg::Rsi, 0);
        a.inc(Reg::Rsi);
        a.mov_imm(Reg::Rdx, SERIAL);
        a.add_reg(Reg::Rdx, Reg::Rbx);
        a.rep_outs(Width::B1);
    }

    fn guest_code() -> Vec<u8> {
        let mut a = Asm::new();
        a.mov_imm(Reg::Rbp, DATA_ADDR);
        emit_print(&mut a, TEXT);
        // rdi = MAILBOX + 8 * vCPU index; rax = iteration counter.
        a.mov_reg(Reg::Rdi, Reg::Rbx);
        a.shl_imm(Reg::Rdi, 3);
        a.mov_imm(Reg::Rax, MAILBOX);
        a.add_reg(Reg::Rdi, Reg::Rax);
        a.mov_imm(Reg::Rax, 0);
        a.mov_imm(Reg::Rcx, 0);
        let top = a.label();
        a.bind(top);
        a.mov_imm(Reg::Rdx, HOT_PORT);
        a.out_dx(Width::B4); // poke the hot-plugged device
        a.store(Width::B8, Reg::Rdi, 0, Reg::Rax); // mailbox = rax
        a.load(Width::B8, Reg::Rax, Reg::Rdi, 0); // rax = mailbox + 1
        a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
        a.jcc(Cond::Eq, top);
        // Leave the iteration count in the mailbox, say goodbye, halt.
        a.store(Width::B8, Reg::Rdi, 0, Reg::Rax);
        emit_print(&mut a, BYE);
        a.hlt();
        a.finish()
    }

    fn text(s: &str) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    struct Args {
        vcpus: usize,
        seconds: f64,
    }

    fn parse_args() -> Result<Args, String> {
        let mut args = Args {
            vcpus: 2,
            seconds: 2.0,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
            match a.as_str() {
                "--vcpus" => {
                    args.vcpus = value("--vcpus")?
                        .parse()
                        .ok()
                        .filter(|n| (1..=kvm_bus::kvm::MAX_VCPUS).contains(n))
                        .ok_or(format!("--vcpus takes 1..={}", kvm_bus::kvm::MAX_VCPUS))?;
                }
                "--seconds" => {
                    args.seconds = value("--seconds")?
                        .parse()
                        .ok()
                        .filter(|s: &f64| (0.1..=60.0).contains(s))
                        .ok_or("--seconds takes 0.1..=60")?;
                }
                "-h" | "--help" => {
                    println!("usage: vm_demo [--vcpus N (default 2)] [--seconds S (default 2)]");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        Ok(args)
    }

    pub fn main() -> ExitCode {
        let args = match parse_args() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("vm_demo: {e}");
                return ExitCode::from(2);
            }
        };
        match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vm_demo: {e}");
                ExitCode::from(1)
            }
        }
    }

    fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
        let n = args.vcpus;
        let mut builder = MiniVm::builder().vcpus(n).code(&guest_code());
        for i in 0..n {
            let base = DATA_ADDR + 0x100 * i as u64;
            builder = builder
                .load(base + TEXT, &text(&format!("hello from vCPU {i}\n")))
                .load(base + BYE, &text(&format!("vCPU {i} halting, bye\n")));
        }
        let mut vm = builder.build()?;
        let mem = vm.memory().clone();
        println!(
            "vm_demo: {n} vCPUs in 64-bit mode, {} KiB RAM, guest code embedded",
            mem.size() >> 10
        );

        let buses = Buses::new();
        {
            let mut slots = buses.lock_slots();
            let serial = Serial {
                lines: Mutex::new(vec![Vec::new(); n]),
            };
            buses.register_dev(
                &mut slots,
                BusKind::Pio,
                IoRange::new(SERIAL, n as u64)?,
                Arc::new(serial),
            )?;
            let mailbox = Mailbox {
                slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            };
            buses.register_dev(
                &mut slots,
                BusKind::Mmio,
                IoRange::new(MAILBOX, 8 * n as u64)?,
                Arc::new(mailbox),
            )?;
        }

        let stats: Vec<Arc<VcpuStats>> = (0..n).map(|_| Arc::default()).collect();
        let failed = AtomicBool::new(false);
        let start = Instant::now();
        let report =
            std::thread::scope(|s| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let mut vcpu_threads = Vec::new();
                for (i, mut vcpu) in vm.take_vcpus().into_iter().enumerate() {
                    let (buses, stats, failed) = (&buses, stats[i].clone(), &failed);
                    vcpu_threads.push(s.spawn(move || {
                        let r = run_vcpu(&mut vcpu, buses, &stats);
                        let wall = start.elapsed();
                        if !matches!(r, Ok(VmExit::Hlt)) {
                            failed.store(true, Ordering::Relaxed);
                        }
                        (r, wall)
                    }));
                }

                // The VMM thread: hot plug while the vCPUs run.
                let deadline = start + Duration::from_secs_f64(args.seconds);
                let (mut reg, mut unreg) = (Vec::new(), Vec::new());
                let mut hot_hits = 0;
                while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                    let hot = Arc::new(Hot::default());
                    let dev: Arc<dyn IoDevice> = hot.clone();
                    let (r, t) = timed(|| {
                        let mut slots = buses.lock_slots();
                        buses.register_dev(
                            &mut slots,
                            BusKind::Pio,
                            IoRange::new(HOT_PORT, 4).unwrap(),
                            dev.clone(),
                        )
                    });
                    r?;
                    reg.push(t);
                    std::thread::sleep(Duration::from_micros(500));
                    let (r, t) = timed(|| {
                        let mut slots = buses.lock_slots();
                        buses.unregister_dev(&mut slots, BusKind::Pio, &dev)
                    });
                    r?;
                    unreg.push(t);
                    hot_hits += hot.hits.load(Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(500));
                }
                // The kernel's own I/O-bus registration, same VM, vCPUs still
                // running. Few rounds: each deassign waits for a kernel SRCU grace
                // period (milliseconds).
                let ioeventfd = vm.ioeventfd_latency(IOEVENTFD_PORT, IOEVENTFD_ROUNDS)?;
                mem.write_u32(DATA_ADDR + STOP as u64, 1);

                let mut results = Vec::new();
                for (i, h) in vcpu_threads.into_iter().enumerate() {
                    let (r, wall) = h.join().map_err(|_| format!("vCPU {i} thread panicked"))?;
                    match r {
                        Ok(VmExit::Hlt) => {}
                        Ok(other) => return Err(format!("vCPU {i} stopped with {other:?}").into()),
                        Err(e) => return Err(format!("vCPU {i}: KVM_RUN failed: {e}").into()),
                    }
                    results.push((stats[i].snapshot(), wall));
                }
                Ok((results, reg, unreg, hot_hits, ioeventfd))
            });
        let (results, mut reg, mut unreg, hot_hits, ioeventfd) =
            report.map_err(|e| e.to_string())?;

        let iterations: Vec<u64> = (0..n)
            .map(|i| {
                // The guest left its loop count + 1 in its mailbox slot; read
                // it back through the bus like a vCPU would.
                let mut b = [0u8; 8];
                let _ = buses.read(BusKind::Mmio, MAILBOX + 8 * i as u64, &mut b);
                u64::from_le_bytes(b).saturating_sub(1)
            })
            .collect();
        print_table(&results, &iterations);
        let (reg, unreg) = (
            Latency::from_samples(&mut reg),
            Latency::from_samples(&mut unreg),
        );
        println!();
        println!(
            "hot plug: {} register/unregister rounds while the vCPUs ran; {} guest pokes reached the device",
            reg.samples, hot_hits
        );
        println!(
            "  {:<34} {:>10} {:>10} {:>10}",
            "latency", "median", "p99", "max"
        );
        let row = |name: &str, l: &Latency| {
            println!(
                "  {:<34} {:>10} {:>10} {:>10}",
                name,
                fmt_dur(l.median),
                fmt_dur(l.p99),
                fmt_dur(l.max)
            );
        };
        row("kvm-bus register_dev", &reg);
        row("kvm-bus unregister_dev", &unreg);
        row("KVM_IOEVENTFD assign (kernel)", &ioeventfd.register);
        row("KVM_IOEVENTFD deassign (kernel)", &ioeventfd.unregister);
        Ok(())
    }

    fn print_table(results: &[(StatsSnapshot, Duration)], iterations: &[u64]) {
        println!();
        println!(
            "{:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12}",
            "vCPU",
            "loops",
            "exits",
            "pio",
            "mmio",
            "handled",
            "unhandled",
            "dispatch/exit",
            "wall/exit"
        );
        let mut total = StatsSnapshot::default();
        for (i, ((s, wall), loops)) in results.iter().zip(iterations).enumerate() {
            let per_exit = wall.as_nanos() as u64 / s.exits.max(1);
            println!(
                "{:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}ns {:>10}ns",
                i,
                loops,
                s.exits,
                s.io_exits,
                s.mmio_exits,
                s.handled,
                s.unhandled(),
                s.mean_dispatch_ns(),
                per_exit
            );
            total.exits += s.exits;
            total.io_exits += s.io_exits;
            total.mmio_exits += s.mmio_exits;
            total.handled += s.handled;
            total.unhandled_reads += s.unhandled_reads;
            total.unhandled_writes += s.unhandled_writes;
            total.dispatch_ns += s.dispatch_ns;
        }
        println!(
            "{:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}ns",
            "all",
            iterations.iter().sum::<u64>(),
            total.exits,
            total.io_exits,
            total.mmio_exits,
            total.handled,
            total.unhandled(),
            total.mean_dispatch_ns()
        );
        println!(
            "  dispatch/exit: time from read_lock to read unlock (lookup + device), per PIO/MMIO exit;\n  \
             wall/exit: the vCPU thread's run time / its exits (a full guest -> VMM -> guest round trip)"
        );
    }

    fn fmt_dur(d: Duration) -> String {
        let ns = d.as_nanos();
        if ns < 10_000 {
            format!("{ns}ns")
        } else if ns < 10_000_000 {
            format!("{:.1}us", ns as f64 / 1e3)
        } else {
            format!("{:.1}ms", ns as f64 / 1e6)
        }
    }
}
