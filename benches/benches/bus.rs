//! Issue 6, section 3: dispatch on buses of 1/16/64/1000 devices (kvm-bus
//! vs the buses real Rust VMMs ship: rust-vmm's vm-device `IoManager` in a
//! `RwLock` or a `Mutex`, Cloud Hypervisor's `Weak`-based bus, Dragonball's
//! `ArcSwap` table, and a plain `RwLock<BTreeMap>`; 1 and 2 threads),
//! registration and unregistration (kvm-bus vs the pre-6.18 variant, the
//! same peers and the kernel's `KVM_IOEVENTFD`), guest-driven
//! reconfiguration (`move_range`, a handler-started removal), and the
//! 200-device "VM start-up".

use benches::bus::{self, BusVisitor, DispatchBus, RegisterMode, Startup};
use benches::harness::{concurrent_fixed, Stats};
use benches::peers::{self, UpdatePeer};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use srcu::Classic;
use std::hint::black_box;
use std::time::Duration;

fn total(s: &Stats) -> Duration {
    Duration::from_nanos(s.samples.iter().sum::<f64>() as u64)
}

struct Visit<'a> {
    c: &'a mut Criterion,
    n: usize,
}

impl BusVisitor for Visit<'_> {
    fn visit<B: DispatchBus>(&mut self) {
        let n = self.n;
        let bus = B::with_devices(n);
        let addr = bus::target(n);
        let data = [1u8, 2, 3, 4];
        assert!(bus.dispatch(addr, &data));
        let mut g = self.c.benchmark_group(format!("dispatch_{n}"));
        g.bench_function(BenchmarkId::new("1t", B::KEY), |b| {
            b.iter(|| bus.dispatch(black_box(addr), &data))
        });
        g.bench_function(BenchmarkId::new("2t", B::KEY), |b| {
            b.iter_custom(|iters| {
                concurrent_fixed(2, iters, || {
                    black_box(bus.dispatch(black_box(addr), &data));
                })
            })
        });
        g.finish();
    }
}

fn dispatch(c: &mut Criterion) {
    for n in bus::SIZES {
        bus::for_each_bus(&mut Visit { c, n });
    }
}

fn peer_registration<P: UpdatePeer>(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.bench_function(format!("register_{}", P::KEY), |b| {
        b.iter_custom(|iters| total(&peers::register_latency::<P>(iters as usize, 50)))
    });
    g.bench_function(format!("unregister_{}", P::KEY), |b| {
        b.iter_custom(|iters| total(&peers::unregister_latency::<P>(iters as usize)))
    });
}

fn registration(c: &mut Criterion) {
    let buses = kvm_bus::Buses::new();
    let mut g = c.benchmark_group("register");
    for (name, mode) in [
        ("register_dev", RegisterMode::Deferred),
        ("register_dev_sync_inside", RegisterMode::SyncInside),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| total(&bus::register_latency(&buses, mode, iters as usize, 50)))
        });
    }
    g.bench_function("unregister_dev", |b| {
        b.iter_custom(|iters| total(&bus::unregister_latency(&buses, iters as usize)))
    });
    peer_registration::<peers::VmDeviceBus>(&mut g);
    peer_registration::<peers::ChBus>(&mut g);
    peer_registration::<peers::DragonballBus>(&mut g);
    let fast = kvm_bus::Buses::new_fast();
    for (flavor, classic) in [("classic", true), ("fast", false)] {
        g.bench_function(format!("move_range_{flavor}"), |b| {
            b.iter_custom(|iters| {
                total(&if classic {
                    bus::move_range_latency(&buses, iters as usize, 50)
                } else {
                    bus::move_range_latency(&fast, iters as usize, 50)
                })
            })
        });
        for (what, complete) in [("start_unregister", false), ("removal_complete", true)] {
            g.bench_function(format!("{what}_{flavor}"), |b| {
                b.iter_custom(|iters| {
                    let (s, c) = if classic {
                        bus::removal_latency(&buses, iters as usize)
                    } else {
                        bus::removal_latency(&fast, iters as usize)
                    };
                    total(if complete { &c } else { &s })
                })
            });
        }
    }
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    match benches::vm::IoeventVm::new() {
        Ok(vm) => {
            g.bench_function("kernel_ioeventfd_assign", |b| {
                b.iter_custom(|iters| total(&vm.register_unregister(iters as usize).0))
            });
            g.bench_function("kernel_ioeventfd_deassign", |b| {
                b.iter_custom(|iters| total(&vm.register_unregister(iters as usize).1))
            });
        }
        Err(e) => eprintln!("skipping kernel KVM_IOEVENTFD benches: {e}"),
    }
    g.finish();

    let mut g = c.benchmark_group("register_200");
    g.sample_size(10);
    g.bench_function("unregister_many", |b| {
        b.iter_custom(|iters| total(&bus::unregister_many_latency(&buses, 200, iters as usize)))
    });
    for (id, how) in [
        ("startup_one_by_one", Startup::OneByOne),
        ("startup_one_by_one_sync", Startup::OneByOneSync),
        ("startup_register_many", Startup::Many),
    ] {
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let ns: f64 = (0..iters)
                    .map(|_| bus::startup::<Classic>(how, 200, 2).0)
                    .sum();
                Duration::from_nanos(ns as u64)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = dispatch, registration
}
criterion_main!(benches);
