//! Shared measurement code for the criterion benches (`benches/*.rs`) and
//! the one-run report (`bench-report`): the peers (the buses real Rust VMMs ship in `peers`),
//! the thread harness. See issue 6.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bus;
pub mod grace;
pub mod harness;
pub mod peers;
pub mod read;
pub mod report;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vm;
