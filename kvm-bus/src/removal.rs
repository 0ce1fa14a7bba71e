//! [`Removal`]: an unregistration that has unpublished its devices and
//! completes after a grace period, without making its caller wait.

use crate::device::IoDevice;
use crate::error::BusError;
use crate::kind::BusKind;
use crate::retired::AfterRemoval;
use std::sync::Arc;

/// The references a removal releases on completion, one per entry.
type Released = srcu::Stale<Vec<Arc<dyn IoDevice>>>;

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
    /// `Some` until the removal is waited for, handed to `on_complete` or
    /// dropped.
    devices: Option<Released>,
    /// The retired table of the removal's unpublish, freed on completion.
    tables: AfterRemoval,
}

impl Removal {
    pub(crate) fn new(kind: BusKind, devices: Released, tables: AfterRemoval) -> Removal {
        Removal {
            kind,
            devices: Some(devices),
            tables,
        }
    }

    fn devices(&self) -> &Released {
        self.devices
            .as_ref()
            .expect("a Removal holds its devices until consumed")
    }

    /// Takes the devices and the tables out, leaving nothing for `Drop`.
    fn take(&mut self) -> Option<(Released, AfterRemoval)> {
        let devices = self.devices.take()?;
        Some((
            devices,
            core::mem::replace(&mut self.tables, AfterRemoval::nothing()),
        ))
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
        self.devices().is_complete()
    }

    /// Blocks until the removal is complete, then releases the buses'
    /// references to the devices.
    ///
    /// # Errors
    ///
    /// [`BusError::InReadSection`] if the calling thread is inside a read
    /// section of the buses' domain (it would wait for itself). The
    /// removal then still completes, in the background.
    pub fn wait(mut self) -> Result<(), BusError> {
        if self.devices().in_read_section() {
            return Err(BusError::InReadSection { kind: self.kind });
        }
        let (devices, tables) = self.take().expect("not consumed yet");
        let devices = devices.synchronize_expedited();
        // The grace period covered the removal's retired table: free it
        // here, on a thread that waited anyway. (Tables first: dropping a
        // device runs its `Drop`, which may panic.)
        tables.reclaim_now();
        drop(devices);
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
    pub fn on_complete(mut self, f: impl FnOnce() + Send + 'static) {
        let (devices, tables) = self.take().expect("not consumed yet");
        devices.then(move |devices| {
            tables.after_grace_period();
            drop(devices);
            f();
        });
    }
}

impl Drop for Removal {
    /// Completes the removal in the background, on the callback worker
    /// after its grace period (one callback, as the `Stale` it replaces):
    /// never on the dropping thread, which may be inside a read section,
    /// hold a lock a device's `Drop` takes, or be unwinding.
    fn drop(&mut self) {
        let Some((devices, tables)) = self.take() else {
            return; // waited for, or handed to `on_complete`
        };
        devices.then(move |devices| {
            tables.after_grace_period();
            drop(devices);
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
