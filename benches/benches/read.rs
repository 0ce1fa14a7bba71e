//! Issue 6, section 1: read sections, 1 thread and 2 threads at once.
//!
//! `read_1t/<op>/<peer>`: ns per operation on one thread.
//! `read_2t/<op>/<peer>`: per-thread ns per operation with two threads on
//! the same primitive at once (criterion's time is each thread's own).
//! `<peer>` = `rseq_pair_floor` is the physical floor of srcu fast's read
//! section: its two rseq per-CPU adds and nothing else (when glibc
//! registers rseq).

use benches::harness::concurrent_fixed;
use benches::read::{self, ReadOp, ReadPeer, ReadVisitor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

struct Visit<'a>(&'a mut Criterion);

impl ReadVisitor for Visit<'_> {
    fn visit<P: ReadPeer>(&mut self, peer: &P) {
        let mut g = self.0.benchmark_group("read_1t");
        for op in ReadOp::ALL {
            g.bench_function(BenchmarkId::new(op.name(), P::KEY), |b| {
                b.iter(|| read::run_op(peer, op))
            });
        }
        g.finish();
        let mut g = self.0.benchmark_group("read_2t");
        for op in ReadOp::ALL {
            g.bench_function(BenchmarkId::new(op.name(), P::KEY), |b| {
                b.iter_custom(|iters| concurrent_fixed(2, iters, || read::run_op(peer, op)))
            });
        }
        g.finish();
    }
}

fn reads(c: &mut Criterion) {
    read::for_each_peer(&mut Visit(c));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = reads
}
criterion_main!(benches);
