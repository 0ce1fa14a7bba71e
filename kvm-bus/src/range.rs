//! [`IoRange`]: a non-empty, non-wrapping range of bus addresses.

use crate::error::{BusError, Hex};
use core::fmt;

/// A range of bus addresses `[addr, addr + len)`, never empty and never
/// wrapping past `u64::MAX` (it may end exactly at `u64::MAX`).
///
/// Ranges order by address, then by length: the order of an
/// [`IoBus`](crate::IoBus). `Display` shows the first and last address,
/// `Debug` the fields, both in hex.
///
/// ```
/// use kvm_bus::{BusError, IoRange};
/// let r = IoRange::new(0x1000, 0x10)?;
/// assert_eq!((r.addr(), r.len(), r.last()), (0x1000, 0x10, 0x100f));
/// assert!(r.contains(0x100c, 4));
/// assert!(!r.contains(0x100d, 4)); // would end past the range
/// assert_eq!(IoRange::new(0x1000, 0), Err(BusError::ZeroLength { addr: 0x1000 }));
/// assert_eq!(r.to_string(), "[0x1000, 0x100f]");
/// assert_eq!(format!("{r:?}"), "IoRange { addr: 0x1000, len: 0x10 }");
/// # Ok::<(), BusError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoRange {
    addr: u64,
    len: u64,
}

impl IoRange {
    /// The range of `len` bytes starting at `addr`.
    ///
    /// # Errors
    ///
    /// [`BusError::ZeroLength`] if `len` is 0; [`BusError::Overflow`] if
    /// the range would extend past `u64::MAX`.
    ///
    /// ```
    /// use kvm_bus::{BusError, IoRange};
    /// assert!(IoRange::new(u64::MAX, 1).is_ok()); // the last byte
    /// assert_eq!(
    ///     IoRange::new(u64::MAX, 2),
    ///     Err(BusError::Overflow { addr: u64::MAX, len: 2 })
    /// );
    /// ```
    pub const fn new(addr: u64, len: u64) -> Result<IoRange, BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { addr });
        }
        if addr.checked_add(len - 1).is_none() {
            return Err(BusError::Overflow { addr, len });
        }
        Ok(IoRange { addr, len })
    }

    /// The first address.
    ///
    /// ```
    /// assert_eq!(kvm_bus::IoRange::new(0x3f8, 8).unwrap().addr(), 0x3f8);
    /// ```
    pub const fn addr(&self) -> u64 {
        self.addr
    }

    /// The number of bytes (never 0).
    ///
    /// ```
    /// assert_eq!(kvm_bus::IoRange::new(0x3f8, 8).unwrap().len(), 8);
    /// ```
    #[allow(clippy::len_without_is_empty)] // never empty by construction
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// The last address (inclusive): `addr + len - 1`, which cannot
    /// overflow.
    ///
    /// ```
    /// assert_eq!(kvm_bus::IoRange::new(0x3f8, 8).unwrap().last(), 0x3ff);
    /// ```
    pub const fn last(&self) -> u64 {
        self.addr + (self.len - 1)
    }

    /// True if the access of `len` bytes at `addr` lies entirely inside the
    /// range. An access of length 0, or one that would wrap past
    /// `u64::MAX`, is contained in no range.
    ///
    /// ```
    /// let r = kvm_bus::IoRange::new(0x3f8, 8).unwrap();
    /// assert!(r.contains(0x3f8, 8));
    /// assert!(!r.contains(0x3f7, 2));
    /// assert!(!r.contains(0x3f8, 0));
    /// ```
    pub const fn contains(&self, addr: u64, len: u64) -> bool {
        if len == 0 || addr < self.addr {
            return false;
        }
        match addr.checked_add(len - 1) {
            Some(last) => last <= self.last(),
            None => false,
        }
    }
}

impl fmt::Debug for IoRange {
    /// `IoRange { addr: 0x3f8, len: 0x8 }`: the fields, in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoRange")
            .field("addr", &Hex(self.addr))
            .field("len", &Hex(self.len))
            .finish()
    }
}

impl fmt::Display for IoRange {
    /// `[0x3f8, 0x3ff]`: first and last address, in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.addr, self.last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_zero_and_overflow() {
        assert_eq!(IoRange::new(5, 0), Err(BusError::ZeroLength { addr: 5 }));
        assert_eq!(
            IoRange::new(u64::MAX - 1, 3),
            Err(BusError::Overflow {
                addr: u64::MAX - 1,
                len: 3
            })
        );
        assert_eq!(
            IoRange::new(2, u64::MAX),
            Err(BusError::Overflow {
                addr: 2,
                len: u64::MAX
            })
        );
        assert_eq!(IoRange::new(1, u64::MAX).unwrap().last(), u64::MAX);
        let whole = IoRange::new(0, u64::MAX).unwrap();
        assert_eq!(whole.last(), u64::MAX - 1);
        let top = IoRange::new(u64::MAX - 1, 2).unwrap();
        assert_eq!(top.last(), u64::MAX);
    }

    #[test]
    fn contains_edges() {
        let r = IoRange::new(0x10, 0x10).unwrap();
        assert!(r.contains(0x10, 1));
        assert!(r.contains(0x1f, 1));
        assert!(!r.contains(0x20, 1));
        assert!(!r.contains(0xf, 1));
        assert!(r.contains(0x18, 8));
        assert!(!r.contains(0x19, 8));
        assert!(!r.contains(0x10, 0));
        assert!(!r.contains(u64::MAX, 2));
        let top = IoRange::new(u64::MAX - 7, 8).unwrap();
        assert!(top.contains(u64::MAX, 1));
        assert!(!top.contains(u64::MAX, 2));
    }

    #[test]
    fn order_is_addr_then_len() {
        let a = IoRange::new(1, 5).unwrap();
        let b = IoRange::new(1, 6).unwrap();
        let c = IoRange::new(2, 1).unwrap();
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "[0x1, 0x5]");
    }

    #[test]
    fn debug_is_hex() {
        let r = IoRange::new(0x3f8, 8).unwrap();
        assert_eq!(format!("{r:?}"), "IoRange { addr: 0x3f8, len: 0x8 }");
        assert_eq!(
            format!("{r:#?}"),
            "IoRange {\n    addr: 0x3f8,\n    len: 0x8,\n}"
        );
    }
}
