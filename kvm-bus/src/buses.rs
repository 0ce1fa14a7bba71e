//! [`Buses`]: a VM's buses, its SRCU domain and its slots lock, with the
//! three accessors and the update side.

use crate::bus::IoBus;
use crate::device::IoDevice;
use crate::error::BusError;
use crate::kind::BusKind;
use crate::range::IoRange;
use crate::MAX_IO_BUS_DEVICES;
use core::fmt;
use core::sync::atomic::{fence, Ordering};
use srcu::{Classic, Fast, Flavor, ReadGuard, Srcu, SrcuCell, UpdateGuard, UpdateLock};
use std::sync::Arc;

/// The I/O buses of one VM: one [`IoBus`] per [`BusKind`], each in an
/// [`SrcuCell`], the VM's [`Srcu`] domain, and the slots lock that
/// serialises updates (Linux `kvm->buses[]`, `kvm->srcu`,
/// `kvm->slots_lock`).
///
/// * Read side (vCPU threads): [`read`](Buses::read),
///   [`write`](Buses::write), or, for a caller that holds a read section
///   over a whole exit, [`read_lock`](Buses::read_lock) then
///   [`get_bus_srcu`](Buses::get_bus_srcu).
/// * Update side (VMM threads): [`lock_slots`](Buses::lock_slots), then
///   [`register_dev`](Buses::register_dev) and friends, or
///   [`get_bus`](Buses::get_bus) to inspect.
/// * Teardown: [`get_bus_for_destruction`](Buses::get_bus_for_destruction).
///
/// See the [crate documentation](crate) for the guarantees.
pub struct Buses<F: Flavor = Classic> {
    cells: [SrcuCell<IoBus>; 3],
    slots: UpdateLock<Registry>,
    max_devices: usize,
    srcu: Srcu<F>,
}

/// The strong counts of the devices on the buses, one per table entry,
/// per bus; guarded by the slots lock. Tables hold non-owning copies (see
/// `bus.rs`), so this is what keeps devices alive; a device's counts are
/// dropped by `unregister_many` only after the grace period that follows
/// the unpublish of the last table that contained it, and by `take_devices`
/// / drop of the `Buses` (exclusive access: no reader).
#[derive(Default)]
struct Registry {
    /// Mutated only through `&mut SlotsGuard` (the update methods), which
    /// also excludes every `&IoBus` that [`Buses::get_bus`] handed out
    /// under the same guard.
    owned: [Vec<Arc<dyn IoDevice>>; 3],
}

/// Proof that the slots lock of one [`Buses`] is held; from
/// [`Buses::lock_slots`]. Unlocks on drop.
///
/// Inspecting ([`Buses::get_bus`]) borrows it shared; updating
/// ([`Buses::register_dev`] and friends) borrows it mutably. So a bus or
/// device reference obtained under the guard cannot be kept across an
/// update made with it, which could free what it points to (the crate's
/// `tests/ui` shows the rejected programs):
///
/// ```compile_fail,E0502
/// use kvm_bus::{Buses, BusKind};
/// let buses = Buses::new();
/// let mut slots = buses.lock_slots();
/// let bus = buses.get_bus(&slots, BusKind::Pio);
/// let _ = buses.unregister_many(&mut slots, BusKind::Pio, &[]);
/// println!("{}", bus.len());
/// ```
///
/// Which `Buses` it belongs to is checked at run time (an id compare):
/// passing the guard of another VM's `Buses` to its update-side methods
/// panics.
#[must_use = "the slots lock is released when the guard is dropped"]
pub struct SlotsGuard<'a> {
    guard: UpdateGuard<'a, Registry>,
    owner: usize,
}

impl fmt::Debug for SlotsGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotsGuard").finish_non_exhaustive()
    }
}

#[cold]
#[inline(never)]
fn foreign_guard() -> ! {
    panic!("kvm-bus: SlotsGuard of another Buses (each VM has its own slots lock)")
}

#[cold]
#[inline(never)]
fn empty_cell() -> ! {
    unreachable!("kvm-bus: a bus cell is never empty while the Buses is shared")
}

impl Buses<Classic> {
    /// Buses on a new classic-flavor domain, with the default cap of
    /// [`MAX_IO_BUS_DEVICES`] entries per bus.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// assert_eq!(buses.max_devices(), kvm_bus::MAX_IO_BUS_DEVICES);
    /// ```
    pub fn new() -> Self {
        Self::with_srcu(Srcu::new(), MAX_IO_BUS_DEVICES)
    }
}

impl Buses<Fast> {
    /// Buses on a new fast-flavor domain (no fence in `read_lock`;
    /// grace periods use `membarrier`), with the default cap.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new_fast();
    /// assert!(buses.get_bus_srcu(&buses.read_lock(), kvm_bus::BusKind::Mmio).is_empty());
    /// ```
    pub fn new_fast() -> Self {
        Self::with_srcu(Srcu::new_fast(), MAX_IO_BUS_DEVICES)
    }
}

impl<F: Flavor> Default for Buses<F> {
    /// Buses on a new domain of flavor `F`, with the default cap.
    fn default() -> Self {
        Self::with_srcu(Srcu::default(), MAX_IO_BUS_DEVICES)
    }
}

impl<F: Flavor> Buses<F> {
    /// Empty buses on the domain `srcu`, each holding at most
    /// `max_devices` entries.
    ///
    /// ```
    /// use kvm_bus::{Buses, Fast, Srcu};
    /// let buses = Buses::with_srcu(Srcu::<Fast>::builder().cpu_slots(4).build(), 16);
    /// assert_eq!(buses.max_devices(), 16);
    /// ```
    pub fn with_srcu(srcu: Srcu<F>, max_devices: usize) -> Self {
        let slots = UpdateLock::new(Registry::default());
        let cells = BusKind::ALL.map(|_| SrcuCell::new(&srcu, &slots, Some(IoBus::empty())));
        Buses {
            cells,
            slots,
            max_devices,
            srcu,
        }
    }

    /// The cap on entries per bus.
    ///
    /// ```
    /// assert_eq!(kvm_bus::Buses::new().max_devices(), 1000);
    /// ```
    pub fn max_devices(&self) -> usize {
        self.max_devices
    }

    /// The VM's SRCU domain (for other SRCU-protected VM state, or
    /// [`Srcu::barrier`] to wait for deferred frees).
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// buses.srcu().synchronize();
    /// ```
    pub fn srcu(&self) -> &Srcu<F> {
        &self.srcu
    }

    /// Enters a read section of the VM's domain (`srcu_read_lock`).
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let g = buses.read_lock();
    /// let _bus = buses.get_bus_srcu(&g, kvm_bus::BusKind::Pio);
    /// ```
    #[inline]
    pub fn read_lock(&self) -> ReadGuard<'_, F> {
        self.srcu.read_lock()
    }

    /// Takes the slots lock, blocking while another updater holds it. The
    /// guard is the proof the update-side methods ask for: shared for
    /// [`get_bus`](Buses::get_bus), mutable for the updates.
    ///
    /// **Deadlock risk inside a read section.** An unregister holds the
    /// slots lock across its grace period, and that grace period waits for
    /// every read section in progress. So a thread inside a read section
    /// of this domain (a device handler during dispatch, or a holder of
    /// [`read_lock`](Buses::read_lock)) that calls `lock_slots` while
    /// another thread is unregistering waits for that thread, which waits
    /// for it: neither returns. The unregister methods detect only the
    /// self-wait ([`BusError::InReadSection`]); they cannot see this one.
    /// A device handler that wants to change the buses should hand the
    /// request to a VMM thread that is outside any section instead of
    /// taking the lock itself.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let slots = buses.lock_slots();
    /// let _bus = buses.get_bus(&slots, kvm_bus::BusKind::Mmio);
    /// ```
    pub fn lock_slots(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            guard: self.slots.lock(),
            owner: self.owner_id(),
        }
    }

    fn owner_id(&self) -> usize {
        &self.slots as *const UpdateLock<Registry> as usize
    }

    #[inline]
    fn check(&self, slots: &SlotsGuard<'_>) {
        if slots.owner != self.owner_id() {
            foreign_guard();
        }
    }

    /// The current bus, for an updater holding the slots lock (Linux
    /// `kvm_get_bus`, `rcu_dereference_protected`). No barrier: the lock
    /// orders this after every update. The reference cannot outlive the
    /// guard, so no reader can keep a long-term reference obtained this
    /// way.
    ///
    /// # Panics
    ///
    /// If `slots` is the guard of another `Buses` (a checked id).
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let slots = buses.lock_slots();
    /// assert!(buses.get_bus(&slots, kvm_bus::BusKind::FastMmio).is_empty());
    /// ```
    pub fn get_bus<'a>(&'a self, slots: &'a SlotsGuard<'_>, kind: BusKind) -> &'a IoBus {
        self.check(slots);
        match self.cells[kind.index()].dereference_protected(&slots.guard) {
            Some(bus) => bus,
            None => empty_cell(),
        }
    }

    /// The current bus, for a reader (Linux `kvm_get_bus_srcu`): barrier
    /// `smp_mb__after_srcu_read_lock()`
    /// ([`ReadGuard::mb_after_read_lock`]), then `srcu_dereference`. This
    /// is the read path: no lock, allocation or system call.
    ///
    /// The barrier gives the observation guarantee: if this thread saw,
    /// before the section began, anything stored after a
    /// [`register_dev`](Buses::register_dev) returned (guest memory
    /// included), the bus returned here contains the device.
    ///
    /// The reference borrows both the guard and `self`: it cannot outlive
    /// the read section.
    ///
    /// # Panics
    ///
    /// If `guard` is a section of another domain than
    /// [`srcu()`](Buses::srcu) (checked by [`SrcuCell::dereference`]).
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let g = buses.read_lock();
    /// let bus = buses.get_bus_srcu(&g, kvm_bus::BusKind::Mmio);
    /// assert!(bus.get_dev(0x1000).is_none());
    /// ```
    #[inline]
    pub fn get_bus_srcu<'g>(&'g self, guard: &'g ReadGuard<'_, F>, kind: BusKind) -> &'g IoBus {
        guard.mb_after_read_lock();
        match self.cells[kind.index()].dereference(guard) {
            Some(bus) => bus,
            None => empty_cell(),
        }
    }

    /// The bus with exclusive access, for teardown (Linux
    /// `kvm_get_bus_for_destruction`): `&mut self` proves that no reader
    /// and no updater is using the buses, so this needs neither a guard nor
    /// a barrier. It hands out a shared reference: tables must stay inside
    /// their `Buses` (their device pointers are backed by its registry).
    ///
    /// ```
    /// let mut buses = kvm_bus::Buses::new();
    /// assert!(buses.get_bus_for_destruction(kvm_bus::BusKind::Pio).is_empty());
    /// ```
    pub fn get_bus_for_destruction(&mut self, kind: BusKind) -> &IoBus {
        match self.cells[kind.index()].get_mut() {
            Some(bus) => bus,
            None => empty_cell(),
        }
    }

    /// Teardown: empties bus `kind` and returns its entries, in table
    /// order, with the strong counts the buses held for them. Exclusive
    /// access (`&mut self`) proves no reader can still dispatch to them.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusKind, Declined, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: u64, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: u64, _: &[u8]) -> Result<(), Declined> { Ok(()) }
    /// }
    /// let mut buses = Buses::new();
    /// let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    /// buses.register_dev(&mut buses.lock_slots(), BusKind::Pio, IoRange::new(0x70, 2)?, dev.clone())?;
    /// let devs = buses.take_devices(BusKind::Pio);
    /// assert_eq!(devs.len(), 1);
    /// assert!(buses.get_bus_for_destruction(BusKind::Pio).is_empty());
    /// drop(devs);
    /// assert_eq!(Arc::strong_count(&dev), 1); // the buses kept nothing
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn take_devices(&mut self, kind: BusKind) -> Vec<(IoRange, Arc<dyn IoDevice>)> {
        let devices: Vec<_> = self
            .get_bus_for_destruction(kind)
            .iter()
            .map(|(range, dev)| (range, dev.clone()))
            .collect();
        // No reader and no updater exists (`&mut self`; every read section
        // of the domain borrows `self`): the old table can go at once,
        // without a grace period (so this never waits, whatever section
        // the calling thread may be in), and so can the registry's counts
        // (the clones above now own the devices).
        match self.cells[kind.index()].get_mut() {
            Some(bus) => *bus = IoBus::empty(),
            None => empty_cell(),
        }
        self.slots.lock().owned[kind.index()].clear();
        devices
    }

    /// Dispatches a read (Linux `kvm_io_bus_read`): enters a read section,
    /// [`get_bus_srcu`](Buses::get_bus_srcu), [`IoBus::read`].
    ///
    /// # Errors
    ///
    /// [`BusError::InvalidAccessLength`] for an empty or over-long `data`,
    /// [`BusError::Unhandled`] if no device accepted.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind};
    /// let buses = Buses::new();
    /// let mut b = [0u8; 2];
    /// assert_eq!(buses.read(BusKind::Pio, 0x3f8, &mut b), Err(BusError::Unhandled { addr: 0x3f8, len: 2 }));
    /// ```
    #[inline]
    pub fn read(&self, kind: BusKind, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let guard = self.read_lock();
        self.get_bus_srcu(&guard, kind).read(addr, data)
    }

    /// Dispatches a write (Linux `kvm_io_bus_write`); see
    /// [`read`](Buses::read).
    ///
    /// # Errors
    ///
    /// As [`read`](Buses::read).
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind};
    /// let buses = Buses::new();
    /// assert_eq!(
    ///     buses.write(BusKind::Mmio, 0, &[0; 16]),
    ///     Err(BusError::InvalidAccessLength { addr: 0, len: 16 })
    /// );
    /// ```
    #[inline]
    pub fn write(&self, kind: BusKind, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let guard = self.read_lock();
        self.get_bus_srcu(&guard, kind).write(addr, data)
    }

    /// [`IoBus::write_cookie`] in a read section of its own (Linux
    /// `kvm_io_bus_write_cookie`).
    ///
    /// # Errors
    ///
    /// As [`read`](Buses::read).
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind};
    /// let buses = Buses::new();
    /// assert!(matches!(buses.write_cookie(BusKind::FastMmio, usize::MAX, 0x1000, &[1]), Err(BusError::Unhandled { .. })));
    /// ```
    #[inline]
    pub fn write_cookie(
        &self,
        kind: BusKind,
        cookie: usize,
        addr: u64,
        data: &[u8],
    ) -> Result<usize, BusError> {
        let guard = self.read_lock();
        self.get_bus_srcu(&guard, kind)
            .write_cookie(cookie, addr, data)
    }

    /// [`read`](Buses::read) inside a read section the caller already
    /// holds (e.g. over a whole vCPU exit).
    ///
    /// # Errors
    ///
    /// As [`read`](Buses::read).
    ///
    /// # Panics
    ///
    /// If `guard` belongs to another domain.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let g = buses.read_lock();
    /// assert!(buses.read_srcu(&g, kvm_bus::BusKind::Pio, 0x60, &mut [0]).is_err());
    /// ```
    #[inline]
    pub fn read_srcu(
        &self,
        guard: &ReadGuard<'_, F>,
        kind: BusKind,
        addr: u64,
        data: &mut [u8],
    ) -> Result<(), BusError> {
        self.get_bus_srcu(guard, kind).read(addr, data)
    }

    /// [`write`](Buses::write) inside a read section the caller already
    /// holds.
    ///
    /// # Errors
    ///
    /// As [`read`](Buses::read).
    ///
    /// # Panics
    ///
    /// If `guard` belongs to another domain.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// let g = buses.read_lock();
    /// assert!(buses.write_srcu(&g, kvm_bus::BusKind::Pio, 0x60, &[0]).is_err());
    /// ```
    #[inline]
    pub fn write_srcu(
        &self,
        guard: &ReadGuard<'_, F>,
        kind: BusKind,
        addr: u64,
        data: &[u8],
    ) -> Result<(), BusError> {
        self.get_bus_srcu(guard, kind).write(addr, data)
    }

    /// The first device covering the byte at `addr` (Linux
    /// `kvm_io_bus_get_dev`), as a new reference that stays valid after
    /// the read section.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// assert!(buses.get_dev(kvm_bus::BusKind::Mmio, 0).is_none());
    /// ```
    pub fn get_dev(&self, kind: BusKind, addr: u64) -> Option<Arc<dyn IoDevice>> {
        let guard = self.read_lock();
        self.get_bus_srcu(&guard, kind).get_dev(addr).cloned()
    }

    /// Registers `dev` at `range` (Linux `kvm_io_bus_register_dev`):
    /// builds a new table with the device, publishes it, and hands the old
    /// one to `call_srcu`. Never waits for a grace period (but the slots
    /// lock it needs is held by an unregister across its grace period, so
    /// [`lock_slots`](Buses::lock_slots) may wait for one).
    ///
    /// Readers that began before the publish may still dispatch on the old
    /// table; see the [crate documentation](crate) for what is
    /// guaranteed. Equal ranges are tried in registration order.
    ///
    /// # Errors
    ///
    /// [`BusError::BusFull`] if the bus already holds
    /// [`max_devices`](Buses::max_devices) entries; the bus is unchanged.
    ///
    /// # Panics
    ///
    /// If `slots` is the guard of another `Buses`.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind, Declined, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Port80;
    /// impl IoDevice for Port80 {
    ///     fn read(&self, _: u64, d: &mut [u8]) -> Result<(), Declined> { d.fill(0xff); Ok(()) }
    ///     fn write(&self, _: u64, _: &[u8]) -> Result<(), Declined> { Ok(()) }
    /// }
    /// let buses = Buses::new();
    /// buses.register_dev(&mut buses.lock_slots(), BusKind::Pio, IoRange::new(0x80, 1)?, Arc::new(Port80))?;
    /// let mut b = [0];
    /// buses.read(BusKind::Pio, 0x80, &mut b)?;
    /// assert_eq!(b, [0xff]);
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn register_dev(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        range: IoRange,
        dev: Arc<dyn IoDevice>,
    ) -> Result<(), BusError> {
        self.register_many(slots, kind, [(range, dev)])
    }

    /// Registers a batch with one publish (VM start-up): all or nothing.
    /// An empty batch changes nothing. Never waits for a grace period (the
    /// slots lock it needs may: see [`register_dev`](Buses::register_dev)).
    ///
    /// # Errors
    ///
    /// [`BusError::BusFull`] if the bus cannot take the whole batch; the
    /// bus is unchanged.
    ///
    /// # Panics
    ///
    /// If `slots` is the guard of another `Buses`.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind, Declined, IoDevice, IoRange, Srcu};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: u64, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: u64, _: &[u8]) -> Result<(), Declined> { Ok(()) }
    /// }
    /// let buses = Buses::with_srcu(Srcu::new(), 3);
    /// let mut slots = buses.lock_slots();
    /// let batch = |n: u64| (0..n).map(|i| (IoRange::new(0x100 * i, 4).unwrap(), Arc::new(Sink) as Arc<dyn IoDevice>));
    /// assert_eq!(buses.register_many(&mut slots, BusKind::Mmio, batch(4)), Err(BusError::BusFull { kind: BusKind::Mmio, max: 3 }));
    /// assert!(buses.get_bus(&slots, BusKind::Mmio).is_empty()); // all or nothing
    /// buses.register_many(&mut slots, BusKind::Mmio, batch(3))?;
    /// assert_eq!(buses.get_bus(&slots, BusKind::Mmio).len(), 3);
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn register_many(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        devs: impl IntoIterator<Item = (IoRange, Arc<dyn IoDevice>)>,
    ) -> Result<(), BusError> {
        self.check(slots);
        let mut new: Vec<_> = devs.into_iter().collect();
        if new.is_empty() {
            return Ok(());
        }
        let bus = self.get_bus(slots, kind);
        let full = BusError::BusFull {
            kind,
            max: self.max_devices,
        };
        match bus.len().checked_add(new.len()) {
            Some(n) if n <= self.max_devices => {}
            _ => return Err(full),
        }
        // SAFETY: the counts of `new` move into the registry right below,
        // under the same slots lock, and stay there until unregistration
        // has waited for a grace period after this table (and any later one
        // holding the device) was unpublished.
        let new_bus = unsafe { bus.with_added(&mut new) };
        slots.guard.owned[kind.index()].extend(new.into_iter().map(|(_, d)| d));
        let old = self.cells[kind.index()].assign(new_bus, &mut slots.guard);
        // Writer half of the observation guarantee: orders the publish
        // before every store this thread makes after returning (a flag, a
        // reply to the guest), pairing with the reader's barrier in
        // `get_bus_srcu` (`mb_after_read_lock`, or B of a classic
        // `read_lock`). Free on x86_64 after the locked swap of `assign`.
        fence(Ordering::SeqCst);
        drop(old); // the table's memory, freed by call_srcu: no wait here

        Ok(())
    }

    /// Unregisters `dev` (Linux `kvm_io_bus_unregister_dev`): removes
    /// every entry of that device (compared by address, `Arc::ptr_eq`),
    /// publishes the new table, waits for a grace period, frees the old
    /// table and releases the buses' references to `dev` before returning.
    /// Afterwards no dispatch calls `dev` and the buses hold no reference to
    /// it (older tables still queued for their deferred free hold only
    /// non-owning pointers that nothing follows any more).
    ///
    /// Called from a device handler of these buses, or anywhere else
    /// inside a read section of their domain on the calling thread, it
    /// would wait for a grace period that waits for the caller itself:
    /// it returns [`BusError::InReadSection`] instead, checked before
    /// anything changes (release and debug builds alike). See
    /// [`lock_slots`](Buses::lock_slots) for the deadlock a handler risks
    /// by taking the slots lock at all.
    ///
    /// # Errors
    ///
    /// [`BusError::InReadSection`] if the calling thread is inside a read
    /// section of [`srcu()`](Buses::srcu) ([`Srcu::in_read_section`]);
    /// [`BusError::NotRegistered`] if `dev` is not on the bus. Either way
    /// the bus is unchanged and nothing waits.
    ///
    /// # Panics
    ///
    /// If `slots` is the guard of another `Buses`.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind, Declined, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: u64, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: u64, _: &[u8]) -> Result<(), Declined> { Ok(()) }
    /// }
    /// let buses = Buses::new();
    /// let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x60, 1)?, dev.clone())?;
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x64, 1)?, dev.clone())?;
    /// buses.unregister_dev(&mut slots, BusKind::Pio, &dev)?;
    /// assert_eq!(Arc::strong_count(&dev), 1); // the buses let go of it
    /// assert_eq!(buses.unregister_dev(&mut slots, BusKind::Pio, &dev), Err(BusError::NotRegistered { kind: BusKind::Pio }));
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn unregister_dev(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        dev: &Arc<dyn IoDevice>,
    ) -> Result<(), BusError> {
        self.unregister_many(slots, kind, core::slice::from_ref(dev))
    }

    /// Unregisters a batch with one publish and one grace period for all
    /// of it (the kernel waits one per device). All or nothing. An empty
    /// batch changes nothing and does not wait.
    ///
    /// Afterwards the buses hold no reference to any of `devs`: older
    /// tables still queued for their deferred free hold only non-owning
    /// pointers, and no reader can reach them any more.
    ///
    /// Inside a read section of this domain it fails as
    /// [`unregister_dev`](Buses::unregister_dev) does, even for an empty
    /// batch.
    ///
    /// # Errors
    ///
    /// [`BusError::InReadSection`] if the calling thread is inside a read
    /// section of [`srcu()`](Buses::srcu); [`BusError::NotRegistered`] if
    /// any of `devs` is not on the bus. Either way the bus is unchanged and
    /// nothing waits.
    ///
    /// # Panics
    ///
    /// If `slots` is the guard of another `Buses`.
    ///
    /// ```
    /// use kvm_bus::{Buses, BusError, BusKind, Declined, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Doorbell;
    /// impl IoDevice for Doorbell {
    ///     fn read(&self, _: u64, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: u64, _: &[u8]) -> Result<(), Declined> { Ok(()) }
    /// }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// let bells: Vec<Arc<dyn IoDevice>> = (0..200).map(|_| Arc::new(Doorbell) as _).collect();
    /// buses.register_many(&mut slots, BusKind::FastMmio, bells.iter().enumerate().map(|(i, d)| {
    ///     (IoRange::new(0xfe00_0000 + 4 * i as u64, 4).unwrap(), d.clone())
    /// }))?;
    /// let before = buses.srcu().completed_grace_periods();
    /// buses.unregister_many(&mut slots, BusKind::FastMmio, &bells)?;
    /// assert!(buses.get_bus(&slots, BusKind::FastMmio).is_empty());
    /// assert!(buses.srcu().completed_grace_periods() - before < 10); // not 200
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn unregister_many(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        devs: &[Arc<dyn IoDevice>],
    ) -> Result<(), BusError> {
        self.check(slots);
        // Before anything changes: the grace period below would wait for
        // the caller's own section (Stale::synchronize* panics then; before
        // it checked, this published the new table and then hung).
        if self.srcu.in_read_section() {
            return Err(BusError::InReadSection { kind });
        }
        if devs.is_empty() {
            return Ok(());
        }
        let mut gone: Vec<*const ()> = devs.iter().map(dev_addr).collect();
        gone.sort_unstable();
        gone.dedup();
        let bus = self.get_bus(slots, kind);
        let mut present: Vec<*const ()> = bus.iter().map(|(_, d)| dev_addr(d)).collect();
        present.sort_unstable();
        if gone.iter().any(|g| present.binary_search(g).is_err()) {
            return Err(BusError::NotRegistered { kind });
        }
        let is_gone = |d: &Arc<dyn IoDevice>| gone.binary_search(&dev_addr(d)).is_ok();
        let new_bus = bus.without(is_gone);
        let old = self.cells[kind.index()].assign(new_bus, &mut slots.guard);
        // One grace period: every table that holds `devs` (this one and
        // older ones still queued for their deferred free) was unpublished
        // before it began, so afterwards no reader can reach them...
        // Expedited, as Linux's kvm_io_bus_unregister_dev: the caller is
        // waiting (hot-unplug, VM reset), not a background reclaimer.
        drop(old.map(srcu::Stale::synchronize_expedited));
        // ...and the registry may let go of the devices. (The queued old
        // tables only hold non-owning pointers they never follow again.)
        slots.guard.owned[kind.index()].retain(|d| !is_gone(d));
        Ok(())
    }
}

/// The address of a device's data (the vtable part of the fat pointer is
/// ignored, as `Arc::ptr_eq` does).
fn dev_addr(d: &Arc<dyn IoDevice>) -> *const () {
    Arc::as_ptr(d).cast::<()>()
}

impl<F: Flavor> fmt::Debug for Buses<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buses")
            .field("srcu", &self.srcu)
            .field("max_devices", &self.max_devices)
            .finish_non_exhaustive()
    }
}
