//! Restartable sequences: the per-CPU increment and the current-CPU hint.
//!
//! # The contract
//!
//! glibc 2.35+ registers a `struct rseq` for every thread it creates and
//! exports its offset from the thread pointer as `__rseq_offset` (and its size
//! as `__rseq_size`, 0 when registration is off, e.g. via the
//! `glibc.pthread.rseq=0` tunable). The fields used here:
//!
//! | offset | field | use |
//! |---|---|---|
//! | 4 | `cpu_id: u32` | the CPU this thread runs on; `u32::MAX - 1` if registration failed |
//! | 8 | `rseq_cs: u64` | pointer to the descriptor of the critical section in progress |
//!
//! [`percpu_inc`] is a restartable sequence: it stores the address of its
//! descriptor into `rseq_cs`, reads `cpu_id`, computes the counter's address,
//! and commits with a single non-locked `add` as its last instruction. If the
//! kernel preempts, migrates or signals the thread between the start label
//! and the commit, it moves the instruction pointer to the abort handler,
//! which restarts from the top. So the `add` only ever runs on the CPU whose
//! counter it updates, and since every writer of a per-CPU counter goes
//! through this sequence, no update is lost without a `lock` prefix.
//!
//! The abort handler is preceded by the 4-byte signature glibc registered
//! (`RSEQ_SIG`, 0x53053053 on x86), which the kernel checks before it jumps
//! there; the three bytes before it make the signature decode as a `ud1`
//! instruction, as librseq does, so disassemblers stay in sync.
//!
//! Callers must never write a counter that this sequence writes with any
//! other instruction (see `percpu.rs`): a plain `add` racing with a `lock
//! add` from another CPU can lose either.

/// Where the rseq area of every thread lives: its offset from the thread
/// pointer, found once per process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RseqOffset(#[allow(dead_code)] pub(crate) isize);

/// Looks up glibc's rseq registration. `None` if the C library does not
/// register rseq for its threads (old glibc, musl, tunable off) or the
/// calling thread's registration failed.
#[cfg(all(
    target_os = "linux",
    target_arch = "x86_64",
    target_env = "gnu",
    not(loom)
))]
pub(crate) fn detect() -> Option<RseqOffset> {
    use std::sync::OnceLock;
    static OFFSET: OnceLock<Option<isize>> = OnceLock::new();
    let off = (*OFFSET.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only
        // looks symbols up; a null result means "not exported".
        let (size, off) = unsafe {
            (
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()),
                libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()),
            )
        };
        if size.is_null() || off.is_null() {
            return None;
        }
        // SAFETY: glibc defines `__rseq_size` as `const unsigned int` and
        // `__rseq_offset` as `const ptrdiff_t`; both are initialised before
        // any user code runs and never change afterwards.
        let (size, off) = unsafe { (*(size as *const u32), *(off as *const isize)) };
        // The fields used here end at offset 16; the original ABI size is 32.
        (size >= 16).then_some(off)
    }))?;
    let rseq = RseqOffset(off);
    // Registration can still fail per thread (seccomp, a foreign clone).
    (cpu_id(rseq) < (u32::MAX - 1) as usize).then_some(rseq)
}

/// Non-glibc or non-x86_64 targets: no rseq, always the atomic path.
#[cfg(not(all(
    target_os = "linux",
    target_arch = "x86_64",
    target_env = "gnu",
    not(loom)
)))]
pub(crate) fn detect() -> Option<RseqOffset> {
    None
}

/// The CPU the calling thread was on a moment ago: one load from its rseq
/// area. A hint only (the thread may migrate right after). The `u32` field
/// zero-extended by the load itself (a 32-bit `mov` clears the upper half
/// of the register), so it is below 2^32 and `cpu as u32 as usize == cpu`:
/// callers compare the `u32` and index with the `usize`, and no separate
/// zero extension is executed.
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
#[inline(always)]
pub(crate) fn cpu_id(rseq: RseqOffset) -> usize {
    let cpu: usize;
    // SAFETY: `rseq.0` came from glibc's `__rseq_offset`, so `fs:[off + 4]`
    // is the `cpu_id` field of this thread's registered rseq area, which
    // lives as long as the thread. The load has no side effect.
    unsafe {
        core::arch::asm!(
            "mov {cpu:e}, dword ptr fs:[{off} + 4]",
            off = in(reg) rseq.0,
            cpu = out(reg) cpu,
            options(nostack, readonly, preserves_flags),
        );
    }
    cpu
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", not(loom))))]
#[inline(always)]
pub(crate) fn cpu_id(_rseq: RseqOffset) -> usize {
    u32::MAX as usize
}

/// A stand-in for an rseq area, one per thread, that [`percpu_inc`] may be
/// run with: `cpu_id` is `u32::MAX` for good (above any bound), so the
/// sequence only stores its descriptor into `rseq_cs` here (a word nobody
/// reads) and takes its out-of-range exit. The kernel never looks at it.
/// The sections of a domain on the atomic path carry it, so that the end
/// of every section is the same sequence and needs no test of the path
/// first (`percpu.rs`), even where no real area exists at all (glibc
/// before 2.35, musl).
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
#[repr(C, align(32))]
struct StandIn {
    _cpu_id_start: u32,
    /// Never written.
    cpu_id: u32,
    /// Written by the sequence's `mov` (through `fs`), never read.
    rseq_cs: core::cell::UnsafeCell<u64>,
}

/// The calling thread's [`StandIn`], as an offset from its thread pointer.
/// Valid only on this thread: unlike glibc's offset it is not the same in
/// every thread (the stand-in is a Rust thread-local, which may live in
/// dynamically allocated TLS), so it is only handed to sections that end
/// on the thread that began them (`percpu.rs`).
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
#[inline]
pub(crate) fn stand_in() -> RseqOffset {
    std::thread_local! {
        // Const-initialised and without destructor: it lives (and keeps
        // its address) as long as the thread, thread-local destructors
        // included.
        static AREA: StandIn = const {
            StandIn {
                _cpu_id_start: u32::MAX,
                cpu_id: u32::MAX,
                rseq_cs: core::cell::UnsafeCell::new(0),
            }
        };
    }
    debug_assert_eq!(
        core::mem::offset_of!(StandIn, cpu_id) + 4,
        core::mem::offset_of!(StandIn, rseq_cs)
    );
    // Exposed: the sequence reaches the area through `fs`, not through a
    // pointer derived from this one.
    let area = AREA.with(|a| core::ptr::from_ref(a).expose_provenance());
    let tp: usize;
    // SAFETY: on x86_64 Linux the first word of the thread control block,
    // at `fs:0`, holds the thread pointer itself (the ELF TLS ABI, variant
    // II; glibc's `tcbhead_t.tcb`, musl's `pthread.self`). A load without
    // side effects.
    unsafe {
        core::arch::asm!(
            "mov {tp}, qword ptr fs:0",
            tp = out(reg) tp,
            options(nostack, readonly, preserves_flags, pure),
        );
    }
    RseqOffset(area.wrapping_sub(tp) as isize)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", not(loom))))]
#[inline]
pub(crate) fn stand_in() -> RseqOffset {
    RseqOffset(0)
}

/// Adds 1 to the `u64` at `base + cpu * 128 + DISP`, where `cpu` is the CPU
/// the thread runs on at commit time, as a restartable sequence. Returns
/// `false`, having written nothing but `rseq_cs`, if `cpu >= *nr_cpus`
/// (the compare reads the bound from memory itself, so no instruction
/// loads it apart). (`DISP` is folded
/// into the `add`'s address, so a read section passes the same `base` to
/// its lock and its unlock increment.)
///
/// The out-of-range exit is an `asm goto` (a `label` operand): the `jae`
/// inside the sequence jumps straight to the caller's fallback, so the
/// caller's `if !percpu_inc(..) { slow() }` compiles to that one branch
/// and no flag is materialised or tested.
///
/// # Safety
///
/// * `rseq` must come from [`detect`] (the thread's rseq area, registered
///   or not: glibc has one for every thread once it exports the offset),
///   or from [`stand_in`] on the calling thread.
/// * `nr_cpus` must be valid for reads of a `u32`.
/// * `base + c * 128 + DISP` must be valid for writes of a `u64` for every
///   `c < *nr_cpus`, and no code may write those words other than through
///   this function (or while no thread can run it).
#[cfg(all(target_os = "linux", target_arch = "x86_64", not(loom)))]
#[inline(always)]
pub(crate) unsafe fn percpu_inc<const DISP: usize>(
    rseq: RseqOffset,
    base: *mut u64,
    nr_cpus: *const u32,
) -> bool {
    // Labels: 2 retry (re-arm rseq_cs, the kernel clears it on abort),
    // 3 descriptor, 4 start_ip, 5 post-commit, 6 abort_ip; `{oob}` is the
    // caller's out-of-range exit. The descriptor is `struct rseq_cs { u32
    // version; u32 flags; u64 start_ip; u64 post_commit_offset; u64
    // abort_ip; }`, 32-byte aligned. Jumping out of the critical section
    // early (to `{oob}`) is allowed: the kernel ignores a descriptor whose
    // range does not contain the interrupted instruction pointer.
    #[cfg(not(srcu_teeth = "rseq_restart"))]
    macro_rules! arm {
        () => {
            "lea rax, [rip + 3b]\n mov qword ptr fs:[{off} + 8], rax"
        };
    }
    // Teeth: without arming rseq_cs the sequence is no longer restarted on
    // preemption or migration.
    #[cfg(srcu_teeth = "rseq_restart")]
    macro_rules! arm {
        () => {
            "lea rax, [rip + 3b]"
        };
    }
    // The commit. Normally one `add` to memory: preemption can only hit
    // between reading `cpu_id` and this instruction (a migration window of
    // three instructions). The teeth builds (`rseq_restart`, and the
    // `rseq_wide` control that keeps the restart) split it into load, a
    // 64-`pause` delay, add, store, so that preemption inside the window is
    // common and the tests can show what the restart protects against.
    #[cfg(not(any(srcu_teeth = "rseq_restart", srcu_teeth = "rseq_wide")))]
    macro_rules! commit {
        () => {
            "add qword ptr [{base} + rax + {disp}], 1"
        };
    }
    #[cfg(any(srcu_teeth = "rseq_restart", srcu_teeth = "rseq_wide"))]
    macro_rules! commit {
        () => {
            "lea rcx, [{base} + rax + {disp}]\n mov rdx, qword ptr [rcx]\n mov eax, 64\n 9: pause\n dec eax\n jnz 9b\n add rdx, 1\n mov qword ptr [rcx], rdx"
        };
    }
    // The widened teeth commit needs two more scratch registers; the
    // normal build clobbers only `rax`.
    macro_rules! sequence {
        ($($scratch:tt)*) => {
            core::arch::asm!(
                ".pushsection __rseq_cs, \"aw\"",
                ".balign 32",
                "3:",
                ".long 0, 0",
                ".quad 4f, (5f - 4f), 6f",
                ".popsection",
                "2:",
                arm!(),
                "4:",
                "mov eax, dword ptr fs:[{off} + 4]",
                "cmp eax, dword ptr [{nr}]",
                "jae {oob}",
                "shl rax, 7",
                commit!(),
                "5:",
                ".pushsection __rseq_failure, \"ax\"",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "6:",
                "jmp 2b",
                ".popsection",
                off = in(reg) rseq.0,
                base = in(reg) base,
                nr = in(reg) nr_cpus,
                disp = const DISP,
                oob = label {
                    return false;
                },
                out("rax") _,
                $($scratch)*
                options(nostack),
            )
        };
    }
    // SAFETY: see the module docs and this function's contract. The asm
    // writes only `rseq_cs` of this thread's rseq area (or stand-in) and
    // the counter word, and reads `cpu_id` and `*nr_cpus`;
    // it is a compiler barrier (no `nomem`), which is all barriers B and C
    // need in the fast flavor and all C needs on x86_64 (TSO makes the
    // store a release). The `{oob}` exit is taken before anything but
    // `rseq_cs` is written.
    unsafe {
        #[cfg(not(any(srcu_teeth = "rseq_restart", srcu_teeth = "rseq_wide")))]
        sequence!();
        #[cfg(any(srcu_teeth = "rseq_restart", srcu_teeth = "rseq_wide"))]
        sequence!(out("rcx") _, out("rdx") _,);
    }
    true
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64", not(loom))))]
#[inline(always)]
pub(crate) unsafe fn percpu_inc<const DISP: usize>(
    _rseq: RseqOffset,
    _base: *mut u64,
    _nr_cpus: *const u32,
) -> bool {
    false
}

/// Adds 1 to a counter with a `lock add`, a full barrier on x86_64 (barrier
/// B of the classic flavor costs nothing beyond the increment).
///
/// # Safety
///
/// `counter` must be valid for atomic writes of a `u64` (it points into an
/// `AtomicUsize`).
#[cfg(all(target_arch = "x86_64", not(loom)))]
#[inline(always)]
pub(crate) unsafe fn locked_inc(counter: *mut u64) {
    // SAFETY: `counter` is a valid, aligned atomic word (caller). A locked
    // RMW is atomic against every other CPU and a full barrier.
    unsafe {
        core::arch::asm!("lock add qword ptr [{c}], 1", c = in(reg) counter, options(nostack));
    }
}

/// [`locked_inc`] of the counter `offset` bytes after `base`, with the
/// addition folded into the instruction's address.
///
/// # Safety
///
/// `base + offset` must be valid for atomic writes of a `u64` (it points
/// into an `AtomicUsize`).
#[cfg(all(target_arch = "x86_64", not(loom)))]
#[inline(always)]
pub(crate) unsafe fn locked_inc_at(base: *mut u64, offset: usize) {
    // SAFETY: `base + offset` is a valid, aligned atomic word (caller). A
    // locked RMW is atomic against every other CPU and a full barrier.
    unsafe {
        core::arch::asm!(
            "lock add qword ptr [{b} + {o}], 1",
            b = in(reg) base,
            o = in(reg) offset,
            options(nostack),
        );
    }
}

#[cfg(all(test, target_os = "linux", target_arch = "x86_64", not(loom)))]
mod tests {
    use super::*;

    /// The `u32` at `fs:[off]`.
    fn fs_u32(off: isize) -> u32 {
        let v: u32;
        // SAFETY: the callers pass the offset of their own thread's
        // stand-in (a live thread-local); a load without side effects.
        unsafe {
            core::arch::asm!(
                "mov {v:e}, dword ptr fs:[{o}]",
                o = in(reg) off,
                v = out(reg) v,
                options(nostack, readonly, preserves_flags),
            );
        }
        v
    }

    /// On every thread (one with a large stack too, so that its TLS sits
    /// elsewhere), the stand-in's offset reaches that thread's own area
    /// through `fs`, its `cpu_id` is above every bound, and a sequence run
    /// with it commits nothing.
    #[test]
    fn stand_in_is_the_calling_threads_and_never_commits() {
        let check = || {
            let area = stand_in();
            assert_eq!(cpu_id(area), u32::MAX as usize);
            assert_eq!(fs_u32(area.0 + 4), u32::MAX, "cpu_id read through fs");
            let mut words = [0u64; 64];
            let bound = 1u32;
            // SAFETY: the stand-in of this thread; `words` covers CPU 0's
            // word (the only one below the bound), which nothing else
            // writes.
            let committed = unsafe { percpu_inc::<0>(area, words.as_mut_ptr(), &bound) };
            assert!(!committed);
            assert!(words.iter().all(|&w| w == 0));
        };
        check();
        std::thread::spawn(check).join().unwrap();
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(check)
            .unwrap()
            .join()
            .unwrap();
    }
}
