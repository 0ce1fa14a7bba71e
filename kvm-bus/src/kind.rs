//! [`BusKind`]: which of a VM's buses.

use core::fmt;

/// One of a VM's I/O buses (Linux's `enum kvm_bus`).
///
/// ```
/// use kvm_bus::BusKind;
/// assert_eq!(BusKind::ALL, [BusKind::Mmio, BusKind::Pio, BusKind::FastMmio]);
/// assert_eq!(BusKind::Pio.to_string(), "PIO");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BusKind {
    /// Memory-mapped I/O (`KVM_MMIO_BUS`).
    Mmio,
    /// Port I/O (`KVM_PIO_BUS`).
    Pio,
    /// MMIO exits that KVM reports without decoding the instruction
    /// (`KVM_FAST_MMIO_BUS`), used for doorbells.
    FastMmio,
}

impl BusKind {
    /// Every bus, in index order.
    pub const ALL: [BusKind; 3] = [BusKind::Mmio, BusKind::Pio, BusKind::FastMmio];

    /// The highest address a range on this bus may cover: `0xffff` for
    /// port I/O (x86 has 65536 ports), `u64::MAX` for the MMIO buses.
    ///
    /// ```
    /// assert_eq!(kvm_bus::BusKind::Pio.max_addr(), 0xffff);
    /// ```
    pub const fn max_addr(self) -> u64 {
        match self {
            BusKind::Pio => 0xffff,
            BusKind::Mmio | BusKind::FastMmio => u64::MAX,
        }
    }

    /// Position in [`BusKind::ALL`].
    pub(crate) const fn index(self) -> usize {
        match self {
            BusKind::Mmio => 0,
            BusKind::Pio => 1,
            BusKind::FastMmio => 2,
        }
    }
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Mmio => "MMIO",
            BusKind::Pio => "PIO",
            BusKind::FastMmio => "fast MMIO",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_all() {
        for (i, k) in BusKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
