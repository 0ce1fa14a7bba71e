//! [`Removal`]: an unregistration that has unpublished its devices and
//! completes after a grace period, without making its caller wait.

use crate::device::IoDevice;
use crate::error::BusError;
use crate::kind::BusKind;
use std::sync::Arc;

/// A removal started by [`Buses::start_unregister`](crate::Buses::start_unregister)
/// (or `_many`, `_range`): the devices are already unreachable for every
/// access that starts from now on, and the removal *completes* after a
/// grace period, when no access that started before can still be running.
/// From then on the buses hold no reference to the devices and never call
/// them again.
///
/// This is what a device handler uses to eject its own device (or any
/// other) from inside a read section: starting needs no grace period, so
/// it cannot deadlock on the handler's own section. Then, from a thread
/// that holds no read section of the buses' domain:
///
/// * [`wait`](Removal::wait) blocks until complete (an expedited grace
///   period, as a blocking unregister);
/// * [`is_complete`](Removal::is_complete) polls, never blocks;
/// * [`on_complete`](Removal::on_complete) runs a closure when complete
///   (on the domain's callback worker), e.g. to notify a VMM thread;
/// * dropping it completes the removal in the background.
///
/// Until then the `Removal` owns the references the buses held for the
/// removed entries (one per entry), and releases them on completion.
///
/// ```
/// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
/// use std::sync::Arc;
/// struct Nic;
/// impl IoDevice for Nic {
///     fn read(&self, _: Access, d: &mut [u8]) -> Result<(), Declined> { d.fill(0); Ok(()) }
///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
/// }
/// let buses = Buses::new();
/// let nic: Arc<dyn IoDevice> = Arc::new(Nic);
/// let mut slots = buses.lock_slots();
/// buses.register_dev(&mut slots, BusKind::Mmio, IoRange::new(0xd000_0000, 0x100)?, nic.clone())?;
/// let removal = buses.start_unregister(&mut slots, BusKind::Mmio, &nic)?; // no wait
/// drop(slots);
/// assert!(buses.get_dev(BusKind::Mmio, 0xd000_0000).is_none()); // unpublished at once
/// removal.wait()?;                                              // complete
/// assert_eq!(Arc::strong_count(&nic), 1);                       // the buses let go
/// # Ok::<(), kvm_bus::BusError>(())
/// ```
#[must_use = "dropping a Removal completes it in the background; wait() to know when"]
pub struct Removal {
    kind: BusKind,
    devices: srcu::Stale<Vec<Arc<dyn IoDevice>>>,
}

impl Removal {
    pub(crate) fn new(kind: BusKind, devices: srcu::Stale<Vec<Arc<dyn IoDevice>>>) -> Removal {
        Removal { kind, devices }
    }

    /// The bus the devices were removed from.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// True once the removal is complete: no access can still be running
    /// in a removed device's handler (through these entries). Never
    /// blocks; polling alone completes it (the callback worker drives the
    /// grace period).
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// # struct Sink;
    /// # impl IoDevice for Sink {
    /// #     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    /// #     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// # }
    /// let buses = Buses::new();
    /// let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x70, 2)?, dev.clone())?;
    /// let removal = buses.start_unregister(&mut slots, BusKind::Pio, &dev)?;
    /// while !removal.is_complete() {
    ///     std::thread::yield_now();
    /// }
    /// removal.wait()?; // returns at once
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn is_complete(&self) -> bool {
        self.devices.is_complete()
    }

    /// Blocks until the removal is complete, then releases the buses'
    /// references to the devices.
    ///
    /// # Errors
    ///
    /// [`BusError::InReadSection`] if the calling thread is inside a read
    /// section of the buses' domain (it would wait for itself). The
    /// removal then still completes, in the background.
    pub fn wait(self) -> Result<(), BusError> {
        if self.devices.in_read_section() {
            return Err(BusError::InReadSection { kind: self.kind });
        }
        drop(self.devices.synchronize_expedited());
        Ok(())
    }

    /// Runs `f` once the removal is complete, after releasing the buses'
    /// references, on the domain's callback worker. Never blocks.
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// # struct Sink;
    /// # impl IoDevice for Sink {
    /// #     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    /// #     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// # }
    /// let buses = Buses::new();
    /// let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x70, 2)?, dev.clone())?;
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// buses.start_unregister(&mut slots, BusKind::Pio, &dev)?.on_complete(move || tx.send(()).unwrap());
    /// rx.recv().unwrap();
    /// assert_eq!(Arc::strong_count(&dev), 1);
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn on_complete(self, f: impl FnOnce() + Send + 'static) {
        self.devices.then(move |devices| {
            drop(devices);
            f();
        });
    }
}

impl core::fmt::Debug for Removal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Removal")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}
