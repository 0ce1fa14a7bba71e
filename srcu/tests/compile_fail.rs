//! The lifetimes and proof types reject misuse at compile time.
#![cfg(not(loom))]

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
