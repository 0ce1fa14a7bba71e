//! `cargo run --release -p benches --bin bench-report -- [--quick] [--json PATH]`
//!
//! Runs every comparison of issue 6 in one process and prints a markdown
//! table (medians, ratios to srcu, repetition counts) and the targets; with
//! `--json PATH` also writes a flat JSON object of the numbers (ns unless
//! the key says otherwise: `membarriers_per_*` are counts per grace period,
//! `*_cpu_frac_*` fractions). In the same run as the latencies it measures
//! the grace periods' side effects (`membarrier` calls per grace period,
//! CPU burnt while waiting for a reader, from `srcu.stats()` deltas and the
//! caller's thread CPU clock) and the physical floors (one bare
//! `membarrier`, two bare rseq per-CPU adds).

use benches::report::{self, Config};
use std::time::Instant;

fn main() {
    let mut quick = false;
    let mut json = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--json" => match args.next() {
                Some(p) => json = Some(p),
                None => usage("--json needs a path"),
            },
            "-h" | "--help" => usage(""),
            // `cargo bench` passes `--bench` to every target it runs.
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; use --release for meaningful numbers");
    }
    let cfg = if quick {
        Config::quick()
    } else {
        Config::full()
    };
    let t0 = Instant::now();
    let rep = report::run(&cfg, |s| {
        eprintln!("[{:6.1} s] {s}", t0.elapsed().as_secs_f64());
    });
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "## bench-report ({}), {}\n",
        if quick { "--quick" } else { "full" },
        utc_now()
    );
    println!(
        "Command: `cargo run --release -p benches --bin bench-report -- {}`  ",
        args.join(" ")
    );
    print!("{}", rep.markdown());
    println!("\nTotal run time: {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(p) = json {
        if let Err(e) = std::fs::write(&p, rep.json()) {
            eprintln!("cannot write {p}: {e}");
            std::process::exit(1);
        }
        eprintln!("wrote {p}");
    }
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("error: {err}");
    }
    eprintln!("usage: bench-report [--quick] [--json PATH]");
    std::process::exit(if err.is_empty() { 0 } else { 2 });
}

/// Current UTC time as `YYYY-MM-DD HH:MM UTC` (no date crate needed).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
