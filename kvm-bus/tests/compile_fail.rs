//! The type-level rules of the three accessors, as programs that must not
//! compile (trybuild). Regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p kvm-bus --test compile_fail` and
//! review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
