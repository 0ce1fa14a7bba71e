//! A minimal VM for demos, tests and benchmarks: long mode, flat memory,
//! no firmware, no interrupt controller.
//!
//! This is not a VMM. It exists so that the bus can be exercised by real
//! vCPUs on real KVM with a few lines of setup: [`MiniVm::builder`] opens
//! `/dev/kvm`, creates the VM, maps anonymous guest memory at guest-physical
//! 0, builds identity page tables for the first 4 GiB (2 MiB pages), loads
//! guest code, and creates vCPUs that start directly in 64-bit mode at
//! their entry point (`rbx` = vCPU index, `rsp` = a private 16 KiB stack at
//! the top of RAM, interrupts off). Guest-physical addresses above RAM and
//! below 4 GiB are mapped by the page tables but backed by no memory slot,
//! so guest accesses there leave KVM as MMIO exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;

use super::error::VmError;
use super::guest::{CODE_ADDR, DATA_ADDR, PAGE_TABLES};
use super::stats::Latency;

/// Size of each vCPU's stack at the top of RAM.
pub const STACK_SIZE: u64 = 16 * 1024;
/// Default guest RAM size: 4 MiB.
pub const DEFAULT_MEM_SIZE: usize = 4 << 20;
/// Largest vCPU count the builder accepts.
pub const MAX_VCPUS: usize = 64;

const PAGE: usize = 4096;
const TSS_ADDR: usize = 0xfffb_d000;

/// Anonymous, shared-with-the-guest memory. All accessors are bounds
/// checked and use volatile or atomic accesses, since the guest may write
/// the same bytes concurrently.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access
// goes through volatile or atomic operations, so sharing the pointer
// between threads introduces no data race on the Rust side.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: ptr/size is exactly the mapping created in `new`; it is
        // unmapped once. A vCPU that still runs would get EFAULT from
        // KVM_RUN, not touch freed Rust memory.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

macro_rules! atomic_access {
    ($read:ident, $write:ident, $t:ty, $atomic:ty) => {
        #[doc = concat!("Atomically (acquire) reads a `", stringify!($t), "` at guest-physical `gpa`.")]
        ///
        /// Panics if the access is outside RAM or not naturally aligned.
        pub fn $read(&self, gpa: u64) -> $t {
            let p = self.checked::<$t>(gpa);
            // SAFETY: `checked` verified bounds and alignment; the memory
            // lives as long as `self`, and is only accessed atomically or
            // volatilely from Rust.
            unsafe { (*p.cast::<$atomic>()).load(std::sync::atomic::Ordering::Acquire) }
        }

        #[doc = concat!("Atomically (release) writes a `", stringify!($t), "` at guest-physical `gpa`.")]
        ///
        /// Everything this thread did before (a `register_dev`, ...) is
        /// ordered before the store. Panics if the access is outside RAM or
        /// not naturally aligned.
        pub fn $write(&self, gpa: u64, value: $t) {
            let p = self.checked::<$t>(gpa);
            // SAFETY: as in the read accessor.
            unsafe { (*p.cast::<$atomic>()).store(value, std::sync::atomic::Ordering::Release) }
        }
    };
}

impl GuestMemory {
    fn new(size: usize) -> Result<GuestMemory, VmError> {
        // SAFETY: anonymous private mapping, no fixed address; the result
        // is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VmError::Mmap {
                size,
                errno: errno::Error::last(),
            });
        }
        Ok(GuestMemory {
            ptr: ptr.cast(),
            size,
        })
    }

    /// RAM size in bytes (guest-physical `0..size`).
    pub fn size(&self) -> usize {
        self.size
    }

    fn checked<T>(&self, gpa: u64) -> *mut T {
        let n = std::mem::size_of::<T>() as u64;
        assert!(
            gpa.checked_add(n)
                .is_some_and(|end| end <= self.size as u64),
            "guest access {gpa:#x}+{n} outside RAM (size {:#x})",
            self.size
        );
        assert!(
            gpa.is_multiple_of(n),
            "guest access {gpa:#x}+{n} not aligned"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.add(gpa as usize).cast() }
    }

    atomic_access!(read_u8, write_u8, u8, std::sync::atomic::AtomicU8);
    atomic_access!(read_u16, write_u16, u16, std::sync::atomic::AtomicU16);
    atomic_access!(read_u32, write_u32, u32, std::sync::atomic::AtomicU32);
    atomic_access!(read_u64, write_u64, u64, std::sync::atomic::AtomicU64);

    /// Volatile copy of guest memory at `gpa` into `buf`. Panics if outside
    /// RAM.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) {
        let base = self.range(gpa, buf.len());
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `range` checked that gpa..gpa+len is inside the mapping.
            *b = unsafe { base.add(i).read_volatile() };
        }
    }

    /// Volatile copy of `bytes` into guest memory at `gpa`. Panics if
    /// outside RAM.
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        let base = self.range(gpa, bytes.len());
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `range` checked that gpa..gpa+len is inside the mapping.
            unsafe { base.add(i).write_volatile(*b) };
        }
    }

    fn range(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa.checked_add(len as u64)
                .is_some_and(|end| end <= self.size as u64),
            "guest range {gpa:#x}+{len} outside RAM (size {:#x})",
            self.size
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.ptr.add(gpa as usize) }
    }
}

/// Configuration of a [`MiniVm`]; see [`MiniVm::builder`].
#[derive(Debug, Clone)]
pub struct MiniVmBuilder {
    mem_size: usize,
    vcpus: usize,
    loads: Vec<(u64, Vec<u8>)>,
    entry: u64,
    entries: Vec<(usize, u64)>,
}

impl Default for MiniVmBuilder {
    fn default() -> Self {
        MiniVmBuilder {
            mem_size: DEFAULT_MEM_SIZE,
            vcpus: 1,
            loads: Vec::new(),
            entry: CODE_ADDR,
            entries: Vec::new(),
        }
    }
}

impl MiniVmBuilder {
    /// Guest RAM size in bytes (default 4 MiB; a multiple of 4 KiB, at
    /// least 2 MiB plus the stacks, at most 3 GiB).
    pub fn mem_size(mut self, bytes: usize) -> Self {
        self.mem_size = bytes;
        self
    }

    /// Number of vCPUs (default 1, at most [`MAX_VCPUS`]).
    pub fn vcpus(mut self, n: usize) -> Self {
        self.vcpus = n;
        self
    }

    /// Loads `code` at [`CODE_ADDR`] (the default entry point).
    pub fn code(self, code: &[u8]) -> Self {
        self.load(CODE_ADDR, code)
    }

    /// Copies `bytes` into guest memory at `gpa` before the vCPUs exist.
    pub fn load(mut self, gpa: u64, bytes: &[u8]) -> Self {
        self.loads.push((gpa, bytes.to_vec()));
        self
    }

    /// Entry point (guest address) of every vCPU without its own (default
    /// [`CODE_ADDR`]).
    pub fn entry(mut self, rip: u64) -> Self {
        self.entry = rip;
        self
    }

    /// Entry point of vCPU `index` only.
    pub fn vcpu_entry(mut self, index: usize, rip: u64) -> Self {
        self.entries.push((index, rip));
        self
    }

    /// Creates the VM. Fails with [`VmError::KvmUnavailable`] when `/dev/kvm`
    /// cannot be opened or refuses to create a VM.
    pub fn build(self) -> Result<MiniVm, VmError> {
        let stacks = self.vcpus as u64 * STACK_SIZE;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs (1..={MAX_VCPUS})",
                self.vcpus
            )));
        }
        if !self.mem_size.is_multiple_of(PAGE)
            || (self.mem_size as u64) < DATA_ADDR + (1 << 20) + stacks
            || self.mem_size as u64 > 3 << 30
        {
            return Err(VmError::Config(format!(
                "memory size {:#x}: a multiple of 4 KiB, at least {:#x}, at most 3 GiB",
                self.mem_size,
                DATA_ADDR + (1 << 20) + stacks
            )));
        }
        for (gpa, bytes) in &self.loads {
            let end = gpa.checked_add(bytes.len() as u64);
            if *gpa < CODE_ADDR || end.is_none_or(|e| e > self.mem_size as u64 - stacks) {
                return Err(VmError::Config(format!(
                    "load of {} bytes at {gpa:#x} outside {CODE_ADDR:#x}..{:#x}",
                    bytes.len(),
                    self.mem_size as u64 - stacks
                )));
            }
        }
        if let Some((i, _)) = self.entries.iter().find(|(i, _)| *i >= self.vcpus) {
            return Err(VmError::Config(format!(
                "entry point for vCPU {i} of {}",
                self.vcpus
            )));
        }

        let (kvm, vm) = open()?;
        let mem = Arc::new(GuestMemory::new(self.mem_size)?);
        write_page_tables(&mem);
        for (gpa, bytes) in &self.loads {
            mem.write_bytes(*gpa, bytes);
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.mem_size as u64,
            userspace_addr: mem.ptr as u64,
        };
        // SAFETY: the region is a valid mapping of `memory_size` bytes that
        // outlives the VM's use of it (MiniVm keeps the Arc; a vCPU outliving
        // it would only see EFAULT).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        // Needed on Intel hosts without unrestricted guest; harmless elsewhere.
        vm.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(self.vcpus);
        for index in 0..self.vcpus {
            let vcpu = vm
                .create_vcpu(index as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = cpuid.clone();
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24);
                }
            }
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            setup_long_mode(&vcpu)?;
            let rip = self
                .entries
                .iter()
                .rev()
                .find(|(i, _)| *i == index)
                .map_or(self.entry, |&(_, rip)| rip);
            let regs = kvm_regs {
                rip,
                rsp: self.mem_size as u64 - index as u64 * STACK_SIZE - 16,
                rbx: index as u64,
                rflags: 0x2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpus.push(vcpu);
        }
        Ok(MiniVm {
            vcpus,
            vm,
            mem,
            _kvm: kvm,
        })
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |errno| VmError::Kvm { op, errno }
}

fn open() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(|errno| VmError::KvmUnavailable {
        op: "open /dev/kvm",
        errno,
    })?;
    let vm = kvm.create_vm().map_err(|errno| VmError::KvmUnavailable {
        op: "create a VM",
        errno,
    })?;
    Ok((kvm, vm))
}

/// PML4 -> one PDPT -> four page directories of 2 MiB pages: identity map
/// of 0..4 GiB.
fn write_page_tables(mem: &GuestMemory) {
    let pml4 = PAGE_TABLES;
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    mem.write_u64(pml4, pdpt | 0x3);
    for i in 0..4u64 {
        let pd = pd0 + i * 0x1000;
        mem.write_u64(pdpt + i * 8, pd | 0x3);
        for j in 0..512u64 {
            let addr = (i << 30) | (j << 21);
            mem.write_u64(pd + j * 8, addr | 0x83); // present, writable, 2 MiB
        }
    }
}

fn setup_long_mode(vcpu: &VcpuFd) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr3 = PAGE_TABLES;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// Timing of the kernel's own `KVM_IOEVENTFD` assign / deassign ioctls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoeventfdTiming {
    /// `KVM_IOEVENTFD` (assign) latency.
    pub register: Latency,
    /// `KVM_IOEVENTFD` with `KVM_IOEVENTFD_FLAG_DEASSIGN` latency.
    pub unregister: Latency,
}

/// A minimal VM: guest memory, guest code and vCPUs in long mode. For
/// demos, tests and benchmarks of the bus; not a VMM.
///
/// [`MiniVm::builder`] opens `/dev/kvm`, creates the VM, maps anonymous
/// guest memory at guest-physical 0, builds identity page tables for the
/// first 4 GiB (2 MiB pages, at [`PAGE_TABLES`](crate::kvm::guest::PAGE_TABLES)),
/// loads guest code, and creates vCPUs that start directly in 64-bit mode
/// at their entry point: `rbx` = vCPU index, `rsp` = a private
/// [`STACK_SIZE`] stack at the top of RAM, `rflags` = 2 (interrupts off),
/// flat segments set through `KVM_SET_SREGS` (no GDT in guest memory).
/// There is no in-kernel irqchip, so `hlt` exits to the VMM.
/// Guest-physical addresses above RAM and below 4 GiB are mapped by the
/// page tables but backed by no memory slot, so guest accesses there leave
/// KVM as MMIO exits.
#[derive(Debug)]
pub struct MiniVm {
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    mem: Arc<GuestMemory>,
    _kvm: Kvm,
}

impl MiniVm {
    /// A builder with the defaults: 4 MiB RAM, one vCPU, entry at
    /// [`CODE_ADDR`].
    pub fn builder() -> MiniVmBuilder {
        MiniVmBuilder::default()
    }

    /// Checks that this process can open `/dev/kvm` and create a VM.
    pub fn probe() -> Result<(), VmError> {
        open().map(drop)
    }

    /// The VM file descriptor (for ioctls the mini VM does not wrap).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Guest memory; clone the `Arc` to share it with a VMM thread.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Takes the vCPUs out (in index order), to move each to its own
    /// thread. Empty the second time.
    pub fn take_vcpus(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.vcpus)
    }

    /// Registers and unregisters an eventfd on port `port` with
    /// `KVM_IOEVENTFD` `rounds` times, timing each ioctl: the kernel's own
    /// I/O-bus registration latency, on this VM. Do not use a port the guest
    /// writes to while this runs (the kernel would swallow the writes).
    pub fn ioeventfd_latency(&self, port: u16, rounds: usize) -> Result<IoeventfdTiming, VmError> {
        let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            op: "eventfd",
            errno: errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        let addr = IoEventAddress::Pio(u64::from(port));
        let mut reg = Vec::with_capacity(rounds);
        let mut unreg = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            self.vm
                .register_ioevent(&efd, &addr, NoDatamatch)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            reg.push(t.elapsed());
            let t = Instant::now();
            self.vm
                .unregister_ioevent(&efd, &addr, NoDatamatch)
                .map_err(kvm_err("KVM_IOEVENTFD (deassign)"))?;
            unreg.push(t.elapsed());
        }
        Ok(IoeventfdTiming {
            register: Latency::from_samples(&mut reg),
            unregister: Latency::from_samples(&mut unreg),
        })
    }
}

/// Time one call (helper for latency tables).
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}
