//! placeholder: the kvm-bus core is being written (bus.rs, buses.rs, device.rs, error.rs, range.rs).

/// The kvm-ioctls vCPU-exit adapter (issue 5).
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
