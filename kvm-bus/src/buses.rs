//! [`Buses`]: a VM's buses, its SRCU domain and its slots lock, with the
//! three accessors and the update side.

use crate::bus::IoBus;
use crate::device::IoDevice;
use crate::error::BusError;
use crate::kind::BusKind;
use crate::range::IoRange;
use crate::removal::Removal;
use crate::retired::RetiredList;
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
    /// Unpublished tables of every bus, freed once a grace period has
    /// passed (`retired.rs`). Only ever dropped: their device pointers are
    /// never followed again, so they need no counts of their own.
    retired: Arc<RetiredList>,
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
    /// Per bus: refuse ranges that overlap a registered one
    /// ([`Buses::set_reject_overlaps`]).
    reject_overlaps: [bool; 3],
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
            retired: RetiredList::new(),
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

    /// The unpublished tables kept until a grace period lets the updater
    /// free them itself, on its own thread (at most 256 KiB of them; past
    /// that the oldest go to `call_srcu`). No grace period is started for
    /// them: an unregistration frees every one its own grace period
    /// covered, and each update frees up to two whose grace period some
    /// other party completed. Up to 16 KiB of them wait without anything
    /// queued, so that an isolated update (a guest's BAR move) queues no
    /// callback; past that, a trim on the callback worker frees them
    /// within a few milliseconds once updates stop (the table that would
    /// pass 16 KiB carries it, `call_srcu`-style; [`Srcu::barrier`] waits
    /// for it). Dropping the `Buses` frees them all.
    ///
    /// ```
    /// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// let (a, b): (Arc<dyn IoDevice>, Arc<dyn IoDevice>) = (Arc::new(Sink), Arc::new(Sink));
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x70, 2)?, a.clone())?;
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x80, 2)?, b)?;
    /// assert!(buses.retired_tables(&slots).bytes <= 256 << 10);
    /// buses.unregister_dev(&mut slots, BusKind::Pio, &a)?; // waits a grace period
    /// assert_eq!(buses.retired_tables(&slots).tables, 0); // all freed here
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn retired_tables(&self, slots: &SlotsGuard<'_>) -> crate::RetiredTables {
        self.check(slots);
        self.retired.counts()
    }

    /// The VM's SRCU domain (for other SRCU-protected VM state, or
    /// [`Srcu::barrier`] to wait for the deferred frees handed to
    /// `call_srcu`; tables an updater frees itself are in
    /// [`retired_tables`](Buses::retired_tables)).
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
    /// **From a device handler.** The lock is only ever held for the
    /// length of a table publish: the blocking unregisters release it while
    /// they wait for their grace period
    /// ([`UpdateGuard::unlocked`](srcu::UpdateGuard::unlocked)). So a
    /// handler, inside the read section of its access, may take it to
    /// [`move_range`](Buses::move_range) (BAR relocation),
    /// [`start_unregister`](Buses::start_unregister) (eject) or register,
    /// none of which waits for a grace period, without deadlocking against
    /// an unregister on another thread. (The unregisters that do wait
    /// return [`BusError::InReadSection`] there.) What still deadlocks: a
    /// thread that keeps a `SlotsGuard` while it waits for a vCPU, e.g.
    /// joins a vCPU thread whose handler wants the lock.
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

    /// The current bus, for a reader (Linux `kvm_get_bus_srcu`): a load
    /// barrier, then `srcu_dereference`. This is the read path: no lock,
    /// allocation or system call.
    ///
    /// The barrier gives the observation guarantee: if this thread saw,
    /// before the section began, anything stored after a
    /// [`register_dev`](Buses::register_dev) returned (guest memory
    /// included), the bus returned here contains the device. That is the
    /// message-passing pattern, which needs only the reader's earlier loads
    /// ordered before its load of the bus pointer (the seed patch's own VMX
    /// fix uses `smp_rmb()` for it), not the full fence of
    /// `smp_mb__after_srcu_read_lock()`: an acquire fence, which is a
    /// compiler barrier on x86_64 and `dmb ishld` on arm64. A caller that
    /// also needs its earlier *stores* ordered before the section's loads
    /// calls [`ReadGuard::mb_after_read_lock`] itself.
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
        // The observation guarantee, as a litmus test (message passing):
        //
        //   updater (register_dev)            vCPU (this function)
        //   P: cells[kind].swap(new, AcqRel)  r0 = flag (any load: guest
        //   fence(Release)         [W]           memory, an atomic, ...)
        //   flag = 1 (any store)              fence(Acquire)          [R]
        //                                     r1 = cells[kind] (Acquire, Q)
        //
        //   forbidden: r0 == 1 && r1 == old table.
        //
        // W (in `publish`, after the swap, for every update) is a release
        // fence before the flag store; R orders the flag load before the
        // pointer load; a flag load that reads W's flag store therefore
        // synchronises with it, and the pointer load sees the publish or a
        // later one. Only store->store order is needed on the updater's
        // side and load->load on the reader's: neither side has a load that
        // must follow its own store (no store-buffering shape), so neither
        // needs a full fence; on x86_64 both fences compile to nothing.
        // This does not replace SRCU's own ordering: the table stays valid
        // because the section covers the dereference.
        fence(Ordering::Acquire);
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
    /// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
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
    ///
    /// If the device returns a [`Completion`](crate::Completion), this
    /// waits for it after the read section has ended.
    #[inline]
    pub fn write(&self, kind: BusKind, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let guard = self.read_lock();
        let done = self.get_bus_srcu(&guard, kind).write(addr, data)?;
        drop(guard);
        if let Some(done) = done {
            done.wait();
        }
        Ok(())
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
        let (i, done) = self
            .get_bus_srcu(&guard, kind)
            .write_cookie(cookie, addr, data)?;
        drop(guard);
        if let Some(done) = done {
            done.wait();
        }
        Ok(i)
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
    /// holds. A [`Completion`](crate::Completion) the device returns is
    /// handed back: wait for it after dropping the guard.
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
    ) -> Result<Option<crate::Completion>, BusError> {
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
    /// builds a new table with the device, publishes it, and retires the
    /// old one, to be freed once a grace period has passed
    /// ([`retired_tables`](Buses::retired_tables)). Never waits for a grace
    /// period (the slots lock is held only for table publishes, never
    /// across a grace period).
    ///
    /// Readers that began before the publish may still dispatch on the old
    /// table; see the [crate documentation](crate) for what is
    /// guaranteed. Among overlapping ranges, dispatch tries the most
    /// specific first ([`IoBus`]); equal ranges in registration order.
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
    /// use kvm_bus::{Access, Buses, BusError, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Port80;
    /// impl IoDevice for Port80 {
    ///     fn read(&self, _: Access, d: &mut [u8]) -> Result<(), Declined> { d.fill(0xff); Ok(()) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
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
        // An array, not `register_many`'s collected `Vec`: one allocation
        // less per registration.
        self.register_batch(slots, kind, [(range, dev)])
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
    /// use kvm_bus::{Access, Buses, BusError, BusKind, Declined, WriteResult, IoDevice, IoRange, Srcu};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
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
        let new: Vec<_> = devs.into_iter().collect();
        self.register_batch(slots, kind, new)
    }

    /// [`register_many`](Buses::register_many) of a batch held in an array
    /// or a `Vec`.
    fn register_batch<B>(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        mut batch: B,
    ) -> Result<(), BusError>
    where
        B: AsMut<[(IoRange, Arc<dyn IoDevice>)]>
            + IntoIterator<Item = (IoRange, Arc<dyn IoDevice>)>,
    {
        self.check(slots);
        let new = batch.as_mut();
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
        for (range, _) in new.iter() {
            self.check_range(slots, bus, kind, *range, None)?;
        }
        if slots.guard.reject_overlaps[kind.index()] {
            // Within the batch too.
            let mut ranges: Vec<IoRange> = new.iter().map(|(r, _)| *r).collect();
            ranges.sort_unstable();
            if let Some(w) = ranges.windows(2).find(|w| w[1].addr() <= w[0].last()) {
                return Err(BusError::Overlap {
                    kind,
                    range: w[1],
                    existing: w[0],
                });
            }
        }
        // SAFETY: the counts of `new` move into the registry right below,
        // under the same slots lock, and stay there until unregistration
        // has waited for a grace period after this table (and any later one
        // holding the device) was unpublished.
        let new_bus = unsafe { bus.with_added(new) };
        slots.guard.owned[kind.index()].extend(batch.into_iter().map(|(_, d)| d));
        self.publish(slots, kind, new_bus);

        Ok(())
    }

    /// Unregisters `dev` (Linux `kvm_io_bus_unregister_dev`): removes
    /// every entry of that device (compared by address, `Arc::ptr_eq`),
    /// publishes the new table, waits for a grace period (with the slots
    /// lock released, so that device handlers may take it meanwhile), frees
    /// the old table and releases the buses' references to `dev` before
    /// returning.
    /// Afterwards no dispatch calls `dev` and the buses hold no reference to
    /// it (older tables still retired or queued for their deferred free
    /// hold only non-owning pointers that nothing follows any more).
    ///
    /// Called from a device handler of these buses, or anywhere else
    /// inside a read section of their domain on the calling thread, it
    /// would wait for a grace period that waits for the caller itself:
    /// it returns [`BusError::InReadSection`] instead, checked before
    /// anything changes (release and debug builds alike). From a handler,
    /// use [`start_unregister`](Buses::start_unregister), which does not
    /// wait.
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
    /// use kvm_bus::{Access, Buses, BusError, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
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
    /// tables still retired or queued for their deferred free hold only
    /// non-owning pointers, and no reader can reach them any more. The
    /// retired tables that the grace period covered are freed before it
    /// returns.
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
    /// use kvm_bus::{Access, Buses, BusError, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Doorbell;
    /// impl IoDevice for Doorbell {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
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
        // the caller's own section.
        if self.srcu.in_read_section() {
            return Err(BusError::InReadSection { kind });
        }
        if devs.is_empty() {
            return Ok(());
        }
        let removal = self.start_unregister_many(slots, kind, devs)?;
        self.complete_removal(slots, removal)
    }

    /// The blocking end of `unregister_*`: waits for `removal`, then frees
    /// the retired tables its grace period covered.
    fn complete_removal(
        &self,
        slots: &mut SlotsGuard<'_>,
        removal: Removal,
    ) -> Result<(), BusError> {
        // Wait without the slots lock: a device handler may need it (to
        // move a BAR, or to start an eject) while this waits for that very
        // handler's read section. Sound because `slots` is borrowed
        // mutably: no reference obtained under it is alive.
        // (`wait` then frees every retired table its grace period covered,
        // on this thread.)
        slots.guard.unlocked(|| removal.wait())
    }

    /// Unregisters the one entry of `dev` at exactly `range`, leaving the
    /// device's other ranges in place, and waits as
    /// [`unregister_dev`](Buses::unregister_dev) does. This is what Linux's
    /// `kvm_io_bus_unregister_dev` does (it removes one entry per call);
    /// `unregister_dev` removes every entry of the device.
    ///
    /// # Errors
    ///
    /// [`BusError::InReadSection`] as `unregister_dev`;
    /// [`BusError::NotRegistered`] if `dev` has no entry at `range`. The
    /// bus is unchanged and nothing waits.
    ///
    /// ```
    /// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Kbd;
    /// impl IoDevice for Kbd {
    ///     fn read(&self, _: Access, d: &mut [u8]) -> Result<(), Declined> { d.fill(0); Ok(()) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// }
    /// let buses = Buses::new();
    /// let kbd: Arc<dyn IoDevice> = Arc::new(Kbd);
    /// let (data, cmd) = (IoRange::new(0x60, 1)?, IoRange::new(0x64, 1)?);
    /// let mut slots = buses.lock_slots();
    /// buses.register_many(&mut slots, BusKind::Pio, [(data, kbd.clone()), (cmd, kbd.clone())])?;
    /// buses.unregister_range(&mut slots, BusKind::Pio, cmd, &kbd)?;
    /// drop(slots);
    /// assert!(buses.get_dev(BusKind::Pio, 0x60).is_some());
    /// assert!(buses.get_dev(BusKind::Pio, 0x64).is_none());
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn unregister_range(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        range: IoRange,
        dev: &Arc<dyn IoDevice>,
    ) -> Result<(), BusError> {
        self.check(slots);
        if self.srcu.in_read_section() {
            return Err(BusError::InReadSection { kind });
        }
        let removal = self.start_unregister_range(slots, kind, range, dev)?;
        self.complete_removal(slots, removal)
    }

    /// Starts unregistering every entry of `dev`: publishes the table
    /// without it at once and returns a [`Removal`] that completes after a
    /// grace period, without waiting. Callable from a device handler (inside
    /// a read section), e.g. when the guest writes an eject register.
    ///
    /// # Errors
    ///
    /// [`BusError::NotRegistered`] if `dev` is not on the bus; the bus is
    /// unchanged.
    ///
    /// See [`Removal`] for an example.
    pub fn start_unregister(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        dev: &Arc<dyn IoDevice>,
    ) -> Result<Removal, BusError> {
        self.start_unregister_many(slots, kind, core::slice::from_ref(dev))
    }

    /// [`start_unregister`](Buses::start_unregister) for a batch: one
    /// publish, one grace period for all. All or nothing.
    ///
    /// # Errors
    ///
    /// [`BusError::NotRegistered`] if any of `devs` is not on the bus; the
    /// bus is unchanged.
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
    /// let devs: Vec<Arc<dyn IoDevice>> = (0..4).map(|_| Arc::new(Sink) as _).collect();
    /// let mut slots = buses.lock_slots();
    /// buses.register_many(&mut slots, BusKind::Mmio, devs.iter().enumerate().map(|(i, d)| {
    ///     (IoRange::new(0x1000 * i as u64, 0x100).unwrap(), d.clone())
    /// }))?;
    /// let removal = buses.start_unregister_many(&mut slots, BusKind::Mmio, &devs[1..])?;
    /// assert_eq!(buses.get_bus(&slots, BusKind::Mmio).len(), 1);
    /// drop(slots);
    /// removal.wait()?;
    /// assert!(devs[1..].iter().all(|d| Arc::strong_count(d) == 1));
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn start_unregister_many(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        devs: &[Arc<dyn IoDevice>],
    ) -> Result<Removal, BusError> {
        self.check(slots);
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
        let owned = &mut slots.guard.owned[kind.index()];
        let released: Vec<_> = owned.extract_if(.., |d| is_gone(d)).collect();
        Ok(self.publish_removal(slots, kind, new_bus, released))
    }

    /// [`start_unregister`](Buses::start_unregister) for the one entry of
    /// `dev` at exactly `range`: its other ranges stay registered.
    ///
    /// # Errors
    ///
    /// [`BusError::NotRegistered`] if `dev` has no entry at `range`; the
    /// bus is unchanged.
    pub fn start_unregister_range(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        range: IoRange,
        dev: &Arc<dyn IoDevice>,
    ) -> Result<Removal, BusError> {
        self.check(slots);
        let bus = self.get_bus(slots, kind);
        let i = bus
            .position(range, dev)
            .ok_or(BusError::NotRegistered { kind })?;
        let new_bus = bus.with_entry_moved(i, None);
        let owned = &mut slots.guard.owned[kind.index()];
        // One count per entry: release one of this device's.
        let at = owned
            .iter()
            .position(|d| Arc::ptr_eq(d, dev))
            .expect("the registry holds a count for every table entry");
        let released = vec![owned.swap_remove(at)];
        Ok(self.publish_removal(slots, kind, new_bus, released))
    }

    /// Publishes `new_bus` as bus `kind` and retires the table it replaces
    /// (`retired.rs`): no wait here. First frees a few older retired tables
    /// whose grace period has completed meanwhile.
    fn publish(&self, slots: &mut SlotsGuard<'_>, kind: BusKind, new_bus: IoBus) {
        let (old, bytes) = self.unpublish_for(slots, kind, new_bus);
        self.retired.retire(old, bytes);
    }

    /// Publishes `new_bus` as bus `kind`; returns the table it replaces,
    /// unpublished, and that table's memory in bytes, for the retired
    /// list.
    fn unpublish_for(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        new_bus: IoBus,
    ) -> (Option<srcu::Stale<IoBus>>, usize) {
        let bytes = self.get_bus(slots, kind).heap_bytes();
        let old = self.cells[kind.index()].assign(new_bus, &mut slots.guard);
        // W, the writer half of the observation guarantee: orders the
        // publish before every store this thread makes after returning (a
        // flag, a reply to the guest; for a removal: telling the guest the
        // device is gone), pairing with fence R in `get_bus_srcu` (litmus
        // test there). A release fence: nothing on x86_64 (it was a
        // `SeqCst` fence, an `mfence` of ~35 cycles per update, which the
        // message-passing argument does not need).
        fence(Ordering::Release);
        (old, bytes)
    }

    /// Publishes `new_bus` (which no longer holds the entries whose counts
    /// are `released`), retires the old table, and hands the counts to the
    /// domain: they are released after one grace period.
    fn publish_removal(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        new_bus: IoBus,
        released: Vec<Arc<dyn IoDevice>>,
    ) -> Removal {
        // The grace period that completes the removal starts after this
        // unpublish; every older table still retired or queued for its
        // deferred free was unpublished earlier still, so afterwards no
        // reader can reach the released devices. (Those tables hold
        // non-owning pointers nothing follows again.)
        let (old, bytes) = self.unpublish_for(slots, kind, new_bus);
        let tables = self.retired.retire_for_removal(old, bytes);
        Removal::new(kind, self.srcu.retire(released), tables)
    }

    /// Moves (or resizes) the entry of `dev` at `from` to `to`, as one
    /// publication: every table has the device at exactly one of the two
    /// ranges, never neither. No grace period: the old table is retired, as
    /// registration does, so this is callable from a device
    /// handler (a PCI config-space write that relocates a BAR), inside the
    /// read section of that very access.
    ///
    /// After it returns, an access dispatched by a vCPU that has observed
    /// the move (the registration guarantee of the [crate docs](crate))
    /// goes to `to`, and `from` is no longer the device's. Accesses already
    /// in flight on an older table may still reach `dev` at `from`.
    ///
    /// # Errors
    ///
    /// [`BusError::NotRegistered`] if `dev` has no entry at `from`;
    /// [`BusError::OutsideBus`] if `to` does not fit the bus;
    /// [`BusError::Overlap`] if the bus rejects overlaps and `to` overlaps
    /// another entry. The bus is unchanged.
    ///
    /// ```
    /// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Bar;
    /// impl IoDevice for Bar {
    ///     fn read(&self, _: Access, d: &mut [u8]) -> Result<(), Declined> { d.fill(0xb0); Ok(()) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// }
    /// let buses = Buses::new();
    /// let bar: Arc<dyn IoDevice> = Arc::new(Bar);
    /// let (old, new) = (IoRange::new(0xe000_0000, 0x1000)?, IoRange::new(0xf000_0000, 0x1000)?);
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Mmio, old, bar.clone())?;
    /// buses.move_range(&mut slots, BusKind::Mmio, &bar, old, new)?;
    /// drop(slots);
    /// assert!(buses.get_dev(BusKind::Mmio, 0xe000_0000).is_none());
    /// assert!(buses.get_dev(BusKind::Mmio, 0xf000_0000).is_some());
    /// # Ok::<(), kvm_bus::BusError>(())
    /// ```
    pub fn move_range(
        &self,
        slots: &mut SlotsGuard<'_>,
        kind: BusKind,
        dev: &Arc<dyn IoDevice>,
        from: IoRange,
        to: IoRange,
    ) -> Result<(), BusError> {
        self.check(slots);
        let bus = self.get_bus(slots, kind);
        let i = bus
            .position(from, dev)
            .ok_or(BusError::NotRegistered { kind })?;
        self.check_range(slots, bus, kind, to, Some(i))?;
        let new_bus = bus.with_entry_moved(i, Some(to));
        self.publish(slots, kind, new_bus);
        Ok(())
    }

    /// Makes bus `kind` refuse ranges that overlap a registered one
    /// ([`BusError::Overlap`]), or accept them again. Off by default, as in
    /// Linux, where overlaps are legitimate: an ioeventfd doorbell inside a
    /// device's BAR, a device that claims a window and declines what it
    /// does not decode. cloud-hypervisor's bus rejects every overlap; a VMM
    /// that wants that check turns it on. Changing it does not touch the
    /// ranges already registered.
    ///
    /// ```
    /// use kvm_bus::{Access, Buses, BusError, BusKind, Declined, WriteResult, IoDevice, IoRange};
    /// use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// buses.set_reject_overlaps(&mut slots, BusKind::Mmio, true);
    /// let a = IoRange::new(0x1000, 0x100)?;
    /// buses.register_dev(&mut slots, BusKind::Mmio, a, Arc::new(Sink))?;
    /// let b = IoRange::new(0x10f0, 0x20)?;
    /// assert_eq!(
    ///     buses.register_dev(&mut slots, BusKind::Mmio, b, Arc::new(Sink)),
    ///     Err(BusError::Overlap { kind: BusKind::Mmio, range: b, existing: a })
    /// );
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn set_reject_overlaps(&self, slots: &mut SlotsGuard<'_>, kind: BusKind, reject: bool) {
        self.check(slots);
        slots.guard.reject_overlaps[kind.index()] = reject;
    }

    /// Whether bus `kind` refuses overlapping ranges; see
    /// [`set_reject_overlaps`](Buses::set_reject_overlaps).
    pub fn rejects_overlaps(&self, slots: &SlotsGuard<'_>, kind: BusKind) -> bool {
        self.check(slots);
        slots.guard.reject_overlaps[kind.index()]
    }

    /// Checks that `range` fits bus `kind` and, if the bus rejects
    /// overlaps, overlaps no entry of `bus` other than `except`.
    fn check_range(
        &self,
        slots: &SlotsGuard<'_>,
        bus: &IoBus,
        kind: BusKind,
        range: IoRange,
        except: Option<usize>,
    ) -> Result<(), BusError> {
        if range.last() > kind.max_addr() {
            return Err(BusError::OutsideBus { kind, range });
        }
        if slots.guard.reject_overlaps[kind.index()] {
            if let Some(existing) = bus.overlap(range, except) {
                return Err(BusError::Overlap {
                    kind,
                    range,
                    existing,
                });
            }
        }
        Ok(())
    }
}

/// The address of a device's data (the vtable part of the fat pointer is
/// ignored, as `Arc::ptr_eq` does).
fn dev_addr(d: &Arc<dyn IoDevice>) -> *const () {
    Arc::as_ptr(d).cast::<()>()
}

// Readers see only published, immutable tables; an update that panics
// before its publish leaves the published bus as it was (updates build the
// new table, then publish it with one store), and a device handler that
// panics ends its read section while unwinding. So `&Buses` may cross a
// `catch_unwind` boundary, which is how a VMM contains a device panic.
impl<F: Flavor> std::panic::RefUnwindSafe for Buses<F> {}
impl<F: Flavor> std::panic::UnwindSafe for Buses<F> {}

impl<F: Flavor> fmt::Debug for Buses<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buses")
            .field("srcu", &self.srcu)
            .field("max_devices", &self.max_devices)
            .finish_non_exhaustive()
    }
}
