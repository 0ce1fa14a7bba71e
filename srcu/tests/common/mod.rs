//! Shared by the integration tests that need it (`mod common;`).

/// Runs the tests named `tests` of this test binary again in a child
/// process with `SRCU_NO_MEMBARRIER=1` (a process learns once whether it
/// may use membarrier, so the fast flavor's fallback needs a fresh one),
/// and checks that the child passed and printed every one of `markers`
/// (each test says there that it ran in the fallback). In the child
/// itself it does nothing: the tests named run there as they are.
pub fn rerun_without_membarrier(tests: &[&str], markers: &[&str]) {
    if std::env::var_os("SRCU_NO_MEMBARRIER").is_some() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .arg("--exact")
        .args(tests)
        .args(["--nocapture", "--test-threads=1"])
        .env("SRCU_NO_MEMBARRIER", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for marker in markers {
        assert!(
            stdout.contains(marker),
            "no `{marker}` line: not run, or not in the fallback\n{stdout}"
        );
    }
}
