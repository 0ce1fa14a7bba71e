//! [`BusError`]: everything that can go wrong, with what and where.

use crate::{BusKind, IoRange};
use core::fmt;

/// Errors of range construction, registration and dispatch.
///
/// Every update-side error leaves the published bus unchanged. Dispatch
/// errors are ordinary results (guest-controlled input never panics).
///
/// `Debug` prints addresses (and range lengths) in hex, as `Display` does;
/// access lengths, counts and caps stay decimal.
///
/// ```
/// use kvm_bus::{BusError, BusKind};
/// let e = BusError::Unhandled { addr: 0xfee0_0000, len: 4 };
/// assert_eq!(e.to_string(), "no device accepted the 4-byte access at 0xfee00000");
/// assert_eq!(format!("{e:?}"), "Unhandled { addr: 0xfee00000, len: 4 }");
/// let e = BusError::BusFull { kind: BusKind::Pio, max: 1000 };
/// assert_eq!(e.to_string(), "the PIO bus is full (at most 1000 devices)");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusError {
    /// A range of length 0 starting at `addr`.
    ///
    /// In the kernel, a length-0 range means "this exact address, any
    /// access length" (ioeventfd doorbells without data match, on the fast
    /// MMIO bus, where KVM does not decode the access). kvm-bus refuses it:
    /// a userspace exit always carries the access's address and length, so
    /// a doorbell is registered at its real width (`IoRange::new(db, 4)`)
    /// and gets exactly the accesses that fit, with no special case in the
    /// lookup of every other device.
    ZeroLength {
        /// Start of the rejected range.
        addr: u64,
    },
    /// A range `[addr, addr + len)` that extends past `u64::MAX`.
    Overflow {
        /// Start of the rejected range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Registration would put more than `max` devices on the bus.
    BusFull {
        /// The bus.
        kind: BusKind,
        /// Its cap ([`Buses::max_devices`](crate::Buses::max_devices)).
        max: usize,
    },
    /// Unregistering (or moving) a device that is not on the bus (at the
    /// given range, for the by-range operations).
    NotRegistered {
        /// The bus.
        kind: BusKind,
    },
    /// A range that does not fit the bus: past port `0xffff` on the PIO
    /// bus ([`BusKind::max_addr`]).
    OutsideBus {
        /// The bus.
        kind: BusKind,
        /// The rejected range.
        range: IoRange,
    },
    /// A range that overlaps one already registered, on a bus that rejects
    /// overlaps ([`Buses::set_reject_overlaps`](crate::Buses::set_reject_overlaps)).
    Overlap {
        /// The bus.
        kind: BusKind,
        /// The rejected range.
        range: IoRange,
        /// The registered range it overlaps.
        existing: IoRange,
    },
    /// Unregistering from inside a read section of the buses' own SRCU
    /// domain: from a device handler during dispatch, or while the calling
    /// thread holds a [`ReadGuard`](crate::ReadGuard) of
    /// [`Buses::srcu`](crate::Buses::srcu). Unregistering waits for a grace
    /// period, which would wait for that very section, forever. Nothing
    /// changed: the device is still registered and still dispatched to.
    /// Unregister from a thread outside the section (e.g. hand the request
    /// to a VMM thread).
    InReadSection {
        /// The bus.
        kind: BusKind,
    },
    /// An access of length 0 or longer than
    /// [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN) bytes.
    InvalidAccessLength {
        /// Address of the access.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// A well-formed access that no device accepted (none covers it, or
    /// every one that does declined), or one that wraps past `u64::MAX`.
    Unhandled {
        /// Address of the access.
        addr: u64,
        /// Its length.
        len: usize,
    },
}

/// A number that `Debug` prints as `0x3f8` (in `{:?}` and `{:#?}` alike).
pub(crate) struct Hex(pub(crate) u64);

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for BusError {
    /// The derived struct-like form, with addresses in hex:
    /// `Unhandled { addr: 0x3f8, len: 1 }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BusError::ZeroLength { addr } => f
                .debug_struct("ZeroLength")
                .field("addr", &Hex(addr))
                .finish(),
            BusError::Overflow { addr, len } => f
                .debug_struct("Overflow")
                .field("addr", &Hex(addr))
                .field("len", &Hex(len))
                .finish(),
            BusError::BusFull { kind, max } => f
                .debug_struct("BusFull")
                .field("kind", &kind)
                .field("max", &max)
                .finish(),
            BusError::NotRegistered { kind } => f
                .debug_struct("NotRegistered")
                .field("kind", &kind)
                .finish(),
            BusError::OutsideBus { kind, range } => f
                .debug_struct("OutsideBus")
                .field("kind", &kind)
                .field("range", &range)
                .finish(),
            BusError::Overlap {
                kind,
                range,
                existing,
            } => f
                .debug_struct("Overlap")
                .field("kind", &kind)
                .field("range", &range)
                .field("existing", &existing)
                .finish(),
            BusError::InReadSection { kind } => f
                .debug_struct("InReadSection")
                .field("kind", &kind)
                .finish(),
            BusError::InvalidAccessLength { addr, len } => f
                .debug_struct("InvalidAccessLength")
                .field("addr", &Hex(addr))
                .field("len", &len)
                .finish(),
            BusError::Unhandled { addr, len } => f
                .debug_struct("Unhandled")
                .field("addr", &Hex(addr))
                .field("len", &len)
                .finish(),
        }
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BusError::ZeroLength { addr } => {
                write!(f, "zero-length I/O range at {addr:#x}")
            }
            BusError::Overflow { addr, len } => write!(
                f,
                "I/O range at {addr:#x} of length {len:#x} extends past the end of the address space"
            ),
            BusError::BusFull { kind, max } => {
                write!(f, "the {kind} bus is full (at most {max} devices)")
            }
            BusError::NotRegistered { kind } => {
                write!(f, "device is not registered on the {kind} bus")
            }
            BusError::OutsideBus { kind, range } => write!(
                f,
                "I/O range {range} does not fit the {kind} bus (highest address {:#x})",
                kind.max_addr()
            ),
            BusError::Overlap {
                kind,
                range,
                existing,
            } => write!(
                f,
                "I/O range {range} overlaps {existing} on the {kind} bus, which rejects overlaps"
            ),
            BusError::InReadSection { kind } => write!(
                f,
                "cannot unregister from the {kind} bus inside a read section of its own SRCU \
                 domain (e.g. from a device handler): the grace period would wait for the caller \
                 itself; nothing was changed"
            ),
            BusError::InvalidAccessLength { addr, len } => write!(
                f,
                "invalid access length {len} at {addr:#x} (must be 1 to {} bytes)",
                crate::MAX_ACCESS_LEN
            ),
            BusError::Unhandled { addr, len } => {
                write!(f, "no device accepted the {len}-byte access at {addr:#x}")
            }
        }
    }
}

impl std::error::Error for BusError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_what_and_where() {
        let cases = [
            (BusError::ZeroLength { addr: 0x10 }, "0x10"),
            (BusError::Overflow { addr: 0x20, len: 3 }, "0x20"),
            (
                BusError::BusFull {
                    kind: BusKind::Mmio,
                    max: 7,
                },
                "MMIO",
            ),
            (
                BusError::NotRegistered {
                    kind: BusKind::FastMmio,
                },
                "fast MMIO",
            ),
            (
                BusError::InReadSection { kind: BusKind::Pio },
                "wait for the caller itself",
            ),
            (
                BusError::OutsideBus {
                    kind: BusKind::Pio,
                    range: IoRange::new(0x1_0000, 8).unwrap(),
                },
                "I/O range [0x10000, 0x10007] does not fit the PIO bus (highest address 0xffff)",
            ),
            (
                BusError::Overlap {
                    kind: BusKind::Mmio,
                    range: IoRange::new(0x1000, 0x10).unwrap(),
                    existing: IoRange::new(0x1008, 4).unwrap(),
                },
                "overlaps [0x1008, 0x100b]",
            ),
            (
                BusError::InvalidAccessLength { addr: 0x30, len: 9 },
                "length 9 at 0x30",
            ),
            (BusError::Unhandled { addr: 0x40, len: 2 }, "at 0x40"),
        ];
        for (e, needle) in cases {
            let s = e.to_string();
            assert!(s.contains(needle), "{s:?} lacks {needle:?}");
            let _: &dyn std::error::Error = &e;
        }
    }

    #[test]
    fn debug_prints_addresses_in_hex() {
        let cases = [
            (
                BusError::ZeroLength { addr: 0x3f8 },
                "ZeroLength { addr: 0x3f8 }",
            ),
            (
                BusError::Overflow {
                    addr: u64::MAX,
                    len: 0x10,
                },
                "Overflow { addr: 0xffffffffffffffff, len: 0x10 }",
            ),
            (
                BusError::BusFull {
                    kind: BusKind::Mmio,
                    max: 1000,
                },
                "BusFull { kind: Mmio, max: 1000 }",
            ),
            (
                BusError::NotRegistered { kind: BusKind::Pio },
                "NotRegistered { kind: Pio }",
            ),
            (
                BusError::OutsideBus {
                    kind: BusKind::Pio,
                    range: IoRange::new(0xfff8, 0x10).unwrap(),
                },
                "OutsideBus { kind: Pio, range: IoRange { addr: 0xfff8, len: 0x10 } }",
            ),
            (
                BusError::Overlap {
                    kind: BusKind::Mmio,
                    range: IoRange::new(0x1000, 0x10).unwrap(),
                    existing: IoRange::new(0x1008, 4).unwrap(),
                },
                "Overlap { kind: Mmio, range: IoRange { addr: 0x1000, len: 0x10 }, \
                 existing: IoRange { addr: 0x1008, len: 0x4 } }",
            ),
            (
                BusError::InReadSection {
                    kind: BusKind::FastMmio,
                },
                "InReadSection { kind: FastMmio }",
            ),
            (
                BusError::InvalidAccessLength { addr: 0x30, len: 9 },
                "InvalidAccessLength { addr: 0x30, len: 9 }",
            ),
            (
                BusError::Unhandled {
                    addr: 0xfee0_0000,
                    len: 4,
                },
                "Unhandled { addr: 0xfee00000, len: 4 }",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(format!("{e:?}"), want);
        }
        let pretty = format!(
            "{:#?}",
            BusError::Unhandled {
                addr: 0x3f8,
                len: 1
            }
        );
        assert_eq!(pretty, "Unhandled {\n    addr: 0x3f8,\n    len: 1,\n}");
    }
}
