//! A real VM on real KVM, with devices on the SRCU buses that come and go
//! while the vCPUs run, some of them moved and ejected by the guest itself.
//!
//! ```text
//! cargo run --release -p kvm-bus --example vm_demo [-- --vcpus N --seconds S]
//! ```
//!
//! The guest code is built in Rust (`kvm_bus::kvm::Asm`) and embedded: no
//! image to download. The devices:
//!
//! * COM1 at 0x3f8: rust-vmm's `vm_superio::Serial`, an 8250/16550A UART,
//!   whose output goes to stdout (`[ttyS0]` lines). The guest drives it as
//!   a driver does: it polls the line status register (0x3fd) until the
//!   transmitter holding register is empty (bit 5), then writes the byte,
//!   under a spinlock in guest memory so the vCPUs' lines do not mix.
//! * An i8042 at 0x60/0x64: `vm_superio::I8042Device`. The guest ends the
//!   demo: vCPU 0 measures time with `rdtsc` and, after `--seconds`,
//!   writes the reset command 0xfe to port 0x64. The i8042 signals its
//!   reset eventfd; the VMM sees it and stops the vCPUs (a stop flag in
//!   guest memory: every vCPU says goodbye and halts).
//! * Per vCPU, a PCI-like function: a BAR register (port 0xc000 + 4 i);
//!   every 16th loop the guest writes it to move the function's 4 KiB MMIO
//!   window between two addresses. The handler calls `Buses::move_range`
//!   from inside the read section of that very write; the guest then reads
//!   the new window (must be the function: its move count) and the old one
//!   (must be unhandled: all-ones).
//! * A NIC at MMIO 0xd100_0000 that the last vCPU ejects (every 16th
//!   loop, when the VMM has plugged a fresh one) by writing its
//!   eject register: the handler calls `Buses::start_unregister` and hands
//!   the `Removal` to a VMM thread, which waits for it, checks that the
//!   buses let go of the NIC, and plugs a fresh one (telling the guest
//!   through guest memory).
//! * A hot-plugged PIO device that the main VMM thread registers and
//!   unregisters all the time (some pokes hit, some are unhandled), and an
//!   MMIO mailbox per vCPU that counts the guest's loops.
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
    use std::io::Write;
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::mpsc::{self, RecvTimeoutError, Sender};
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant};

    use kvm_bus::kvm::{
        run_vcpu, timed, Asm, Cond, Label, Latency, MiniVm, Reg, StatsSnapshot, VcpuStats, VmExit,
        Width, DATA_ADDR,
    };
    use kvm_bus::{
        Access, BusKind, Buses, Declined, IoDevice, IoRange, MutIoDevice, Removal, WriteResult,
    };
    use parking_lot::Mutex;
    use vm_superio::serial::NoEvents;
    use vm_superio::{I8042Device, Serial, Trigger};
    use vmm_sys_util::eventfd::EventFd;

    /// COM1: an 8250 UART over 8 ports.
    const COM1: u64 = 0x3f8;
    /// The i8042's data and command ports.
    const I8042_DATA: u64 = 0x60;
    const I8042_COMMAND: u64 = 0x64;
    /// The hot-plugged device's port.
    const HOT_PORT: u64 = 0x700;
    /// Free port for the KVM_IOEVENTFD timing (the guest never touches it).
    const IOEVENTFD_PORT: u16 = 0x7f0;
    const IOEVENTFD_ROUNDS: usize = 50;
    /// MMIO mailbox: 8 bytes per vCPU, outside RAM.
    const MAILBOX: u64 = 0xd000_0000;
    /// vCPU i's PCI-like function: BAR register at CFG_PORT + 4 i, window
    /// at WINDOW + i MiB or 32 KiB above that.
    const CFG_PORT: u64 = 0xc000;
    const WINDOW: u64 = 0xe000_0000;
    const WINDOW_LEN: u64 = 0x1000;
    const WINDOW_ALT: i32 = 0x8000;
    /// The guest moves its BAR (and the ejector ejects the NIC) every this
    /// many loops (a power of two).
    const RECONFIGURE_EVERY: i32 = 16;
    /// The ejectable NIC: reads return its generation; a write of it at
    /// NIC_EJECT ejects it.
    const NIC: u64 = 0xd100_0000;
    const NIC_LEN: u64 = 0x100;
    const NIC_EJECT: u64 = 0x10;
    /// Guest-memory layout (offsets from DATA_ADDR).
    const STOP: i32 = 0;
    const CONSOLE_LOCK: i32 = 0x40;
    const PLUGGED: i32 = 0x80; // generation of the NIC on the bus
    const DEADLINE: i32 = 0xc0; // TSC ticks vCPU 0 runs before it resets
    const ERRORS: i32 = 0x100; // failed guest checks
    const TEXT: u64 = 0x1000; // greeting of vCPU i at TEXT + 0x100 * i: [len, bytes...]
    const BYE: u64 = 0x8000; // goodbye of vCPU i at BYE + 0x100 * i
    const RESET_TEXT: u64 = 0xc000;
    /// The guest's locals on its stack, relative to rsp.
    const L_WINDOW: i32 = 0; // where the window is
    const L_OTHER: i32 = 8; // where it goes next
    const L_CFG: i32 = 16; // the BAR register's port
    const L_MOVES: i32 = 24;
    const L_EJECTED: i32 = 32; // the last NIC generation this vCPU ejected
    const L_TSC0: i32 = 40;
    const L_RESET: i32 = 48; // vCPU 0 has asked for the reset
    const LOCALS: i32 = 64;

    /// An eventfd as vm-superio's interrupt / reset line.
    struct EventFdTrigger(EventFd);

    impl Trigger for EventFdTrigger {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.write(1)
        }
    }

    /// The UART's output: whole lines to stdout, prefixed.
    #[derive(Default)]
    struct Console(Vec<u8>);

    impl Write for Console {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            for &b in buf {
                match b {
                    b'\n' => {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "  [ttyS0] {}", String::from_utf8_lossy(&self.0))?;
                        self.0.clear();
                    }
                    b'\r' => {}
                    b => self.0.push(b),
                }
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `vm_superio::Serial` on the bus (`&mut self`: registered in a
    /// `Mutex`). Each byte of an access goes to the register at its offset.
    struct Uart(Serial<EventFdTrigger, NoEvents, Console>);

    impl MutIoDevice for Uart {
        fn read(&mut self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.read((access.offset + i as u64) as u8);
            }
            Ok(())
        }
        fn write(&mut self, access: Access, data: &[u8]) -> WriteResult {
            for (i, &b) in data.iter().enumerate() {
                let _ = self.0.write((access.offset + i as u64) as u8, b);
            }
            Ok(None)
        }
    }

    /// `vm_superio::I8042Device` on the bus, at 0x60 and 0x64 (one device,
    /// two ranges).
    struct I8042(I8042Device<EventFdTrigger>);

    impl MutIoDevice for I8042 {
        fn read(&mut self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            data.fill(self.0.read((access.addr() - I8042_DATA) as u8));
            Ok(())
        }
        fn write(&mut self, access: Access, data: &[u8]) -> WriteResult {
            let _ = self.0.write((access.addr() - I8042_DATA) as u8, data[0]);
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
                .get((access.offset / 8) as usize)
                .ok_or(Declined)?;
            let v = slot.load(Ordering::Relaxed).wrapping_add(1).to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
            Ok(())
        }
        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            let slot = self
                .slots
                .get((access.offset / 8) as usize)
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

    struct FnState {
        window: IoRange,
        moves: u32,
        move_times: Vec<Duration>,
        /// Window reads that arrived at a range the function had left.
        stale: u64,
    }

    /// A PCI-like function: a write of its BAR register (PIO) moves its
    /// MMIO window from the handler; a read of the window returns the
    /// number of moves so far.
    struct PciFn {
        cfg_port: u64,
        buses: Weak<Buses>,
        me: Weak<dyn IoDevice>,
        state: Mutex<FnState>,
    }

    impl IoDevice for PciFn {
        fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
            let mut st = self.state.lock();
            let v = if access.base == self.cfg_port {
                st.window.addr()
            } else if access.base == st.window.addr() {
                u64::from(st.moves)
            } else {
                st.stale += 1;
                0
            };
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
            Ok(())
        }

        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            let (&[a, b, c, d], true) = (data, access.base == self.cfg_port) else {
                return Err(Declined);
            };
            let to = IoRange::new(u64::from(u32::from_le_bytes([a, b, c, d])), WINDOW_LEN)
                .map_err(|_| Declined)?;
            let (Some(buses), Some(me)) = (self.buses.upgrade(), self.me.upgrade()) else {
                return Err(Declined);
            };
            let mut st = self.state.lock();
            let (moved, t) = timed(|| {
                let mut slots = buses.lock_slots();
                buses.move_range(&mut slots, BusKind::Mmio, &me, st.window, to)
            });
            if moved.is_ok() {
                st.window = to;
                st.moves += 1;
                st.move_times.push(t);
            }
            Ok(None)
        }
    }

    /// What the NIC's eject handler hands the device-manager thread.
    struct Eject {
        generation: u32,
        removal: Removal,
        unpublish: Duration,
    }

    /// The ejectable NIC of one generation.
    struct Nic {
        generation: u32,
        buses: Weak<Buses>,
        me: Weak<dyn IoDevice>,
        manager: Sender<Eject>,
        ejects_by_vcpu: Arc<Vec<AtomicU64>>,
    }

    impl IoDevice for Nic {
        fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
            let v = u64::from(self.generation).to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
            Ok(())
        }

        fn write(&self, access: Access, data: &[u8]) -> WriteResult {
            let mut v = [0u8; 8];
            v[..data.len()].copy_from_slice(data);
            if access.offset != NIC_EJECT || u64::from_le_bytes(v) != u64::from(self.generation) {
                return Ok(None);
            }
            let (Some(buses), Some(me)) = (self.buses.upgrade(), self.me.upgrade()) else {
                return Err(Declined);
            };
            // Inside the read section of this write: start the removal (no
            // grace period), let a VMM thread complete it.
            let (removal, unpublish) = timed(|| {
                let mut slots = buses.lock_slots();
                buses.start_unregister(&mut slots, BusKind::Mmio, &me)
            });
            let Ok(removal) = removal else {
                return Err(Declined);
            };
            if let Some(c) = access
                .vcpu
                .and_then(|i| self.ejects_by_vcpu.get(i as usize))
            {
                c.fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.manager.send(Eject {
                generation: self.generation,
                removal,
                unpublish,
            });
            Ok(None)
        }
    }

    fn new_nic(
        generation: u32,
        buses: &Arc<Buses>,
        manager: &Sender<Eject>,
        ejects_by_vcpu: &Arc<Vec<AtomicU64>>,
    ) -> Arc<Nic> {
        Arc::new_cyclic(|me: &Weak<Nic>| Nic {
            generation,
            buses: Arc::downgrade(buses),
            me: me.clone(),
            manager: manager.clone(),
            ejects_by_vcpu: ejects_by_vcpu.clone(),
        })
    }

    // -- The guest program --------------------------------------------------

    /// Prints `[len, bytes]` at `text` (plus 0x100 * vCPU index if
    /// `per_vcpu`) on COM1 as a driver does, holding the console spinlock.
    /// Clobbers rax, rcx, rdx, rsi.
    fn emit_print(a: &mut Asm, text: u64, per_vcpu: bool) {
        let (spin, locked) = (a.label(), a.label());
        a.bind(spin);
        a.mov_imm(Reg::Rax, 1);
        a.xchg_mem(Reg::Rbp, CONSOLE_LOCK, Reg::Rax);
        a.cmp_imm(Reg::Rax, 0);
        a.jcc(Cond::Eq, locked);
        a.pause();
        a.jmp(spin);
        a.bind(locked);
        if per_vcpu {
            a.mov_reg(Reg::Rsi, Reg::Rbx);
            a.shl_imm(Reg::Rsi, 8);
            a.add_imm(Reg::Rsi, (DATA_ADDR + text) as i32);
        } else {
            a.mov_imm(Reg::Rsi, DATA_ADDR + text);
        }
        a.mov_imm(Reg::Rcx, 0);
        a.load(Width::B1, Reg::Rcx, Reg::Rsi, 0);
        a.inc(Reg::Rsi);
        a.uart_write(COM1); // polls the line status, writes the THR
        a.mov_imm(Reg::Rax, 0);
        a.store(Width::B8, Reg::Rbp, CONSOLE_LOCK, Reg::Rax);
    }

    /// `rax = rdtsc` (64 bits). Clobbers rdx.
    fn emit_rdtsc(a: &mut Asm) {
        a.rdtsc();
        a.shl_imm(Reg::Rdx, 32);
        a.or_reg(Reg::Rax, Reg::Rdx);
    }

    /// A failed check: count it in guest memory and go on at `back`.
    fn emit_error(a: &mut Asm, at: Label, back: Label) {
        a.bind(at);
        a.lock_inc32(Reg::Rbp, ERRORS);
        a.jmp(back);
    }

    fn guest_code(ejector: u64) -> Vec<u8> {
        let mut a = Asm::new();
        a.mov_imm(Reg::Rbp, DATA_ADDR);
        a.add_imm(Reg::Rsp, -LOCALS);
        // Locals: the function's window and its other address, its BAR
        // register, no moves, no eject, the start time, no reset.
        a.mov_reg(Reg::Rax, Reg::Rbx);
        a.shl_imm(Reg::Rax, 20);
        a.mov_imm(Reg::Rcx, WINDOW);
        a.add_reg(Reg::Rax, Reg::Rcx);
        a.store(Width::B8, Reg::Rsp, L_WINDOW, Reg::Rax);
        a.add_imm(Reg::Rax, WINDOW_ALT);
        a.store(Width::B8, Reg::Rsp, L_OTHER, Reg::Rax);
        a.mov_reg(Reg::Rax, Reg::Rbx);
        a.shl_imm(Reg::Rax, 2);
        a.add_imm(Reg::Rax, CFG_PORT as i32);
        a.store(Width::B8, Reg::Rsp, L_CFG, Reg::Rax);
        a.mov_imm(Reg::Rax, 0);
        a.store(Width::B8, Reg::Rsp, L_MOVES, Reg::Rax);
        a.store(Width::B8, Reg::Rsp, L_EJECTED, Reg::Rax);
        a.store(Width::B8, Reg::Rsp, L_RESET, Reg::Rax);
        emit_rdtsc(&mut a);
        a.store(Width::B8, Reg::Rsp, L_TSC0, Reg::Rax);
        emit_print(&mut a, TEXT, true);
        // rdi = MAILBOX + 8 * vCPU index.
        a.mov_reg(Reg::Rdi, Reg::Rbx);
        a.shl_imm(Reg::Rdi, 3);
        a.mov_imm(Reg::Rax, MAILBOX);
        a.add_reg(Reg::Rdi, Reg::Rax);

        let top = a.label();
        let (new_ok, old_ok, nic_ok, gone_ok) = (a.label(), a.label(), a.label(), a.label());
        let (bad_new, bad_old, bad_nic, bad_gone) = (a.label(), a.label(), a.label(), a.label());
        let (no_eject, no_reset, kbc_busy) = (a.label(), a.label(), a.label());
        a.bind(top);
        // Poke the hot-plugged device; count the loop in the mailbox.
        a.mov_imm(Reg::Rdx, HOT_PORT);
        a.out_dx(Width::B4);
        a.load(Width::B8, Reg::Rax, Reg::Rdi, 0); // mailbox + 1
        a.store(Width::B8, Reg::Rdi, 0, Reg::Rax);
        // Every RECONFIGURE_EVERY loops: move the BAR (swap the two
        // addresses, write the new one to the BAR register, read the new
        // window, the function's move count, and the old one, unhandled:
        // all-ones), and eject the NIC (the ejector).
        a.mov_reg(Reg::Rcx, Reg::Rax);
        a.and_imm(Reg::Rcx, RECONFIGURE_EVERY - 1);
        a.cmp_imm(Reg::Rcx, 0);
        a.jcc(Cond::Ne, no_eject);
        a.load(Width::B8, Reg::Rax, Reg::Rsp, L_OTHER);
        a.load(Width::B8, Reg::Rcx, Reg::Rsp, L_WINDOW);
        a.store(Width::B8, Reg::Rsp, L_WINDOW, Reg::Rax);
        a.store(Width::B8, Reg::Rsp, L_OTHER, Reg::Rcx);
        a.load(Width::B8, Reg::Rdx, Reg::Rsp, L_CFG);
        a.out_dx(Width::B4);
        a.load(Width::B8, Reg::Rsi, Reg::Rsp, L_MOVES);
        a.inc(Reg::Rsi);
        a.store(Width::B8, Reg::Rsp, L_MOVES, Reg::Rsi);
        a.load(Width::B4, Reg::Rdx, Reg::Rax, 0);
        a.cmp_reg(Reg::Rdx, Reg::Rsi);
        a.jcc(Cond::Ne, bad_new);
        a.bind(new_ok);
        a.load(Width::B8, Reg::Rdx, Reg::Rcx, 0);
        a.cmp_imm(Reg::Rdx, -1);
        a.jcc(Cond::Ne, bad_old);
        a.bind(old_ok);
        // The ejector: once the VMM has plugged a NIC newer than the one
        // it last ejected, check it answers with its generation, eject
        // it, and check it is gone (unhandled, or already a newer one).
        a.cmp_imm(Reg::Rbx, ejector as i32);
        a.jcc(Cond::Ne, no_eject);
        a.load(Width::B4, Reg::Rax, Reg::Rbp, PLUGGED);
        a.cmp_mem32(Reg::Rsp, L_EJECTED, Reg::Rax);
        a.jcc(Cond::Eq, no_eject);
        a.mov_imm(Reg::Rsi, NIC);
        a.load(Width::B4, Reg::Rdx, Reg::Rsi, 0);
        a.cmp_reg(Reg::Rdx, Reg::Rax);
        a.jcc(Cond::Ne, bad_nic);
        a.bind(nic_ok);
        a.store(Width::B4, Reg::Rsi, NIC_EJECT as i32, Reg::Rax); // eject
        a.store(Width::B8, Reg::Rsp, L_EJECTED, Reg::Rax);
        a.load(Width::B8, Reg::Rdx, Reg::Rsi, 0);
        a.cmp_imm(Reg::Rdx, -1);
        a.jcc(Cond::Eq, gone_ok);
        a.cmp_reg(Reg::Rax, Reg::Rdx);
        a.jcc(Cond::AboveEq, bad_gone);
        a.bind(gone_ok);
        a.bind(no_eject);
        // vCPU 0: time is up? Then reset the machine through the i8042
        // (once): wait for its input buffer to be empty, write 0xfe to the
        // command port.
        a.cmp_imm(Reg::Rbx, 0);
        a.jcc(Cond::Ne, no_reset);
        a.mov_imm(Reg::Rax, 0);
        a.cmp_mem32(Reg::Rsp, L_RESET, Reg::Rax);
        a.jcc(Cond::Ne, no_reset);
        emit_rdtsc(&mut a);
        a.load(Width::B8, Reg::Rcx, Reg::Rsp, L_TSC0);
        a.sub_reg(Reg::Rax, Reg::Rcx);
        a.load(Width::B8, Reg::Rcx, Reg::Rbp, DEADLINE);
        a.cmp_reg(Reg::Rax, Reg::Rcx);
        a.jcc(Cond::Below, no_reset);
        emit_print(&mut a, RESET_TEXT, false);
        a.mov_imm(Reg::Rdx, I8042_COMMAND);
        a.bind(kbc_busy);
        a.in_dx(Width::B1);
        a.and_imm(Reg::Rax, 2);
        a.cmp_imm(Reg::Rax, 0);
        a.jcc(Cond::Ne, kbc_busy);
        a.mov_imm(Reg::Rax, 0xfe);
        a.out_dx(Width::B1);
        a.mov_imm(Reg::Rax, 1);
        a.store(Width::B8, Reg::Rsp, L_RESET, Reg::Rax);
        a.bind(no_reset);
        // Until the VMM stops us.
        a.mov_imm(Reg::Rcx, 0);
        a.cmp_mem32(Reg::Rbp, STOP, Reg::Rcx);
        a.jcc(Cond::Eq, top);
        emit_print(&mut a, BYE, true);
        a.hlt();
        emit_error(&mut a, bad_new, new_ok);
        emit_error(&mut a, bad_old, old_ok);
        emit_error(&mut a, bad_nic, nic_ok);
        emit_error(&mut a, bad_gone, gone_ok);
        a.finish()
    }

    fn text(s: &str) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    // -- The VMM ------------------------------------------------------------

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

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    /// What the device-manager thread did with the guest's ejects.
    #[derive(Default)]
    struct Ejects {
        unpublish: Vec<Duration>,
        complete: Vec<Duration>,
    }

    /// The device-manager thread: completes each eject the guest starts
    /// (`Removal::wait`), checks that the buses let go of the NIC, and
    /// plugs the next generation, until `stop` and no eject is pending.
    fn device_manager(
        buses: &Arc<Buses>,
        mem: &kvm_bus::kvm::GuestMemory,
        ejects: mpsc::Receiver<Eject>,
        tx: &Sender<Eject>,
        ejects_by_vcpu: &Arc<Vec<AtomicU64>>,
        stop: &AtomicBool,
    ) -> Result<Ejects, BoxError> {
        let mut done = Ejects::default();
        let mut generation = 1;
        let mut nic = new_nic(generation, buses, tx, ejects_by_vcpu);
        buses.register_dev(
            &mut buses.lock_slots(),
            BusKind::Mmio,
            IoRange::new(NIC, NIC_LEN)?,
            nic.clone(),
        )?;
        mem.write_u32(DATA_ADDR + PLUGGED as u64, generation);
        loop {
            let eject = match ejects.recv_timeout(Duration::from_millis(10)) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
                Err(_) => break,
            };
            if eject.generation != generation {
                return Err(format!(
                    "eject of NIC {} while NIC {generation} was plugged",
                    eject.generation
                )
                .into());
            }
            let (r, t) = timed(|| eject.removal.wait());
            r?;
            done.unpublish.push(eject.unpublish);
            done.complete.push(t);
            if Arc::strong_count(&nic) != 1 {
                return Err(
                    format!("the buses still hold NIC {generation} after its removal").into(),
                );
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            generation += 1;
            nic = new_nic(generation, buses, tx, ejects_by_vcpu);
            buses.register_dev(
                &mut buses.lock_slots(),
                BusKind::Mmio,
                IoRange::new(NIC, NIC_LEN)?,
                nic.clone(),
            )?;
            // Plugged: tell the guest.
            mem.write_u32(DATA_ADDR + PLUGGED as u64, generation);
        }
        Ok(done)
    }

    fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
        let n = args.vcpus;
        let ejector = n - 1;
        let mut builder = MiniVm::builder().vcpus(n).code(&guest_code(ejector as u64));
        for i in 0..n {
            let base = DATA_ADDR + 0x100 * i as u64;
            builder = builder
                .load(base + TEXT, &text(&format!("vCPU {i}: hello\n")))
                .load(base + BYE, &text(&format!("vCPU {i}: halting, bye\n")));
        }
        builder = builder.load(
            DATA_ADDR + RESET_TEXT,
            &text("vCPU 0: time is up, resetting the machine through the i8042\n"),
        );
        let mut vm = builder.build()?;
        let mem = vm.memory().clone();
        let mut vcpus = vm.take_vcpus();
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
        let ticks = (args.seconds * f64::from(tsc_khz) * 1000.0) as u64;
        mem.write_u64(DATA_ADDR + DEADLINE as u64, ticks);
        println!(
            "vm_demo: {n} vCPUs in 64-bit mode, {} KiB RAM, guest code embedded; \
             guest TSC {:.3} GHz, vCPU 0 resets after {} s",
            mem.size() >> 10,
            f64::from(tsc_khz) / 1e6,
            args.seconds
        );

        let buses = Arc::new(Buses::new());
        let reset = EventFd::new(libc::EFD_NONBLOCK)?;
        let uart = Uart(Serial::new(
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?),
            Console::default(),
        ));
        let i8042 = Arc::new(std::sync::Mutex::new(I8042(I8042Device::new(
            EventFdTrigger(reset.try_clone()?),
        ))));
        let functions: Vec<Arc<PciFn>> = (0..n)
            .map(|i| {
                let window = IoRange::new(WINDOW + ((i as u64) << 20), WINDOW_LEN).unwrap();
                Arc::new_cyclic(|me: &Weak<PciFn>| PciFn {
                    cfg_port: CFG_PORT + 4 * i as u64,
                    buses: Arc::downgrade(&buses),
                    me: me.clone(),
                    state: Mutex::new(FnState {
                        window,
                        moves: 0,
                        move_times: Vec::new(),
                        stale: 0,
                    }),
                })
            })
            .collect();
        {
            let mut slots = buses.lock_slots();
            buses.register_dev(
                &mut slots,
                BusKind::Pio,
                IoRange::new(COM1, 8)?,
                Arc::new(std::sync::Mutex::new(uart)),
            )?;
            buses.register_many(
                &mut slots,
                BusKind::Pio,
                [
                    (
                        IoRange::new(I8042_DATA, 1)?,
                        i8042.clone() as Arc<dyn IoDevice>,
                    ),
                    (IoRange::new(I8042_COMMAND, 1)?, i8042.clone() as _),
                ],
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
            for f in &functions {
                let window = f.state.lock().window;
                buses.register_dev(
                    &mut slots,
                    BusKind::Pio,
                    IoRange::new(f.cfg_port, 4)?,
                    f.clone(),
                )?;
                buses.register_dev(&mut slots, BusKind::Mmio, window, f.clone())?;
            }
        }

        let stats: Vec<Arc<VcpuStats>> = (0..n)
            .map(|i| Arc::new(VcpuStats::for_vcpu(i as u32)))
            .collect();
        let ejects_by_vcpu: Arc<Vec<AtomicU64>> =
            Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let failed = AtomicBool::new(false);
        let stop_manager = AtomicBool::new(false);
        let start = Instant::now();
        let report = std::thread::scope(|s| -> Result<_, BoxError> {
            let mut vcpu_threads = Vec::new();
            for (i, mut vcpu) in vcpus.drain(..).enumerate() {
                let (buses, stats, failed) = (&*buses, stats[i].clone(), &failed);
                vcpu_threads.push(s.spawn(move || {
                    let r = run_vcpu(&mut vcpu, buses, &stats);
                    let wall = start.elapsed();
                    if !matches!(r, Ok(VmExit::Hlt)) {
                        failed.store(true, Ordering::Relaxed);
                    }
                    (r, wall)
                }));
            }
            let (tx, rx) = mpsc::channel();
            let manager = {
                let (buses, mem, ejects_by_vcpu, stop) =
                    (&buses, &mem, &ejects_by_vcpu, &stop_manager);
                s.spawn(move || device_manager(buses, mem, rx, &tx, ejects_by_vcpu, stop))
            };

            // The main VMM thread: hot plug while the vCPUs run, until the
            // guest resets the machine through the i8042.
            let vmm = (|| -> Result<_, BoxError> {
                let limit = start + Duration::from_secs_f64(args.seconds + 30.0);
                let (mut reg, mut unreg) = (Vec::new(), Vec::new());
                let mut hot_hits = 0;
                while reset.read().is_err() {
                    if failed.load(Ordering::Relaxed) || manager.is_finished() {
                        return Err("a vCPU or the device manager stopped early".into());
                    }
                    if Instant::now() > limit {
                        return Err("the guest never reset the machine".into());
                    }
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
                println!(
                    "  [vmm] i8042 reset event after {:.2} s: stopping the vCPUs",
                    start.elapsed().as_secs_f64()
                );
                // The kernel's own I/O-bus registration, same VM, vCPUs
                // still running. Few rounds: each deassign waits for a
                // kernel SRCU grace period (milliseconds).
                let ioeventfd = vm.ioeventfd_latency(IOEVENTFD_PORT, IOEVENTFD_ROUNDS)?;
                Ok((reg, unreg, hot_hits, ioeventfd))
            })();
            // Whatever happened, stop the vCPUs: every one leaves its loop,
            // says goodbye and halts.
            mem.write_u32(DATA_ADDR + STOP as u64, 1);
            let mut results = Vec::new();
            let mut vcpu_error = None;
            for (i, h) in vcpu_threads.into_iter().enumerate() {
                let (r, wall) = h.join().map_err(|_| format!("vCPU {i} thread panicked"))?;
                match r {
                    Ok(VmExit::Hlt) => {}
                    Ok(other) => vcpu_error = Some(format!("vCPU {i} stopped with {other:?}")),
                    Err(e) => vcpu_error = Some(format!("vCPU {i}: KVM_RUN failed: {e}")),
                }
                results.push((stats[i].snapshot(), wall));
            }
            stop_manager.store(true, Ordering::Relaxed);
            let ejects = manager.join().map_err(|_| "device manager panicked")?;
            if let Some(e) = vcpu_error {
                return Err(e.into());
            }
            let (reg, unreg, hot_hits, ioeventfd) = vmm?;
            let ejects = ejects?;
            Ok((results, reg, unreg, hot_hits, ioeventfd, ejects))
        });
        let (results, mut reg, mut unreg, hot_hits, ioeventfd, mut ejects) =
            report.map_err(|e| e.to_string())?;

        let iterations: Vec<u64> = (0..n)
            .map(|i| {
                // The guest left its loop count in its mailbox slot; read it
                // back through the bus like a vCPU would (a read gives the
                // count + 1).
                let mut b = [0u8; 8];
                let _ = buses.read(BusKind::Mmio, MAILBOX + 8 * i as u64, &mut b);
                u64::from_le_bytes(b).saturating_sub(1)
            })
            .collect();
        let mut move_times = Vec::new();
        let (mut moves, mut stale) = (Vec::new(), 0);
        for f in &functions {
            let mut st = f.state.lock();
            moves.push(u64::from(st.moves));
            stale += st.stale;
            move_times.append(&mut st.move_times);
        }
        let ejects_by: Vec<u64> = ejects_by_vcpu
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        print_table(&results, &iterations, &moves, &ejects_by);
        let guest_errors = mem.read_u32(DATA_ADDR + ERRORS as u64);
        let lat = |v: &mut Vec<Duration>| Latency::from_samples(v);
        let (reg, unreg) = (lat(&mut reg), lat(&mut unreg));
        let (moved, unpublish, complete) = (
            lat(&mut move_times),
            lat(&mut ejects.unpublish),
            lat(&mut ejects.complete),
        );
        println!();
        println!(
            "hot plug: {} register/unregister rounds while the vCPUs ran; {} guest pokes reached the device",
            reg.samples, hot_hits
        );
        println!(
            "BAR moves: {}, each by a guest write to a BAR register (move_range in its handler); \
             stale window hits: {stale}",
            moved.samples
        );
        println!(
            "ejects: {} by vCPU {ejector} through the NIC's eject register (start_unregister in its \
             handler, Removal::wait on a VMM thread, then a fresh NIC)",
            complete.samples
        );
        println!(
            "guest checks failed: {guest_errors} (after each move the new window answers and the \
             old one is unhandled; an ejected NIC is gone at once)"
        );
        println!(
            "  {:<40} {:>10} {:>10} {:>10}",
            "latency", "median", "p99", "max"
        );
        let row = |name: &str, l: &Latency| {
            println!(
                "  {:<40} {:>10} {:>10} {:>10}",
                name,
                fmt_dur(l.median),
                fmt_dur(l.p99),
                fmt_dur(l.max)
            );
        };
        row("kvm-bus register_dev", &reg);
        row("kvm-bus unregister_dev", &unreg);
        row("kvm-bus move_range (BAR write handler)", &moved);
        row("kvm-bus eject: start_unregister", &unpublish);
        row("kvm-bus eject: Removal::wait", &complete);
        row("KVM_IOEVENTFD assign (kernel)", &ioeventfd.register);
        row("KVM_IOEVENTFD deassign (kernel)", &ioeventfd.unregister);
        println!(
            "  start_unregister returns with the NIC unpublished (in the handler, inside the \
             access's read section);\n  Removal::wait returns when it is complete (a grace \
             period later, on the device-manager thread)"
        );
        if guest_errors != 0 || stale != 0 {
            return Err(
                format!("{guest_errors} failed guest checks, {stale} stale BAR hits").into(),
            );
        }
        Ok(())
    }

    fn print_table(
        results: &[(StatsSnapshot, Duration)],
        iterations: &[u64],
        moves: &[u64],
        ejects: &[u64],
    ) {
        println!();
        println!(
            "{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>13} {:>10}",
            "vCPU",
            "loops",
            "exits",
            "pio",
            "mmio",
            "handled",
            "unhandled",
            "moves",
            "ejects",
            "dispatch/exit",
            "wall/exit"
        );
        let mut total = StatsSnapshot::default();
        for (i, ((s, wall), loops)) in results.iter().zip(iterations).enumerate() {
            let per_exit = wall.as_nanos() as u64 / s.exits.max(1);
            println!(
                "{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>11}ns {:>8}ns",
                i,
                loops,
                s.exits,
                s.io_exits,
                s.mmio_exits,
                s.handled,
                s.unhandled(),
                moves[i],
                ejects[i],
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
            "{:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>11}ns",
            "all",
            iterations.iter().sum::<u64>(),
            total.exits,
            total.io_exits,
            total.mmio_exits,
            total.handled,
            total.unhandled(),
            moves.iter().sum::<u64>(),
            ejects.iter().sum::<u64>(),
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
