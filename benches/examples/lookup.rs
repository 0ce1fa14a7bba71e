//! Measures bus lookup (issue "Performance at the floor", part 4).
//!
//! `cargo run --release -p benches --example lookup -- bench [ROUNDS]`:
//! 1-thread dispatch ns for 1, 64 and 1000 devices, kvm-bus classic and
//! fast and the `RwLock<BTreeMap>` peer, the buses measured in rotation
//! (ROUNDS samples of 50 000 dispatches each, so that a noisy neighbour
//! hits every bus alike), at the benchmark's fixed address
//! ([`bus::target`]) and at random addresses over the devices; plus the
//! bare lookup (`IoBus::get_dev`). Prints medians and min..max.
//!
//! `... -- fresh N TRIALS [barrier]`: what `bench-report` does for one
//! bus size: build each bus (N one-by-one registrations), then straight
//! away 21 samples of [`bus::dispatch_ns`]; prints each sample in order and
//! the function-call interrupts (membarrier IPIs) the machine took
//! meanwhile. With `barrier`, waits for the registrations' deferred frees
//! (`Srcu::barrier`) before measuring.
//!
//! `... -- reg [ROUNDS [SIZE]]`: what a table build costs: median ns of a
//! `register_dev` into a bus of 0 to 49 devices (as `bench-report`'s
//! `register_ns`), and into one of 900 to 949.
//!
//! `... -- bench-reg [ROUNDS]`: `bench-report`'s `register_ns` and
//! `register_sync_ns` measurements as they are (one `Buses`, batches of
//! 50 registrations each followed by an `unregister_many`), ROUNDS times:
//! median ns of each.
//!
//! `... -- bench-reg-vm [ROUNDS]`: the same with a KVM VM alive in the
//! process (no vCPU), as in a VMM.
//!
//! `... -- turns WHAT`: registration batches in turns with batches of the
//! kernel's `KVM_IOEVENTFD` assigns and deassigns, or with something else
//! (see [`turns`]), and probes of the machine's speed.
//!
//! `... -- loop BUS N ITERS [fixed|random]`: only ITERS dispatches (BUS =
//! srcu, srcu_fast, rwlock_btreemap or get_dev) on an N-device bus, for
//! `valgrind --tool=callgrind --branch-sim=yes` and `perf record`.

use benches::bus::{self, DispatchBus, RwLockBTreeBus, SrcuBus};
use benches::harness::{ns_per_op, Stats};
use kvm_bus::{BusKind, Buses};
use std::hint::black_box;

const ITERS: u64 = 50_000;

/// Addresses inside random devices of an `n`-device bus (xorshift, fixed
/// seed), 4 bytes into the device's range.
fn random_addrs(n: usize, count: usize) -> Vec<u64> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bus::range((s % n as u64) as usize).addr() + 4
        })
        .collect()
}

/// One sample: ns per dispatch over `ITERS` dispatches at `addrs` (in turn).
#[inline(never)]
fn sample<B: DispatchBus>(b: &B, addrs: &[u64]) -> f64 {
    let data = [1u8, 2, 3, 4];
    let mut i = 0;
    ns_per_op(ITERS, || {
        black_box(b.dispatch(black_box(addrs[i]), &data));
        i += 1;
        if i == addrs.len() {
            i = 0;
        }
    })
}

/// `get_dev` only: no SRCU section, no device call.
#[inline(never)]
fn sample_get_dev(buses: &Buses, addrs: &[u64]) -> f64 {
    let slots = buses.lock_slots();
    let b = buses.get_bus(&slots, BusKind::Mmio);
    let mut i = 0;
    ns_per_op(ITERS, || {
        black_box(b.get_dev(black_box(addrs[i])).is_some());
        i += 1;
        if i == addrs.len() {
            i = 0;
        }
    })
}

fn get_dev_bus(n: usize) -> Buses {
    let b = SrcuBus::<srcu::Classic> {
        buses: Buses::default(),
    };
    b.add(0, n);
    b.buses
}

fn fmt(s: &Stats) -> String {
    let (lo, hi) = s.min_max();
    format!("{:6.1} ({:5.1}..{:5.1})", s.median(), lo, hi)
}

fn bench(rounds: usize) {
    println!("1-thread ns per dispatch: median (min..max) of {rounds} rotated samples");
    for n in [1usize, 64, 1000] {
        let classic = SrcuBus::<srcu::Classic>::with_devices(n);
        let fast = SrcuBus::<srcu::Fast>::with_devices(n);
        let btree = RwLockBTreeBus::with_devices(n);
        let gd = get_dev_bus(n);
        for (what, addrs) in [
            ("fixed ", vec![bus::target(n)]),
            ("random", random_addrs(n, 4096)),
        ] {
            let mut s = [(); 4].map(|_| Stats::default());
            // Warm-up.
            sample(&classic, &addrs);
            sample(&fast, &addrs);
            sample(&btree, &addrs);
            sample_get_dev(&gd, &addrs);
            for _ in 0..rounds {
                s[0].samples.push(sample(&classic, &addrs));
                s[1].samples.push(sample(&fast, &addrs));
                s[2].samples.push(sample(&btree, &addrs));
                s[3].samples.push(sample_get_dev(&gd, &addrs));
            }
            println!(
                "n={n:<4} {what} classic {}  fast {}  rwlock_btreemap {}  get_dev {}  classic/btree {:.2}  fast/btree {:.2}",
                fmt(&s[0]),
                fmt(&s[1]),
                fmt(&s[2]),
                fmt(&s[3]),
                s[0].median() / s[2].median(),
                s[1].median() / s[2].median(),
            );
        }
    }
}

/// Function-call interrupts (IPIs) taken so far, all CPUs.
fn call_irqs() -> u64 {
    let s = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    s.lines()
        .find(|l| l.trim_start().starts_with("CAL:"))
        .map_or(0, |l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
}

fn fresh_one<B: DispatchBus>(n: usize, barrier: impl Fn(&B)) {
    let b = B::with_devices(n);
    barrier(&b);
    let addr = bus::target(n);
    let irq0 = call_irqs();
    let t0 = std::time::Instant::now();
    bus::dispatch_ns(&b, addr, ITERS / 10 + 1);
    let s = Stats::collect(21, || bus::dispatch_ns(&b, addr, ITERS));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let samples: Vec<String> = s.samples.iter().map(|v| format!("{v:.0}")).collect();
    println!(
        "  {:16} median {:5.1}  IPIs {:5} in {ms:4.0} ms  samples {}",
        B::KEY,
        s.median(),
        call_irqs() - irq0,
        samples.join(" ")
    );
}

fn fresh(n: usize, trials: usize, barrier: bool) {
    for t in 0..trials {
        println!("trial {t} (n={n}, barrier={barrier})");
        fresh_one::<SrcuBus<srcu::Classic>>(n, |b| {
            if barrier {
                b.buses.srcu().barrier()
            }
        });
        fresh_one::<SrcuBus<srcu::Fast>>(n, |b| {
            if barrier {
                b.buses.srcu().barrier()
            }
        });
        fresh_one::<RwLockBTreeBus>(n, |_| ());
    }
}

fn reg(rounds: usize, sizes: &[usize]) {
    for &size in sizes {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let b = SrcuBus::<srcu::Classic> {
                buses: Buses::default(),
            };
            b.add(0, size);
            b.buses.srcu().barrier();
            for i in 0..50 {
                let d: std::sync::Arc<dyn kvm_bus::IoDevice> = std::sync::Arc::new(bus::Nop);
                let r = bus::range(bus::REG_BASE_INDEX + i);
                samples.push(benches::harness::time_ns(|| {
                    bus::register_one(&b.buses, bus::RegisterMode::Deferred, r, d)
                }));
            }
        }
        let s = Stats { samples };
        println!(
            "register_dev into {size}+0..49 devices: median {:.0} ns",
            s.median()
        );
    }
}

fn run_loop<B: DispatchBus>(n: usize, iters: u64, addrs: &[u64]) {
    let b = B::with_devices(n);
    let data = [1u8, 2, 3, 4];
    for i in 0..iters as usize {
        black_box(b.dispatch(black_box(addrs[i % addrs.len()]), &data));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") | None => bench(args.get(1).map_or(21, |r| r.parse().expect("ROUNDS"))),
        Some("fresh") => fresh(
            args.get(1).expect("N").parse().expect("N"),
            args.get(2).map_or(3, |t| t.parse().expect("TRIALS")),
            args.get(3).is_some_and(|a| a == "barrier"),
        ),
        Some("reg") => reg(
            args.get(1).map_or(200, |r| r.parse().expect("ROUNDS")),
            &args
                .get(2)
                .map_or(vec![0, 900], |s| vec![s.parse().expect("SIZE")]),
        ),
        Some("turns") => turns(args.get(1).map_or("kernel", String::as_str)),
        Some(mode @ ("bench-reg" | "bench-reg-vm")) => {
            // With a KVM VM alive in the process, as in a VMM.
            let _vm =
                (mode == "bench-reg-vm").then(|| benches::vm::IoeventVm::new().expect("KVM VM"));
            for _ in 0..args.get(1).map_or(3, |r| r.parse().expect("ROUNDS")) {
                let buses = Buses::new();
                let d = bus::register_latency(&buses, bus::RegisterMode::Deferred, 1001, 50);
                let s = bus::register_latency(&buses, bus::RegisterMode::SyncInside, 1001, 50);
                println!(
                    "register_dev {:.0} ns, register_dev + synchronize {:.0} ns",
                    d.median(),
                    s.median()
                );
            }
        }
        Some("loop") => {
            let which = args.get(1).expect("BUS").as_str();
            let n: usize = args.get(2).expect("N").parse().expect("N");
            let iters: u64 = args.get(3).expect("ITERS").parse().expect("ITERS");
            let addrs = match args.get(4).map_or("fixed", String::as_str) {
                "random" => random_addrs(n, 4096),
                _ => vec![bus::target(n)],
            };
            match which {
                "srcu" => run_loop::<SrcuBus<srcu::Classic>>(n, iters, &addrs),
                "srcu_fast" => run_loop::<SrcuBus<srcu::Fast>>(n, iters, &addrs),
                "rwlock_btreemap" => run_loop::<RwLockBTreeBus>(n, iters, &addrs),
                "get_dev" => {
                    let gd = get_dev_bus(n);
                    let slots = gd.lock_slots();
                    let b = gd.get_bus(&slots, BusKind::Mmio);
                    for i in 0..iters as usize {
                        black_box(b.get_dev(black_box(addrs[i % addrs.len()])).is_some());
                    }
                }
                other => panic!("unknown bus {other}"),
            }
        }
        Some(other) => panic!("unknown mode {other}"),
    }
}

/// `turns WHAT`: 20 rounds of a batch of 50 `register_dev`s (then one
/// `unregister_many`) and then WHAT: `kernel` (a batch of 50 of the
/// kernel's `KVM_IOEVENTFD` assigns, then their deassigns, as
/// `bench-report`'s `register_in_turns_ns`), `kernel-20ms` (the same, then a
/// 20 ms sleep), `kernel-thread` (the kernel's batch on another thread),
/// `assign-only` (50 assigns, never deassigned), `fresh-vm` (a new VM for
/// each batch: created, 50 assigns, dropped), `sleep` (500 us) or `none`.
/// Prints the registrations' median, by position in the batch too, and
/// two probes timed at the start of each round: a multiply-add chain (the
/// CPU's speed) and 50 allocations and copies of about 1.6 KB (what a
/// registration's table build does).
fn turns(what: &str) {
    let vm = benches::vm::IoeventVm::new().expect("KVM VM");
    let buses = Buses::new();
    let (mut ours, mut kernel, mut chain, mut copies) = (vec![], vec![], vec![], vec![]);
    let buf: Vec<u64> = (0..4096).collect();
    for _ in 0..20 {
        chain.push(benches::harness::time_ns(|| {
            let mut acc = 0u64;
            for _ in 0..20 {
                for &x in black_box(&buf) {
                    acc = acc.wrapping_mul(31).wrapping_add(x);
                }
            }
            black_box(acc);
        }));
        let mut held: Vec<Vec<u64>> = Vec::new();
        copies.push(benches::harness::time_ns(|| {
            for i in 0..50 {
                held.push(black_box(&buf[..200 + i]).to_vec());
                if held.len() > 4 {
                    held.remove(0);
                }
            }
        }));
        ours.extend(bus::register_latency(&buses, bus::RegisterMode::Deferred, 50, 50).samples);
        match what {
            "kernel" => kernel.extend(vm.register_unregister(50).0.samples),
            "kernel-20ms" => {
                kernel.extend(vm.register_unregister(50).0.samples);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            "kernel-thread" => std::thread::scope(|t| {
                let vm = &vm;
                let samples = t.spawn(move || vm.register_unregister(50).0.samples);
                kernel.extend(samples.join().expect("kernel batch"));
            }),
            "assign-only" => kernel.extend(vm.assign_ports(ours.len(), 50).samples),
            "fresh-vm" => {
                let fresh = benches::vm::IoeventVm::new().expect("KVM VM");
                kernel.extend(fresh.assign_ports(0, 50).samples);
            }
            "sleep" => std::thread::sleep(std::time::Duration::from_micros(500)),
            _ => {}
        }
    }
    let at = |lo: usize, hi: usize| {
        let mut v: Vec<f64> = ours
            .chunks(50)
            .flat_map(|c| c[lo..hi].iter().copied())
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let median = |samples: Vec<f64>| Stats { samples }.median();
    println!(
        "{what}: register_dev {:.0} ns (by position in the batch: 0-2 {:.0}, 3-9 {:.0}, \
         10-29 {:.0}, 30-49 {:.0}), kernel assign {:.0} ns; probes: multiply-add chain \
         {:.0} ns, 50 x (allocate and copy ~1.6 KB) {:.0} ns",
        median(ours.clone()),
        at(0, 3),
        at(3, 10),
        at(10, 30),
        at(30, 50),
        if kernel.is_empty() {
            f64::NAN
        } else {
            median(kernel)
        },
        median(chain),
        median(copies),
    );
}
