//! [`IoDevice`], what a device implements, and [`Declined`].

/// "Not for me": a device's answer to an access it does not handle.
/// Dispatch then tries the next device whose range covers the access.
///
/// ```
/// use kvm_bus::Declined;
/// let r: Result<(), Declined> = Err(Declined);
/// assert_eq!(r, Err(Declined));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Declined;

/// A device on an I/O bus.
///
/// Methods take `&self` because many vCPU threads dispatch to the same
/// device at once; use interior mutability (atomics, a mutex) for state.
/// `addr` is the absolute bus address of the access, which lies inside the
/// range the device was registered with; `data.len()` is 1 to
/// [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN).
///
/// A handler runs inside an SRCU read section: it may block (briefly:
/// every blocking unregister of the domain waits for it), and it may
/// reconfigure the [`Buses`](crate::Buses) it is on through the operations
/// that do not wait for a grace period:
/// [`move_range`](crate::Buses::move_range) (a guest relocating a BAR),
/// [`start_unregister`](crate::Buses::start_unregister) (a guest ejecting a
/// device), registration. A blocking unregister would wait for the section
/// the handler is running in, so it returns
/// [`BusError::InReadSection`](crate::BusError::InReadSection) instead and
/// changes nothing. A handler must not wait for a thread that updates the
/// same buses and holds the slots lock meanwhile (only the stall hook
/// would report that deadlock).
/// A handler that panics ends the read section during unwinding and
/// leaves the bus usable; the vCPU-exit adapter (`kvm_bus::kvm::run_vcpu`)
/// catches the panic and reports it to its caller as a value.
///
/// Several devices may cover one address (as in Linux, several ioeventfd
/// doorbells with different data matches): a device that returns
/// [`Declined`] passes the access on to the next one. A device that
/// declines a read should leave `data` alone.
///
/// ```
/// use kvm_bus::{Declined, IoDevice};
/// use std::sync::atomic::{AtomicU8, Ordering};
///
/// /// One byte of scratch register; ignores wider accesses.
/// struct Scratch(AtomicU8);
///
/// impl IoDevice for Scratch {
///     fn read(&self, _addr: u64, data: &mut [u8]) -> Result<(), Declined> {
///         let [b] = data else { return Err(Declined) };
///         *b = self.0.load(Ordering::Relaxed);
///         Ok(())
///     }
///     fn write(&self, _addr: u64, data: &[u8]) -> Result<(), Declined> {
///         let [b] = data else { return Err(Declined) };
///         self.0.store(*b, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// let s = Scratch(AtomicU8::new(0));
/// s.write(0x80, &[7]).unwrap();
/// let mut b = [0];
/// s.read(0x80, &mut b).unwrap();
/// assert_eq!(b, [7]);
/// assert_eq!(s.write(0x80, &[1, 2]), Err(Declined));
/// ```
pub trait IoDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `addr`: fill `data`, or
    /// decline.
    fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), Declined>;

    /// A guest write of `data` at `addr`: handle it, or decline.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Declined>;
}
