//! placeholder for the kvm-ioctls adapter
