//! What a device implements: [`IoDevice`] (`&self`) or [`MutIoDevice`]
//! (`&mut self`, behind a `Mutex`), what it receives ([`Access`]) and what
//! it may answer ([`Declined`], a [`Completion`]).

use std::sync::{Arc, Barrier, Mutex, PoisonError};

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

/// Where an access landed and who made it: what a handler receives besides
/// the data.
///
/// `base` is the start of the registered range that matched, `offset` the
/// position of the access inside it: the `(base, offset)` pair of
/// vm-device, cloud-hypervisor and Firecracker, so a device registered at
/// several ranges (an i8042 at 0x60 and 0x64) can tell which one was hit.
/// `vcpu` is the index of the vCPU whose exit is being dispatched, where
/// there is one (the exit adapter passes it, as crosvm's `BusAccessInfo`
/// does); a VMM thread calling [`Buses::read`](crate::Buses::read) passes
/// none.
///
/// ```
/// let a = kvm_bus::Access::new(0x3f8, 5, Some(1));
/// assert_eq!(a.addr(), 0x3fd);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Access {
    /// Start of the matched range.
    pub base: u64,
    /// Offset of the access inside it.
    pub offset: u64,
    /// The vCPU that made the access, if known.
    pub vcpu: Option<u32>,
}

impl Access {
    /// An access at `base + offset` (for tests and for VMM code that calls
    /// a device directly).
    pub const fn new(base: u64, offset: u64, vcpu: Option<u32>) -> Access {
        Access { base, offset, vcpu }
    }

    /// The absolute bus address: `base + offset`.
    pub const fn addr(&self) -> u64 {
        self.base.wrapping_add(self.offset)
    }
}

/// Something the vCPU waits for after the access's read section has ended:
/// cloud-hypervisor's `Option<Arc<Barrier>>` from `BusDevice::write`.
///
/// A write handler that hands work to another thread (reprogramming a BAR
/// in the device manager, say) and needs the vCPU to stay out of the guest
/// until that work is done returns one. The exit adapter
/// (`kvm::run_vcpu`, feature `kvm`) and [`Buses::write`](crate::Buses::write)
/// wait on it *after* leaving the read section: waiting inside would hold
/// back every grace period, so every `unregister_dev`, for as long as the
/// other thread takes.
///
/// ```
/// use kvm_bus::Completion;
/// use std::sync::{Arc, Barrier};
/// let b = Arc::new(Barrier::new(2));
/// let c = Completion::from(b.clone());
/// let t = std::thread::spawn(move || b.wait()); // the device manager
/// c.wait();                                     // the vCPU
/// t.join().unwrap();
/// ```
#[derive(Clone, Debug)]
#[must_use = "a completion is something the vCPU must wait for"]
pub struct Completion(Arc<Barrier>);

impl Completion {
    /// Waits for the other parties of the barrier.
    pub fn wait(self) {
        self.0.wait();
    }
}

impl PartialEq for Completion {
    /// The same barrier (`Arc::ptr_eq`).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Completion {}

impl From<Arc<Barrier>> for Completion {
    fn from(b: Arc<Barrier>) -> Completion {
        Completion(b)
    }
}

/// What a write handler returns: handled (with, rarely, a [`Completion`] to
/// wait for), or [`Declined`].
pub type WriteResult = Result<Option<Completion>, Declined>;

/// A device on an I/O bus that synchronises itself (`&self`).
///
/// Many vCPU threads may dispatch to the same device at once; use interior
/// mutability (atomics, a lock) for state. For the common plain device with
/// `&mut self` methods, implement [`MutIoDevice`] instead and register it
/// inside a `std::sync::Mutex` (which implements this trait, one lock per
/// device, taken inside the read section).
///
/// `access` says where the access landed ([`Access`]); `data.len()` is 1
/// to [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN).
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
/// would report that deadlock); to make the vCPU wait for such work,
/// return a [`Completion`].
/// A handler that panics ends the read section during unwinding and
/// leaves the bus usable; the vCPU-exit adapter (`kvm_bus::kvm::run_vcpu`)
/// catches the panic and reports it to its caller as a value.
///
/// Several devices may cover one address (as in Linux, several ioeventfd
/// doorbells with different data matches): a device that returns
/// [`Declined`] (the kernel's `-EOPNOTSUPP`) passes the access on to the
/// next one. A device that declines a read should leave `data` alone.
///
/// ```
/// use kvm_bus::{Access, Declined, IoDevice, WriteResult};
/// use std::sync::atomic::{AtomicU8, Ordering};
///
/// /// One byte of scratch register; ignores wider accesses.
/// struct Scratch(AtomicU8);
///
/// impl IoDevice for Scratch {
///     fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
///         let [b] = data else { return Err(Declined) };
///         *b = self.0.load(Ordering::Relaxed);
///         Ok(())
///     }
///     fn write(&self, _: Access, data: &[u8]) -> WriteResult {
///         let [b] = data else { return Err(Declined) };
///         self.0.store(*b, Ordering::Relaxed);
///         Ok(None)
///     }
/// }
/// let s = Scratch(AtomicU8::new(0));
/// let at = Access::new(0x80, 0, None);
/// s.write(at, &[7]).unwrap();
/// let mut b = [0];
/// s.read(at, &mut b).unwrap();
/// assert_eq!(b, [7]);
/// assert!(s.write(at, &[1, 2]).is_err());
/// ```
pub trait IoDevice: Send + Sync {
    /// A guest read of `data.len()` bytes at `access`: fill `data`, or
    /// decline.
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined>;

    /// A guest write of `data` at `access`: handle it (optionally asking
    /// the vCPU to wait for a [`Completion`]), or decline.
    fn write(&self, access: Access, data: &[u8]) -> WriteResult;
}

/// The `&mut self` twin of [`IoDevice`], for the plain device whose state
/// is not synchronised (vm-device's `MutDevicePio`, cloud-hypervisor's and
/// Firecracker's `BusDevice`). Register it as `Mutex::new(device)`:
/// `std::sync::Mutex<D>` implements [`IoDevice`] by taking the lock inside
/// the read section, one lock per device.
///
/// A device that panicked while holding its lock poisoned it; the mutex
/// adapter goes on with the state as the panic left it (the exit adapter
/// already reported the panic), as a real device would after a glitch.
///
/// ```
/// use kvm_bus::{Access, Buses, BusKind, Declined, IoRange, MutIoDevice, WriteResult};
/// use std::sync::{Arc, Mutex};
///
/// struct Cmos { index: u8, ram: [u8; 128] }
///
/// impl MutIoDevice for Cmos {
///     fn read(&mut self, a: Access, data: &mut [u8]) -> Result<(), Declined> {
///         data[0] = if a.offset == 1 { self.ram[usize::from(self.index & 0x7f)] } else { self.index };
///         Ok(())
///     }
///     fn write(&mut self, a: Access, data: &[u8]) -> WriteResult {
///         match a.offset {
///             0 => self.index = data[0],
///             _ => self.ram[usize::from(self.index & 0x7f)] = data[0],
///         }
///         Ok(None)
///     }
/// }
///
/// let buses = Buses::new();
/// let mut slots = buses.lock_slots();
/// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x70, 2)?, Arc::new(Mutex::new(Cmos { index: 0, ram: [0; 128] })))?;
/// drop(slots);
/// buses.write(BusKind::Pio, 0x70, &[0x0f])?;
/// buses.write(BusKind::Pio, 0x71, &[0x42])?;
/// let mut v = [0];
/// buses.read(BusKind::Pio, 0x71, &mut v)?;
/// assert_eq!(v, [0x42]);
/// # Ok::<(), kvm_bus::BusError>(())
/// ```
pub trait MutIoDevice: Send {
    /// A guest read; see [`IoDevice::read`].
    fn read(&mut self, access: Access, data: &mut [u8]) -> Result<(), Declined>;

    /// A guest write; see [`IoDevice::write`].
    fn write(&mut self, access: Access, data: &[u8]) -> WriteResult;
}

impl<D: MutIoDevice> IoDevice for Mutex<D> {
    #[inline]
    fn read(&self, access: Access, data: &mut [u8]) -> Result<(), Declined> {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(access, data)
    }

    #[inline]
    fn write(&self, access: Access, data: &[u8]) -> WriteResult {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(access, data)
    }
}
