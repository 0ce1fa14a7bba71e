//! [`IoBus`]: one immutable, sorted table of devices, and dispatch on it.

use crate::device::{Access, Completion, IoDevice};
use crate::error::BusError;
use crate::key_index::KeyIndex;
use crate::range::IoRange;
use crate::MAX_ACCESS_LEN;
use core::fmt;
use core::mem::ManuallyDrop;
use std::sync::Arc;

/// A device as a table holds it: a bitwise copy of an `Arc<dyn IoDevice>`
/// that owns no strong count.
///
/// Tables are copied on every update; holding owning `Arc`s would cost one
/// locked increment per device per copy (and one decrement per device when
/// the callback worker frees the old table, on another CPU, bouncing every
/// device's count between CPUs), which made registration O(n) locked
/// operations. As in the kernel, tables hold plain pointers; the strong
/// counts live in the slots-lock-protected registry of
/// [`Buses`](crate::Buses), one per entry, and a count is released only
/// when no table that holds the pointer can be reached any more: after the
/// grace period that follows the unpublish of the last table containing
/// it. A table never drops a device.
struct DevRef(ManuallyDrop<Arc<dyn IoDevice>>);

impl DevRef {
    /// # Safety
    ///
    /// A strong count of `dev`'s allocation must stay alive as long as the
    /// returned copy (or a [`DevRef::copy`] of it) can be dereferenced:
    /// until a grace period has passed after every table holding it was
    /// unpublished, and while an updater or `&mut Buses` can reach such a
    /// table.
    unsafe fn new(dev: &Arc<dyn IoDevice>) -> DevRef {
        // SAFETY: a bitwise copy that is never dropped (ManuallyDrop) does
        // not touch the count; validity is the caller's contract.
        DevRef(ManuallyDrop::new(unsafe { core::ptr::read(dev) }))
    }

    /// Another non-owning copy, valid as long as `self` is (the registry
    /// count backing `self` backs the copy: it goes into the next table,
    /// which is unpublished no earlier than the one holding `self`).
    fn copy(&self) -> DevRef {
        // SAFETY: same allocation, same backing count as `self`.
        unsafe { DevRef::new(&self.0) }
    }

    fn get(&self) -> &Arc<dyn IoDevice> {
        &self.0
    }
}

/// What the `calling` hook of [`IoBus::read_with`] receives when no device
/// is being called.
pub(crate) const NOT_CALLING: usize = usize::MAX;

impl Entry {
    /// The [`Access`] a handler of this entry receives for `addr` (which
    /// lies inside the entry's range).
    #[inline(always)]
    fn access(&self, addr: u64, vcpu: Option<u32>) -> Access {
        Access::new(self.range.addr(), addr - self.range.addr(), vcpu)
    }
}

struct Entry {
    range: IoRange,
    dev: DevRef,
}

/// One bus: an immutable array of `(range, device)` sorted by address,
/// then by length *descending*, equal ranges latest-registered first
/// (so that reverse order is dispatch order), looked up through a
/// bucketed index of the start addresses (`key_index.rs`).
///
/// A published bus is never modified: [`Buses`](crate::Buses) builds a new
/// one for every update. Readers get a `&IoBus` from
/// [`Buses::get_bus_srcu`](crate::Buses::get_bus_srcu), updaters from
/// [`Buses::get_bus`](crate::Buses::get_bus).
///
/// Dispatch (Linux `kvm_io_bus_read`/`write`): the access must lie
/// entirely inside a device's range. The devices whose range contains it
/// are tried **most specific first** until one accepts: the range that
/// starts last first; for equal starts, the shorter first; equal ranges in
/// registration order. If none accepts (or none covers the access), the
/// result is [`BusError::Unhandled`].
///
/// With `A = [0, 0x100)`, `B = [0x10, 0x14)` and `C = [0x50, 0x58)`, a
/// write at 0x50 goes to `C`, as in Linux, whose `__kvm_io_bus_write` tries
/// only the run of matching entries around its binary-search hit (here
/// `C`). Unlike Linux, if `C` declines the write, `A` is tried next
/// (Linux would return `-EOPNOTSUPP` without trying `A`): a device nested
/// in a larger window (an ioeventfd doorbell inside a BAR) gets first
/// refusal, and the window gets what it declines. `B` does not cover
/// 0x50 and is never called. Accesses of length
/// 0 or more than [`MAX_ACCESS_LEN`] are [`BusError::InvalidAccessLength`].
/// No lock, allocation or system call: two dependent loads for evenly
/// spread ranges (a static search tree of cache-line nodes otherwise), then
/// the overlapping entries.
///
/// ```
/// use kvm_bus::{Access, Buses, BusKind, Declined, WriteResult, IoDevice, IoRange};
/// use std::sync::Arc;
///
/// struct Zero;
/// impl IoDevice for Zero {
///     fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
///         data.fill(0);
///         Ok(())
///     }
///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
/// }
///
/// let buses = Buses::new();
/// let mut slots = buses.lock_slots();
/// buses.register_dev(&mut slots, BusKind::Mmio, IoRange::new(0x1000, 0x100)?, Arc::new(Zero))?;
/// let bus = buses.get_bus(&slots, BusKind::Mmio);
/// assert_eq!(bus.len(), 1);
/// let mut v = [0xff; 4];
/// bus.read(0x10fc, &mut v)?;
/// assert_eq!(v, [0; 4]);
/// assert!(bus.read(0x10fd, &mut v).is_err()); // crosses the end of the range
/// # Ok::<(), kvm_bus::BusError>(())
/// ```
pub struct IoBus {
    entries: Box<[Entry]>,
    /// `entries[i].range.addr()`, packed (it derefs to that slice), with a
    /// [`KeyIndex`] over it: a lookup reads one line of its bucket table
    /// and one or two of the starts (evenly spread devices), or one line per
    /// level of a tree.
    starts: KeyIndex,
    /// Some range overlaps an earlier one. Without overlaps the only entry
    /// that can contain an access is the last one starting at or before
    /// it, so lookup is a single search.
    overlapping: bool,
    /// If `overlapping`: the largest `range.last()` of entry `i` and every
    /// one before it, non-decreasing along the table, so the first entry
    /// that can contain an access is found by a search too (see
    /// `candidates`). Empty otherwise.
    max_last: KeyIndex,
}

impl IoBus {
    /// An empty bus.
    pub(crate) fn empty() -> IoBus {
        IoBus {
            entries: Box::new([]),
            starts: KeyIndex::EMPTY,
            overlapping: false,
            max_last: KeyIndex::EMPTY,
        }
    }

    /// The memory this table occupies: what retiring it keeps alive
    /// (`retired.rs`).
    pub(crate) fn heap_bytes(&self) -> usize {
        core::mem::size_of::<IoBus>()
            + core::mem::size_of_val::<[Entry]>(&self.entries)
            + self.starts.heap_bytes()
            + self.max_last.heap_bytes()
    }

    /// This bus's entries merged with `new`, in table order
    /// ([`order_key`]; a new range goes before existing equal ones, and
    /// within `new` later entries before earlier ones, so that reverse
    /// table order is registration order). A merge straight into the new
    /// table, not a sort: the table is already sorted. No device count is
    /// touched.
    ///
    /// # Safety
    ///
    /// The devices of `new` must be backed by strong counts as
    /// [`DevRef::new`] requires (the caller moves them into its registry).
    pub(crate) unsafe fn with_added(&self, new: &mut [(IoRange, Arc<dyn IoDevice>)]) -> IoBus {
        new.reverse();
        new.sort_by_key(|(r, _)| order_key(r)); // stable: reversed among equals
        let mut b = Builder::with_capacity(self.len() + new.len());
        let mut done = 0;
        for (range, dev) in new.iter() {
            // The old entries that go before `range`: a run copied at once.
            let at = done
                + self.entries[done..].partition_point(|e| order_key(&e.range) < order_key(range));
            b.extend_copied(&self.entries[done..at], self.overlapping);
            done = at;
            // SAFETY: forwarded to the caller.
            b.push(*range, unsafe { DevRef::new(dev) });
        }
        // One new entry (a registration): its start goes into a copy of
        // this table's index, if the buckets stay (`with_inserted`).
        let starts = match new {
            [(range, _)] => self.starts.with_inserted(done, range.addr()),
            _ => None,
        };
        b.extend_copied(&self.entries[done..], self.overlapping);
        b.finish(starts)
    }

    /// This bus without the entries for which `remove` is true.
    pub(crate) fn without(&self, mut remove: impl FnMut(&Arc<dyn IoDevice>) -> bool) -> IoBus {
        let mut b = Builder::with_capacity(self.len());
        for e in self.entries.iter().filter(|e| !remove(e.dev.get())) {
            b.push(e.range, e.dev.copy());
        }
        b.finish(None)
    }

    /// This bus without entry `i`, and with its device at `to` instead if
    /// `to` is given (a move: one table, the device reachable at exactly
    /// one of the two ranges in every table). The moved entry goes before
    /// existing equal ranges, as a registration would.
    pub(crate) fn with_entry_moved(&self, i: usize, to: Option<IoRange>) -> IoBus {
        let mut b = Builder::with_capacity(self.len());
        let moved = &self.entries[i];
        let mut pending = to;
        for (j, e) in self.entries.iter().enumerate() {
            if let Some(to) = pending.filter(|to| order_key(&e.range) >= order_key(to)) {
                b.push(to, moved.dev.copy());
                pending = None;
            }
            if j != i {
                b.push(e.range, e.dev.copy());
            }
        }
        if let Some(to) = pending {
            b.push(to, moved.dev.copy());
        }
        b.finish(None)
    }

    /// The index of the entry of `dev` at exactly `range`.
    pub(crate) fn position(&self, range: IoRange, dev: &Arc<dyn IoDevice>) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.range == range && Arc::ptr_eq(e.dev.get(), dev))
    }

    /// The first entry whose range overlaps `range`, other than entry
    /// `except`.
    pub(crate) fn overlap(&self, range: IoRange, except: Option<usize>) -> Option<IoRange> {
        // Entries starting after `range` ends cannot overlap it.
        let hi = self.starts.partition_point(|&start| start <= range.last());
        self.entries[..hi]
            .iter()
            .enumerate()
            .find(|(j, e)| Some(*j) != except && e.range.last() >= range.addr())
            .map(|(_, e)| e.range)
    }

    /// On a bus without overlapping ranges, the one entry that can contain
    /// `[addr, last]`: the last one starting at or before `addr`, if it
    /// reaches `last`. One index lookup and one compare, no loop.
    #[inline(always)]
    fn only_candidate(&self, addr: u64, last: u64) -> Option<(usize, &Entry)> {
        debug_assert!(!self.overlapping);
        let i = self.starts.count_le(addr).checked_sub(1)?;
        let e = self.entries.get(i)?;
        (e.range.last() >= last).then_some((i, e))
    }

    /// Indices of the entries whose range contains `[addr, last]`, in
    /// dispatch order: *reverse* table order, i.e. most specific first (see
    /// the type docs). Entries `[0, hi)` start at or before `addr`; entries
    /// before `lo` (and everything before them) end before `last`. In a bus
    /// without overlaps this is at most one entry.
    #[inline(always)]
    fn candidates(&self, addr: u64, last: u64) -> impl Iterator<Item = (usize, &Entry)> {
        let hi = self.starts.count_le(addr);
        let lo = if self.overlapping {
            // Entries whose `max_last < last`: `last >= addr`, so none if
            // `last` is 0; at most `hi` of them count.
            match last.checked_sub(1) {
                Some(below) => self.max_last.count_le_outlined(below).min(hi),
                None => 0,
            }
        } else {
            hi.saturating_sub(1)
        };
        self.entries[lo..hi]
            .iter()
            .enumerate()
            .rev()
            .map(move |(i, e)| (lo + i, e))
            .filter(move |(_, e)| e.range.last() >= last)
    }

    /// Checks an access; returns its last address.
    #[inline]
    fn check_access(addr: u64, len: usize) -> Result<u64, BusError> {
        if len == 0 || len > MAX_ACCESS_LEN {
            return Err(BusError::InvalidAccessLength { addr, len });
        }
        // len <= 8, so the cast is lossless.
        addr.checked_add(len as u64 - 1)
            .ok_or(BusError::Unhandled { addr, len })
    }

    /// Dispatches a read of `data.len()` bytes at `addr` to the first
    /// device that covers it and accepts (Linux `__kvm_io_bus_read`).
    ///
    /// # Errors
    ///
    /// [`BusError::InvalidAccessLength`] if `data` is empty or longer than
    /// [`MAX_ACCESS_LEN`]; [`BusError::Unhandled`] if no device accepted.
    ///
    /// See the [type-level example](IoBus).
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        self.read_with(None, addr, data, |_| ())
    }

    /// [`read`](IoBus::read) on behalf of vCPU `vcpu` (handlers see it in
    /// [`Access::vcpu`]).
    ///
    /// # Errors
    ///
    /// As [`read`](IoBus::read).
    #[inline]
    pub fn read_by(&self, vcpu: Option<u32>, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        self.read_with(vcpu, addr, data, |_| ())
    }

    /// [`read`](IoBus::read), calling `calling(i)` before entry `i`'s
    /// device is called and `calling(NOT_CALLING)` after it returns, so a
    /// caller that catches a panic knows which device it came from (the
    /// exit adapter). A no-op closure compiles to plain `read`.
    #[inline(always)]
    pub(crate) fn read_with(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        data: &mut [u8],
        mut calling: impl FnMut(usize),
    ) -> Result<(), BusError> {
        let len = data.len();
        let last = Self::check_access(addr, len)?;
        if self.overlapping {
            return self.read_overlapping(vcpu, addr, last, data, calling);
        }
        if let Some((i, e)) = self.only_candidate(addr, last) {
            calling(i);
            let r = e.dev.get().read(e.access(addr, vcpu), data);
            calling(NOT_CALLING);
            if r.is_ok() {
                return Ok(());
            }
        }
        Err(BusError::Unhandled { addr, len })
    }

    /// [`read_with`](IoBus::read_with) on a bus with overlapping ranges:
    /// every candidate, most specific first. Out of line, so that the
    /// common dispatch (no overlaps) stays small.
    #[inline(never)]
    fn read_overlapping(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        last: u64,
        data: &mut [u8],
        mut calling: impl FnMut(usize),
    ) -> Result<(), BusError> {
        for (i, e) in self.candidates(addr, last) {
            calling(i);
            let r = e.dev.get().read(e.access(addr, vcpu), data);
            calling(NOT_CALLING);
            if r.is_ok() {
                return Ok(());
            }
        }
        Err(BusError::Unhandled {
            addr,
            len: data.len(),
        })
    }

    /// Dispatches a write of `data` at `addr` to the first device that
    /// covers it and accepts (Linux `__kvm_io_bus_write`).
    ///
    /// # Errors
    ///
    /// As [`read`](IoBus::read).
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, BusError, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// struct Sink;
    /// impl IoDevice for Sink {
    ///     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    ///     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(0x80, 1)?, Arc::new(Sink))?;
    /// let bus = buses.get_bus(&slots, BusKind::Pio);
    /// bus.write(0x80, &[1])?;
    /// assert_eq!(bus.write(0x80, &[]), Err(BusError::InvalidAccessLength { addr: 0x80, len: 0 }));
    /// assert_eq!(bus.write(0x81, &[1]), Err(BusError::Unhandled { addr: 0x81, len: 1 }));
    /// # Ok::<(), BusError>(())
    /// ```
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<Completion>, BusError> {
        self.write_from(None, usize::MAX, addr, data, |_| ())
            .map(|(_, done)| done)
    }

    /// [`write`](IoBus::write) on behalf of vCPU `vcpu`.
    ///
    /// # Errors
    ///
    /// As [`read`](IoBus::read).
    #[inline]
    pub fn write_by(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        data: &[u8],
    ) -> Result<Option<Completion>, BusError> {
        self.write_from(vcpu, usize::MAX, addr, data, |_| ())
            .map(|(_, done)| done)
    }

    /// [`write`](IoBus::write) with a `calling` hook, as
    /// [`read_with`](IoBus::read_with).
    #[inline]
    #[cfg_attr(
        not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")),
        allow(dead_code)
    )]
    pub(crate) fn write_with(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        data: &[u8],
        calling: impl FnMut(usize),
    ) -> Result<Option<Completion>, BusError> {
        self.write_from(vcpu, usize::MAX, addr, data, calling)
            .map(|(_, done)| done)
    }

    /// Like [`write`](IoBus::write), trying entry `cookie` first (Linux
    /// `kvm_io_bus_write_cookie`): pass the index a previous call returned
    /// to skip the search, or `usize::MAX` for none. A stale or wrong
    /// cookie is harmless: the entry is used only if its range contains the
    /// access and the device accepts; otherwise the full search runs
    /// (without calling that entry again).
    ///
    /// Returns the index of the entry that accepted, and the
    /// [`Completion`] its device returned, if any (wait for it after the
    /// read section). Indices are positions in this bus only: a new bus
    /// after an update may number differently.
    ///
    /// # Errors
    ///
    /// As [`read`](IoBus::read).
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, BusError, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// # struct Sink;
    /// # impl IoDevice for Sink {
    /// #     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    /// #     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// # }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// for port in [0x60, 0x64] {
    ///     buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(port, 1)?, Arc::new(Sink))?;
    /// }
    /// let bus = buses.get_bus(&slots, BusKind::Pio);
    /// let (cookie, _completion) = bus.write_cookie(usize::MAX, 0x64, &[0xfe])?;
    /// assert_eq!(cookie, 1);
    /// assert_eq!(bus.write_cookie(cookie, 0x64, &[0xfe])?.0, 1); // no search
    /// assert_eq!(bus.write_cookie(cookie, 0x60, &[0])?.0, 0);    // wrong hint: searched
    /// # Ok::<(), BusError>(())
    /// ```
    #[inline]
    pub fn write_cookie(
        &self,
        cookie: usize,
        addr: u64,
        data: &[u8],
    ) -> Result<(usize, Option<Completion>), BusError> {
        self.write_from(None, cookie, addr, data, |_| ())
    }

    #[inline(always)]
    fn write_from(
        &self,
        vcpu: Option<u32>,
        cookie: usize,
        addr: u64,
        data: &[u8],
        mut calling: impl FnMut(usize),
    ) -> Result<(usize, Option<Completion>), BusError> {
        let len = data.len();
        let last = Self::check_access(addr, len)?;
        if cookie != usize::MAX || self.overlapping {
            return self.write_searching(vcpu, cookie, addr, last, data, calling);
        }
        if let Some((i, e)) = self.only_candidate(addr, last) {
            calling(i);
            let r = e.dev.get().write(e.access(addr, vcpu), data);
            calling(NOT_CALLING);
            if let Ok(done) = r {
                return Ok((i, done));
            }
        }
        Err(BusError::Unhandled { addr, len })
    }

    /// [`write_from`](IoBus::write_from) with a cookie to try first, or on
    /// a bus with overlapping ranges (every candidate, most specific
    /// first). Out of line, so that the common dispatch stays small.
    #[inline(never)]
    fn write_searching(
        &self,
        vcpu: Option<u32>,
        cookie: usize,
        addr: u64,
        last: u64,
        data: &[u8],
        mut calling: impl FnMut(usize),
    ) -> Result<(usize, Option<Completion>), BusError> {
        let mut try_entry = |i: usize, e: &Entry| {
            calling(i);
            let r = e.dev.get().write(e.access(addr, vcpu), data);
            calling(NOT_CALLING);
            r.ok()
        };
        if let Some(e) = self.entries.get(cookie) {
            if e.range.addr() <= addr && e.range.last() >= last {
                if let Some(done) = try_entry(cookie, e) {
                    return Ok((cookie, done));
                }
            }
        }
        for (i, e) in self.candidates(addr, last) {
            if i != cookie {
                if let Some(done) = try_entry(i, e) {
                    return Ok((i, done));
                }
            }
        }
        Err(BusError::Unhandled {
            addr,
            len: data.len(),
        })
    }

    /// Entry `i`: its range and device (the exit adapter names the device
    /// whose handler panicked with it).
    #[cfg_attr(
        not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")),
        allow(dead_code)
    )]
    pub(crate) fn entry(&self, i: usize) -> Option<(IoRange, &Arc<dyn IoDevice>)> {
        self.entries.get(i).map(|e| (e.range, e.dev.get()))
    }

    /// The device that dispatch would try first for the byte at `addr`
    /// (the most specific range containing it; Linux `kvm_io_bus_get_dev`),
    /// without calling it.
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, BusError, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// # struct Sink;
    /// # impl IoDevice for Sink {
    /// #     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    /// #     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// # }
    /// let buses = Buses::new();
    /// let dev: Arc<dyn IoDevice> = Arc::new(Sink);
    /// let mut slots = buses.lock_slots();
    /// buses.register_dev(&mut slots, BusKind::Mmio, IoRange::new(0xd000_0000, 0x1000)?, dev.clone())?;
    /// drop(slots);
    ///
    /// let g = buses.read_lock();
    /// let bus = buses.get_bus_srcu(&g, BusKind::Mmio);
    /// assert!(Arc::ptr_eq(bus.get_dev(0xd000_0fff).unwrap(), &dev));
    /// assert!(bus.get_dev(0xd000_1000).is_none());
    /// # Ok::<(), BusError>(())
    /// ```
    #[inline]
    pub fn get_dev(&self, addr: u64) -> Option<&Arc<dyn IoDevice>> {
        self.candidates(addr, addr).next().map(|(_, e)| e.dev.get())
    }

    /// Number of entries (a device registered at several ranges counts
    /// once per range).
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// assert_eq!(buses.get_bus(&buses.lock_slots(), kvm_bus::BusKind::Mmio).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no device is registered.
    ///
    /// ```
    /// let buses = kvm_bus::Buses::new();
    /// assert!(buses.get_bus(&buses.lock_slots(), kvm_bus::BusKind::Pio).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in table order (by address; dispatch tries the entries
    /// covering an access in the reverse of this order), indexed as
    /// [`write_cookie`](IoBus::write_cookie) numbers them.
    ///
    /// ```
    /// # use kvm_bus::{Access, Buses, BusKind, BusError, Declined, WriteResult, IoDevice, IoRange};
    /// # use std::sync::Arc;
    /// # struct Sink;
    /// # impl IoDevice for Sink {
    /// #     fn read(&self, _: Access, _: &mut [u8]) -> Result<(), Declined> { Err(Declined) }
    /// #     fn write(&self, _: Access, _: &[u8]) -> WriteResult { Ok(None) }
    /// # }
    /// let buses = Buses::new();
    /// let mut slots = buses.lock_slots();
    /// for port in [0x64, 0x60] {
    ///     buses.register_dev(&mut slots, BusKind::Pio, IoRange::new(port, 1)?, Arc::new(Sink))?;
    /// }
    /// let ports: Vec<u64> = buses.get_bus(&slots, BusKind::Pio).iter().map(|(r, _)| r.addr()).collect();
    /// assert_eq!(ports, [0x60, 0x64]);
    /// # Ok::<(), BusError>(())
    /// ```
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (IoRange, &Arc<dyn IoDevice>)> + '_ {
        self.entries.iter().map(|e| (e.range, e.dev.get()))
    }
}

/// The table order: by address, then by length descending. Reverse table
/// order among the entries covering an access is then "starts last first,
/// shorter first": the most specific range first.
pub(crate) fn order_key(r: &IoRange) -> (u64, core::cmp::Reverse<u64>) {
    (r.addr(), core::cmp::Reverse(r.len()))
}

/// Builds a table from entries pushed in sorted order, in one pass.
struct Builder {
    entries: Vec<Entry>,
    max_last: u64,
    overlapping: bool,
}

impl Builder {
    fn with_capacity(n: usize) -> Self {
        Builder {
            entries: Vec::with_capacity(n),
            max_last: 0,
            overlapping: false,
        }
    }

    fn push(&mut self, range: IoRange, dev: DevRef) {
        debug_assert!(self
            .entries
            .last()
            .is_none_or(|e| order_key(&e.range) <= order_key(&range)));
        self.overlapping |= !self.entries.is_empty() && range.addr() <= self.max_last;
        self.max_last = self.max_last.max(range.last());
        self.entries.push(Entry { range, dev });
    }

    /// Pushes non-owning copies of `run` (entries of a table, in order,
    /// that all go after what was pushed so far): one copy of the whole
    /// run, and the overlap bookkeeping. If `run` comes from a table
    /// without overlaps, its entries are disjoint and sorted, so the last
    /// one ends last and only the first can overlap what went before: two
    /// compares, not a pass.
    fn extend_copied(&mut self, run: &[Entry], from_overlapping: bool) {
        if from_overlapping {
            let mut first = self.entries.is_empty();
            for e in run {
                self.overlapping |= !first && e.range.addr() <= self.max_last;
                self.max_last = self.max_last.max(e.range.last());
                first = false;
            }
        } else if let (Some(head), Some(tail)) = (run.first(), run.last()) {
            self.overlapping |= !self.entries.is_empty() && head.range.addr() <= self.max_last;
            self.max_last = self.max_last.max(tail.range.last());
        }
        debug_assert!(match (self.entries.last(), run.first()) {
            (Some(a), Some(b)) => order_key(&a.range) <= order_key(&b.range),
            _ => true,
        });
        self.entries.reserve(run.len());
        // SAFETY: an `Entry` is a range and a `DevRef`, and a bitwise copy
        // of a `DevRef` is what `DevRef::copy` makes (a non-owning copy
        // backed by the same registry count); the destination has room for
        // `run.len()` more entries (reserved above), which `set_len`
        // then covers, initialised.
        unsafe {
            let end = self.entries.as_mut_ptr().add(self.entries.len());
            core::ptr::copy_nonoverlapping(run.as_ptr(), end, run.len());
            self.entries.set_len(self.entries.len() + run.len());
        }
    }

    /// The table, with `starts` as its index of start addresses if the
    /// caller made it already (it must index exactly the entries' starts).
    fn finish(self, starts: Option<KeyIndex>) -> IoBus {
        let entries = self.entries.into_boxed_slice();
        let starts = starts.unwrap_or_else(|| KeyIndex::new(&entries, |e| e.range.addr()));
        debug_assert!(starts
            .iter()
            .copied()
            .eq(entries.iter().map(|e| e.range.addr())));
        let max_last = if self.overlapping {
            let running: Vec<u64> = entries
                .iter()
                .scan(0, |max, e| {
                    *max = e.range.last().max(*max);
                    Some(*max)
                })
                .collect();
            KeyIndex::new(&running, |&m| m)
        } else {
            KeyIndex::EMPTY
        };
        IoBus {
            entries,
            starts,
            overlapping: self.overlapping,
            max_last,
        }
    }
}

impl Default for IoBus {
    /// An empty bus.
    fn default() -> Self {
        IoBus::empty()
    }
}

impl fmt::Debug for IoBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| e.range))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Declined, WriteResult};
    use crate::key_index::{rng, BLOCK};

    /// `write_cookie` without the (never returned here) completion.
    fn wc(b: &IoBus, cookie: usize, addr: u64, data: &[u8]) -> Result<usize, BusError> {
        b.write_cookie(cookie, addr, data).map(|(i, _)| i)
    }
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// Accepts writes whose first byte is `matches` (or any, if None);
    /// reads fill with `tag`. Counts calls.
    struct Dev {
        tag: u8,
        matches: Option<u8>,
        calls: AtomicUsize,
    }

    impl Dev {
        fn new(tag: u8, matches: Option<u8>) -> Arc<Dev> {
            Arc::new(Dev {
                tag,
                matches,
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl IoDevice for Dev {
        fn read(&self, _: Access, data: &mut [u8]) -> Result<(), Declined> {
            self.calls.fetch_add(1, Relaxed);
            if self.matches.is_some() {
                return Err(Declined);
            }
            data.fill(self.tag);
            Ok(())
        }
        fn write(&self, _: Access, data: &[u8]) -> WriteResult {
            self.calls.fetch_add(1, Relaxed);
            match self.matches {
                Some(m) if data[0] != m => Err(Declined),
                _ => Ok(None),
            }
        }
    }

    fn r(addr: u64, len: u64) -> IoRange {
        IoRange::new(addr, len).unwrap()
    }

    std::thread_local! {
        /// The strong counts backing the test tables (the role of the
        /// `Buses` registry): kept for the whole test.
        static KEEP: std::cell::RefCell<Vec<Arc<dyn IoDevice>>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn add(b: &IoBus, devs: &[(IoRange, Arc<dyn IoDevice>)]) -> IoBus {
        let mut new = devs.to_vec();
        // SAFETY: KEEP holds a count of every device for the rest of the
        // test thread.
        let bus = unsafe { b.with_added(&mut new) };
        KEEP.with(|k| k.borrow_mut().extend(new.into_iter().map(|(_, d)| d)));
        bus
    }

    fn bus(devs: &[(IoRange, Arc<Dev>)]) -> IoBus {
        let devs: Vec<_> = devs
            .iter()
            .map(|(r, d)| (*r, d.clone() as Arc<dyn IoDevice>))
            .collect();
        add(&IoBus::empty(), &devs)
    }

    fn read_tag(b: &IoBus, addr: u64, len: usize) -> Result<u8, BusError> {
        let mut buf = [0u8; 8];
        b.read(addr, &mut buf[..len]).map(|()| buf[0])
    }

    #[test]
    fn lookup_in_disjoint_table() {
        let devs: Vec<_> = (0..50u64)
            .map(|i| (r(i * 0x100, 0x10), Dev::new(i as u8, None)))
            .rev()
            .collect();
        let b = bus(&devs);
        assert_eq!(b.len(), 50);
        for i in 0..50u64 {
            assert_eq!(read_tag(&b, i * 0x100, 1), Ok(i as u8));
            assert_eq!(read_tag(&b, i * 0x100 + 8, 8), Ok(i as u8));
            assert_eq!(
                read_tag(&b, i * 0x100 + 9, 8),
                Err(BusError::Unhandled {
                    addr: i * 0x100 + 9,
                    len: 8
                })
            );
            assert!(read_tag(&b, i * 0x100 + 0x10, 1).is_err());
        }
        let addrs: Vec<_> = b.iter().map(|(r, _)| r.addr()).collect();
        assert!(addrs.windows(2).all(|w| w[0] < w[1]));
    }

    /// The documented rule with the issue's example: A = [0, 0x100),
    /// B = [0x10, 0x14), C = [0x50, 0x58); a write at 0x50 goes to C (as in
    /// Linux), and to A only if C declines (unlike Linux); B never.
    #[test]
    fn overlapping_ranges_most_specific_first_until_one_accepts() {
        let big = Dev::new(1, Some(0xaa));
        let small = Dev::new(2, Some(0xbb));
        let inner = Dev::new(3, Some(0xcc));
        let b = bus(&[
            (r(0, 0x100), big.clone()),
            (r(0x10, 4), small.clone()),
            (r(0x50, 8), inner.clone()),
        ]);
        assert_eq!(wc(&b, usize::MAX, 0x50, &[0xcc]), Ok(2));
        assert_eq!(big.calls.load(Relaxed), 0, "C accepted first");
        assert_eq!(inner.calls.load(Relaxed), 1);
        assert_eq!(small.calls.load(Relaxed), 0, "not covering: never called");
        assert_eq!(wc(&b, usize::MAX, 0x50, &[0xaa]), Ok(0));
        assert_eq!(inner.calls.load(Relaxed), 2, "C declined, then A");
        // Same start: the shorter range first.
        let wide = Dev::new(4, None);
        let narrow = Dev::new(5, None);
        let b2 = bus(&[
            (r(0x200, 0x10), wide.clone()),
            (r(0x200, 4), narrow.clone()),
        ]);
        assert_eq!(read_tag(&b2, 0x200, 4), Ok(5));
        assert_eq!(read_tag(&b2, 0x204, 4), Ok(4));
        assert_eq!(
            b.write(0x50, &[0xbb]),
            Err(BusError::Unhandled { addr: 0x50, len: 1 })
        );
        assert_eq!(wc(&b, usize::MAX, 0x11, &[0xbb]), Ok(1));
        // An access sticking out of `inner` goes only to `big`.
        assert_eq!(wc(&b, usize::MAX, 0x56, &[0xaa, 0]), Ok(0));
    }

    #[test]
    fn equal_ranges_keep_registration_order() {
        let a = Dev::new(1, Some(1));
        let c = Dev::new(2, Some(2));
        let b = bus(&[(r(0x40, 4), a.clone())]);
        let b = add(&b, &[(r(0x40, 4), c.clone() as Arc<dyn IoDevice>)]);
        // Table [c, a]; dispatch tries a (registered first), then c.
        assert_eq!(wc(&b, usize::MAX, 0x40, &[2]), Ok(0));
        assert_eq!(a.calls.load(Relaxed), 1);
        assert_eq!(wc(&b, usize::MAX, 0x40, &[1]), Ok(1));
        // Within one batch too.
        let d = Dev::new(3, Some(3));
        let e = Dev::new(4, Some(4));
        let b = bus(&[(r(0x40, 4), d.clone()), (r(0x40, 4), e.clone())]);
        assert_eq!(wc(&b, usize::MAX, 0x40, &[4]), Ok(0));
        assert_eq!(d.calls.load(Relaxed), 1, "registered first, tried first");
    }

    #[test]
    fn cookie_hit_skips_search_and_miss_falls_back() {
        let a = Dev::new(1, Some(1));
        let c = Dev::new(2, Some(2));
        // Table [c, a].
        let b = bus(&[(r(0x40, 4), a.clone()), (r(0x40, 4), c.clone())]);
        assert_eq!(wc(&b, 0, 0x40, &[2]), Ok(0));
        assert_eq!(a.calls.load(Relaxed), 0, "cookie hit: no search");
        // Declining cookie device is not called twice.
        assert_eq!(wc(&b, 0, 0x40, &[1]), Ok(1));
        assert_eq!(c.calls.load(Relaxed), 2);
        // Out-of-range or non-covering cookies are ignored.
        assert_eq!(wc(&b, 7, 0x40, &[1]), Ok(1));
        assert_eq!(
            wc(&b, 0, 0x44, &[1]),
            Err(BusError::Unhandled { addr: 0x44, len: 1 })
        );
    }

    #[test]
    fn bad_access_lengths_and_wrapping_accesses() {
        let d = Dev::new(1, None);
        let b = bus(&[(r(u64::MAX - 15, 16), d.clone())]);
        assert_eq!(
            b.read(0, &mut []),
            Err(BusError::InvalidAccessLength { addr: 0, len: 0 })
        );
        assert_eq!(
            b.write(u64::MAX, &[0; 9]),
            Err(BusError::InvalidAccessLength {
                addr: u64::MAX,
                len: 9
            })
        );
        assert_eq!(read_tag(&b, u64::MAX, 1), Ok(1));
        assert_eq!(read_tag(&b, u64::MAX - 7, 8), Ok(1));
        assert_eq!(
            read_tag(&b, u64::MAX, 2),
            Err(BusError::Unhandled {
                addr: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            wc(&b, 0, u64::MAX - 1, &[0; 4]),
            Err(BusError::Unhandled {
                addr: u64::MAX - 1,
                len: 4
            })
        );
        assert_eq!(d.calls.load(Relaxed), 2);
    }

    #[test]
    fn get_dev_most_specific() {
        let a = Dev::new(1, None);
        let c = Dev::new(2, None);
        let b = bus(&[(r(0x10, 0x10), a.clone()), (r(0x18, 2), c.clone())]);
        let (a_dyn, c_dyn): (Arc<dyn IoDevice>, Arc<dyn IoDevice>) = (a, c);
        assert!(Arc::ptr_eq(b.get_dev(0x19).unwrap(), &c_dyn));
        assert!(Arc::ptr_eq(b.get_dev(0x1a).unwrap(), &a_dyn));
        assert!(b.get_dev(0x20).is_none());
        assert!(b.get_dev(0xf).is_none());
        assert!(IoBus::default().get_dev(0).is_none());
    }

    #[test]
    fn without_removes_all_entries_of_a_device() {
        let a = Dev::new(1, None);
        let c = Dev::new(2, None);
        let b = bus(&[
            (r(0, 1), a.clone()),
            (r(5, 1), c.clone()),
            (r(9, 1), a.clone()),
        ]);
        let a_dyn: Arc<dyn IoDevice> = a.clone();
        let count = Arc::strong_count(&a);
        let b2 = b.without(|d| Arc::ptr_eq(d, &a_dyn));
        assert_eq!(
            Arc::strong_count(&a),
            count,
            "tables never touch device counts"
        );
        assert_eq!(b2.len(), 1);
        assert_eq!(read_tag(&b2, 5, 1), Ok(2));
        assert!(read_tag(&b2, 9, 1).is_err());
        assert_eq!(format!("{b2:?}"), "[IoRange { addr: 0x5, len: 0x1 }]");
        drop((b, b2));
        assert_eq!(Arc::strong_count(&a), count, "nor do they drop devices");
    }

    /// Brute force against the definition: for random tables and accesses,
    /// dispatch tries exactly the covering entries, in reverse table order.
    #[test]
    fn candidates_match_linear_scan() {
        let mut rnd = rng(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            let n = rnd(20) as usize;
            let mut next_free = 0;
            let devs: Vec<_> = (0..n)
                .map(|i| {
                    let range = if round % 2 == 0 {
                        // Overlaps galore: the two-search path.
                        r(rnd(64), 1 + rnd(24))
                    } else {
                        // Disjoint ranges (in random order): the
                        // single-search path.
                        let start = next_free + rnd(4);
                        let len = 1 + rnd(8);
                        next_free = start + len;
                        r(start, len)
                    };
                    (range, Dev::new(i as u8, None))
                })
                .collect();
            let mut devs = devs;
            if round % 4 == 1 {
                devs.reverse();
            }
            let b = bus(&devs);
            if round % 2 == 1 {
                assert!(!b.overlapping, "{b:?}");
            }
            for _ in 0..50 {
                let addr = rnd(96);
                let last = addr + rnd(8);
                assert_candidates_match_linear_scan(&b, addr, last, format_args!("{b:?}"));
            }
        }
    }

    /// The candidates of `[addr, last]` are the entries that contain it,
    /// most specific first (a linear scan in reverse table order), and on
    /// a bus without overlaps `only_candidate` is the first of them.
    fn assert_candidates_match_linear_scan(
        b: &IoBus,
        addr: u64,
        last: u64,
        context: fmt::Arguments<'_>,
    ) {
        let got: Vec<usize> = b.candidates(addr, last).map(|(i, _)| i).collect();
        let want: Vec<usize> = b
            .entries
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, e)| e.range.addr() <= addr && e.range.last() >= last)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(got, want, "{context}: addr {addr:#x} last {last:#x}");
        if !b.overlapping {
            let only = b.only_candidate(addr, last).map(|(i, _)| i);
            assert_eq!(only, want.first().copied(), "{context}: addr {addr:#x}");
        }
    }

    /// `candidates_match_linear_scan` on big tables (1000 to 2100 entries),
    /// overlapping, disjoint and spread (the bucket path), disjoint in
    /// clusters far apart (the tree path), some at the top of the address
    /// space, probed at random and at the edges of every third range.
    #[test]
    fn candidates_match_linear_scan_big_tables() {
        let mut rnd = rng(0x2545_f491_4f6c_dd1d);
        for round in 0..12u64 {
            let n = 1000 + rnd(1100) as usize;
            let base = if round % 4 == 3 {
                u64::MAX - (1 << 34)
            } else {
                rnd(1 << 40)
            };
            let mut next_free = base;
            let mut ranges: Vec<IoRange> = (0..n)
                .map(|_| {
                    if round % 3 == 2 {
                        // 4-byte doorbells, and now and then a jump.
                        let start = next_free + if rnd(64) == 0 { rnd(1 << 26) } else { 0 };
                        next_free = start + 4;
                        r(start, 4)
                    } else if round % 3 == 0 {
                        // Overlapping: windows of up to 64 KiB with small
                        // devices inside.
                        let len = if rnd(16) == 0 {
                            1 + rnd(0x1_0000)
                        } else {
                            1 + rnd(16)
                        };
                        let start = base + rnd(0x20_0000);
                        r(start, len.min(u64::MAX - start + 1))
                    } else {
                        let start = next_free + rnd(0x800);
                        let len = (1 + rnd(0x100)).min(u64::MAX - start + 1);
                        next_free = start.saturating_add(len);
                        r(start, len)
                    }
                })
                .collect();
            if round % 4 == 3 && round % 3 != 0 {
                // The last device ends at u64::MAX.
                let last = ranges.last_mut().unwrap();
                *last = r(last.addr(), u64::MAX - last.addr() + 1);
            }
            let devs: Vec<_> = ranges
                .iter()
                .enumerate()
                .map(|(i, &range)| (range, Dev::new(i as u8, None)))
                .collect();
            let b = bus(&devs);
            assert_eq!(b.overlapping, round % 3 == 0, "round {round}");
            let crowded = b.starts.fullest_bucket() > BLOCK;
            assert_eq!(crowded, round % 3 == 2, "round {round}: the path tested");
            let edges = ranges.iter().step_by(3).flat_map(|r| {
                [
                    r.addr().wrapping_sub(1),
                    r.addr(),
                    r.last(),
                    r.last().wrapping_add(1),
                ]
            });
            let random: Vec<u64> = (0..2000)
                .map(|_| base.wrapping_add(rnd(0x20_0000 + 0x800 * n as u64)))
                .collect();
            for addr in edges.chain(random).chain([0, u64::MAX]) {
                let last = addr.saturating_add(rnd(8));
                assert_candidates_match_linear_scan(&b, addr, last, format_args!("round {round}"));
            }
        }
    }

    /// Tables built in batches (overlapping or not, near 0, 2^63 and
    /// u64::MAX) against a model: each new entry goes before the existing
    /// equal ones, in batch order; the overlap flag matches a recomputed
    /// one. Dispatch against a linear model: `write_cookie` with every
    /// cookie (and none), every length, devices that decline, and `read`.
    #[test]
    fn batches_and_dispatch_match_a_model() {
        let mut rnd = rng(0xdead_beef_cafe_f00d);
        for round in 0..300 {
            let overlapping_ok = round % 3 != 0;
            let mut b = IoBus::empty();
            let mut model: Vec<(IoRange, Arc<dyn IoDevice>)> = Vec::new();
            let mut tag = 0u8;
            for _batch in 0..1 + rnd(5) {
                let k = rnd(8) as usize;
                let mut new: Vec<(IoRange, Arc<dyn IoDevice>)> = Vec::new();
                for _ in 0..k {
                    let range = if overlapping_ok {
                        let near = [0u64, 1, u64::MAX - 40, 1 << 63];
                        let start = near[rnd(4) as usize] + rnd(32);
                        r(
                            start,
                            (1 + rnd(12)).min((u64::MAX - start).saturating_add(1)),
                        )
                    } else {
                        // Disjoint slots of 16 at random positions.
                        let slot = rnd(40);
                        if model
                            .iter()
                            .chain(new.iter())
                            .any(|(q, _)| q.addr() / 16 == slot)
                        {
                            continue;
                        }
                        r(slot * 16 + rnd(4), 1 + rnd(12))
                    };
                    tag = tag.wrapping_add(1);
                    let m = if rnd(2) == 0 {
                        None
                    } else {
                        Some(rnd(3) as u8)
                    };
                    new.push((range, Dev::new(tag, m) as Arc<dyn IoDevice>));
                }
                for (range, dev) in &new {
                    let at = model.partition_point(|(q, _)| order_key(q) < order_key(range));
                    model.insert(at, (*range, dev.clone()));
                }
                b = add(&b, &new);
                assert_eq!(b.len(), model.len());
                for (e, (q, d)) in b.entries.iter().zip(&model) {
                    assert_eq!(e.range, *q);
                    assert!(Arc::ptr_eq(e.dev.get(), d), "round {round}: order");
                }
                let ov = model.windows(2).enumerate().any(|(i, _)| {
                    let maxl = model[..=i].iter().map(|(q, _)| q.last()).max().unwrap();
                    model[i + 1].0.addr() <= maxl
                });
                assert_eq!(b.overlapping, ov, "round {round}");
                if !overlapping_ok {
                    assert!(!b.overlapping);
                }
            }
            let n = model.len();
            let mut addrs: Vec<u64> = model
                .iter()
                .flat_map(|(q, _)| {
                    [
                        q.addr().wrapping_sub(1),
                        q.addr(),
                        q.addr() + 1,
                        q.last(),
                        q.last().wrapping_add(1),
                    ]
                })
                .collect();
            addrs.extend([0, 1, u64::MAX, u64::MAX - 1, 1 << 63]);
            for addr in addrs {
                for len in [1usize, 2, 4, 8] {
                    let Some(last) = addr.checked_add(len as u64 - 1) else {
                        continue;
                    };
                    for byte in 0..3u8 {
                        let data = vec![byte; len];
                        for cookie in (0..n + 2).chain([usize::MAX]) {
                            // Model.
                            let covers =
                                |i: usize| model[i].0.addr() <= addr && model[i].0.last() >= last;
                            let accepts = |i: usize| {
                                let d = &model[i].1;
                                d.write(
                                    Access::new(model[i].0.addr(), addr - model[i].0.addr(), None),
                                    &data,
                                )
                                .is_ok()
                            };
                            let mut want = None;
                            if cookie < n && covers(cookie) && accepts(cookie) {
                                want = Some(cookie);
                            } else {
                                for i in (0..n).rev() {
                                    if i != cookie && covers(i) && accepts(i) {
                                        want = Some(i);
                                        break;
                                    }
                                }
                            }
                            let got = wc(&b, cookie, addr, &data).ok();
                            assert_eq!(
                                got, want,
                                "round {round} addr {addr:#x} len {len} cookie {cookie} {b:?}"
                            );
                        }
                    }
                    // Reads: first covering entry (reverse order) whose dev accepts reads.
                    let want = (0..n).rev().find(|&i| {
                        model[i].0.addr() <= addr
                            && model[i].0.last() >= last
                            && model[i]
                                .1
                                .read(Access::new(0, 0, None), &mut [0u8; 8][..len])
                                .is_ok()
                    });
                    let mut buf = [0u8; 8];
                    let got = b.read(addr, &mut buf[..len]);
                    assert_eq!(
                        got.is_ok(),
                        want.is_some(),
                        "read round {round} addr {addr:#x}"
                    );
                }
            }
        }
    }

    /// `extend_copied`'s shortcut for a run of a table without overlaps
    /// (two compares) leaves the same overlap bookkeeping as the pass over
    /// every entry, after any prefix already pushed; and a finished
    /// table's `overlapping` matches a brute-force check. Random tables of
    /// small and huge address spaces, half of them made overlap-free.
    /// (From a review of the shortcut.)
    #[test]
    fn extend_copied_shortcut_matches_the_full_pass() {
        let dev: Arc<dyn IoDevice> = Dev::new(0, None);
        let mut rnd = rng(0xfeed_1234_5678_9abc);
        let mut shortcut_runs = 0;
        for round in 0..20_000u64 {
            let space = [16u64, 64, 256, u64::MAX][(round % 4) as usize];
            let pick = |rnd: &mut dyn FnMut(u64) -> u64| {
                let a = rnd(space);
                let len = 1 + rnd(if space == u64::MAX { u64::MAX } else { 24 });
                IoRange::new(a, len.min((u64::MAX - a).saturating_add(1))).unwrap()
            };
            let mut src: Vec<IoRange> = (0..rnd(10)).map(|_| pick(&mut rnd)).collect();
            src.sort_by_key(order_key);
            if round % 2 == 0 {
                let mut disjoint: Vec<IoRange> = Vec::new();
                for q in src {
                    if disjoint.last().is_none_or(|p| q.addr() > p.last()) {
                        disjoint.push(q);
                    }
                }
                src = disjoint;
            }
            let mut sb = Builder::with_capacity(src.len());
            for q in &src {
                // SAFETY: `dev` outlives every table of this test.
                sb.push(*q, unsafe { DevRef::new(&dev) });
            }
            let table = sb.finish(None);
            if table.entries.is_empty() {
                continue;
            }
            let n = table.entries.len();
            let i = rnd(n as u64) as usize;
            let j = i + rnd((n - i) as u64 + 1) as usize;
            let run = &table.entries[i..j];
            // A prefix ordered before the run.
            let mut b = Builder::with_capacity(16);
            if let Some(head) = run.first() {
                let mut pre: Vec<IoRange> = (0..rnd(6))
                    .map(|_| pick(&mut rnd))
                    .filter(|q| order_key(q) <= order_key(&head.range))
                    .collect();
                pre.sort_by_key(order_key);
                for q in pre {
                    // SAFETY: as above.
                    b.push(q, unsafe { DevRef::new(&dev) });
                }
            }
            let (mut overlapping, mut max_last) = (b.overlapping, b.max_last);
            let mut first = b.entries.is_empty();
            for e in run {
                overlapping |= !first && e.range.addr() <= max_last;
                max_last = max_last.max(e.range.last());
                first = false;
            }
            shortcut_runs += usize::from(!table.overlapping && !run.is_empty());
            b.extend_copied(run, table.overlapping);
            assert_eq!(
                (b.overlapping, b.max_last),
                (overlapping, max_last),
                "round {round}"
            );
            let built = b.finish(None);
            let brute = (1..built.entries.len()).any(|k| {
                let reach = built.entries[..k].iter().map(|e| e.range.last()).max();
                reach.is_some_and(|m| built.entries[k].range.addr() <= m)
            });
            assert_eq!(built.overlapping, brute, "round {round}");
        }
        assert!(shortcut_runs > 1_000, "{shortcut_runs}");
    }
}
