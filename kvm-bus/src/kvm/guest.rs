//! A tiny x86-64 machine-code emitter for demo and test guests.
//!
//! [`MiniVm`](super::MiniVm) starts every vCPU directly in 64-bit long mode
//! with flat segments and an identity map of the first 4 GiB, so guest code
//! is plain 64-bit code. [`Asm`] emits the handful of instructions a device
//! test needs (immediate moves, loads and stores through a base register,
//! `in`/`out` through `dx`, `rep ins`/`rep outs`, compare and jump, `pause`,
//! `hlt`, a locked exchange and increment for guest spinlocks and counters,
//! `rdtsc`) with forward and backward labels. No external assembler runs at
//! build time or at run time.
//!
//! Only the eight legacy registers are encodable ([`Reg`]); memory operands
//! are always `[base + disp32]`.
//!
//! ```
//! use kvm_bus::kvm::{Asm, Reg, Width};
//!
//! let mut a = Asm::new();
//! a.mov_imm(Reg::Rdx, 0x3f8); // port
//! a.mov_imm(Reg::Rax, u64::from(b'A'));
//! a.out_dx(Width::B1); // out dx, al
//! a.hlt();
//! let code = a.finish();
//! assert_eq!(code.last(), Some(&0xf4));
//! ```

use std::collections::HashMap;

/// Guest-physical address of the PML4 the mini VM builds (page tables occupy
/// `PAGE_TABLES .. PAGE_TABLES + 6 pages`).
pub const PAGE_TABLES: u64 = 0x1000;
/// Guest-physical (and virtual) address where guest code is loaded by
/// [`MiniVmBuilder::code`](super::MiniVmBuilder::code).
pub const CODE_ADDR: u64 = 0x1_0000;
/// Start of a scratch data area guest code and the VMM may share
/// (flags, result buffers): 1 MiB. [`MiniVm`](super::MiniVm) loads nothing
/// there and the vCPU stacks live at the top of RAM.
pub const DATA_ADDR: u64 = 0x10_0000;

/// One of the eight legacy 64-bit general-purpose registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
#[repr(u8)]
pub enum Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
}

/// Operand size of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// 1 byte (`al`, `byte ptr`).
    B1,
    /// 2 bytes (`ax`, `word ptr`).
    B2,
    /// 4 bytes (`eax`, `dword ptr`).
    B4,
    /// 8 bytes (`rax`, `qword ptr`); not valid for port I/O.
    B8,
}

impl Width {
    /// The size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::B1 => 1,
            Width::B2 => 2,
            Width::B4 => 4,
            Width::B8 => 8,
        }
    }

    /// The width of `bytes` bytes (1, 2, 4 or 8), or `None`.
    pub fn from_bytes(bytes: usize) -> Option<Width> {
        Some(match bytes {
            1 => Width::B1,
            2 => Width::B2,
            4 => Width::B4,
            8 => Width::B8,
            _ => return None,
        })
    }
}

/// Condition of a conditional jump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Equal / zero (`je`).
    Eq,
    /// Not equal / not zero (`jne`).
    Ne,
    /// Unsigned below (`jb`).
    Below,
    /// Unsigned above or equal (`jae`).
    AboveEq,
}

impl Cond {
    fn code(self) -> u8 {
        match self {
            Cond::Eq => 0x4,
            Cond::Ne => 0x5,
            Cond::Below => 0x2,
            Cond::AboveEq => 0x3,
        }
    }
}

/// A position in the code, bound with [`Asm::bind`] and jumped to with
/// [`Asm::jmp`] / [`Asm::jcc`] (before or after it is bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label(usize);

/// The x86-64 code emitter. Code is position independent except for
/// absolute addresses you put in registers yourself.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
    names: HashMap<String, Label>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Asm {
        Asm::default()
    }

    /// Bytes emitted so far (the offset of the next instruction).
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// True if nothing has been emitted.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// A fresh, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// A label with a name, so the VMM can look its offset up after
    /// [`finish`](Asm::finish) through [`offset_of`](Asm::offset_of) (for
    /// per-vCPU entry points). The same name always gives the same label.
    pub fn named(&mut self, name: &str) -> Label {
        if let Some(l) = self.names.get(name) {
            return *l;
        }
        let l = self.label();
        self.names.insert(name.to_owned(), l);
        l
    }

    /// Binds `label` to the current position. Panics if bound twice.
    pub fn bind(&mut self, label: Label) {
        assert!(self.labels[label.0].is_none(), "label bound twice");
        self.labels[label.0] = Some(self.code.len());
    }

    /// The offset of a bound named label, from the start of the code.
    pub fn offset_of(&self, name: &str) -> Option<u64> {
        let l = self.names.get(name)?;
        self.labels[l.0].map(|o| o as u64)
    }

    /// Resolves all jumps and returns the machine code. Panics if a jump
    /// targets a label that was never bound.
    pub fn finish(&mut self) -> Vec<u8> {
        for &(at, label) in &self.fixups {
            let target = self.labels[label.0].expect("jump to an unbound label");
            let rel = target as i64 - (at as i64 + 4);
            let rel = i32::try_from(rel).expect("jump too far");
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.fixups.clear();
        self.code.clone()
    }

    /// Emits raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn rel32(&mut self, target: Label) {
        self.fixups.push((self.code.len(), target));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `[base + disp32]` memory operand with `reg` in ModRM.reg.
    fn modrm_mem(&mut self, reg: u8, base: Reg, disp: i32) {
        self.code.push(0x80 | (reg << 3) | base as u8);
        if base == Reg::Rsp {
            self.code.push(0x24); // SIB: base rsp, no index
        }
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    fn modrm_reg(&mut self, reg: u8, rm: Reg) {
        self.code.push(0xc0 | (reg << 3) | rm as u8);
    }

    /// Operand-size prefixes for `w` (`66` for 2 bytes, `REX.W` for 8).
    fn size_prefix(&mut self, w: Width) {
        match w {
            Width::B2 => self.code.push(0x66),
            Width::B8 => self.code.push(0x48),
            _ => {}
        }
    }

    /// `mov reg, imm`: 5 bytes if `imm` fits in 32 bits (zero-extended),
    /// else the 10-byte `movabs`.
    pub fn mov_imm(&mut self, reg: Reg, imm: u64) {
        if let Ok(v) = u32::try_from(imm) {
            self.code.push(0xb8 + reg as u8);
            self.code.extend_from_slice(&v.to_le_bytes());
        } else {
            self.code.extend_from_slice(&[0x48, 0xb8 + reg as u8]);
            self.code.extend_from_slice(&imm.to_le_bytes());
        }
    }

    /// `mov dst, src` (64-bit).
    pub fn mov_reg(&mut self, dst: Reg, src: Reg) {
        self.code.push(0x48);
        self.code.push(0x89);
        self.modrm_reg(src as u8, dst);
    }

    /// Store: `mov [base + disp], src` of width `w` (`al`/`ax`/`eax`/`rax`
    /// style: the low `w` bytes of `src`).
    pub fn store(&mut self, w: Width, base: Reg, disp: i32, src: Reg) {
        self.size_prefix(w);
        self.code.push(if w == Width::B1 { 0x88 } else { 0x89 });
        self.modrm_mem(src as u8, base, disp);
    }

    /// Load: `mov dst, [base + disp]` of width `w`. A 1- or 2-byte load
    /// leaves the upper bits of `dst` unchanged; a 4-byte load zeroes them.
    pub fn load(&mut self, w: Width, dst: Reg, base: Reg, disp: i32) {
        self.size_prefix(w);
        self.code.push(if w == Width::B1 { 0x8a } else { 0x8b });
        self.modrm_mem(dst as u8, base, disp);
    }

    /// `mov dword [base + disp], imm32`.
    pub fn store_imm32(&mut self, base: Reg, disp: i32, imm: u32) {
        self.code.push(0xc7);
        self.modrm_mem(0, base, disp);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `cmp reg, imm32` (64-bit compare, immediate sign-extended).
    pub fn cmp_imm(&mut self, reg: Reg, imm: i32) {
        self.code.push(0x48);
        self.code.push(0x81);
        self.modrm_reg(7, reg);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `cmp a, b` (64-bit).
    pub fn cmp_reg(&mut self, a: Reg, b: Reg) {
        self.code.push(0x48);
        self.code.push(0x39);
        self.modrm_reg(b as u8, a);
    }

    /// `cmp dword [base + disp], reg32`.
    pub fn cmp_mem32(&mut self, base: Reg, disp: i32, reg: Reg) {
        self.code.push(0x39);
        self.modrm_mem(reg as u8, base, disp);
    }

    /// `add reg, imm32` (64-bit, immediate sign-extended).
    pub fn add_imm(&mut self, reg: Reg, imm: i32) {
        self.code.push(0x48);
        self.code.push(0x81);
        self.modrm_reg(0, reg);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `and reg, imm32` (64-bit, immediate sign-extended).
    pub fn and_imm(&mut self, reg: Reg, imm: i32) {
        self.code.push(0x48);
        self.code.push(0x81);
        self.modrm_reg(4, reg);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `add dst, src` (64-bit).
    pub fn add_reg(&mut self, dst: Reg, src: Reg) {
        self.code.push(0x48);
        self.code.push(0x01);
        self.modrm_reg(src as u8, dst);
    }

    /// `sub dst, src` (64-bit).
    pub fn sub_reg(&mut self, dst: Reg, src: Reg) {
        self.code.push(0x48);
        self.code.push(0x29);
        self.modrm_reg(src as u8, dst);
    }

    /// `or dst, src` (64-bit).
    pub fn or_reg(&mut self, dst: Reg, src: Reg) {
        self.code.push(0x48);
        self.code.push(0x09);
        self.modrm_reg(src as u8, dst);
    }

    /// `xchg [base + disp], reg` (64-bit; implicitly locked, so a
    /// test-and-set for a guest spinlock).
    pub fn xchg_mem(&mut self, base: Reg, disp: i32, reg: Reg) {
        self.code.push(0x48);
        self.code.push(0x87);
        self.modrm_mem(reg as u8, base, disp);
    }

    /// `lock inc dword [base + disp]` (an atomic counter in guest memory).
    pub fn lock_inc32(&mut self, base: Reg, disp: i32) {
        self.code.extend_from_slice(&[0xf0, 0xff]);
        self.modrm_mem(0, base, disp);
    }

    /// `rdtsc`: the time-stamp counter in `edx:eax` (upper halves of `rdx`
    /// and `rax` zeroed).
    pub fn rdtsc(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0x31]);
    }

    /// `shl reg, imm8` (64-bit).
    pub fn shl_imm(&mut self, reg: Reg, imm: u8) {
        self.code.extend_from_slice(&[0x48, 0xc1]);
        self.modrm_reg(4, reg);
        self.code.push(imm);
    }

    /// `inc reg` (64-bit).
    pub fn inc(&mut self, reg: Reg) {
        self.code.push(0x48);
        self.code.push(0xff);
        self.modrm_reg(0, reg);
    }

    /// `dec reg` (64-bit).
    pub fn dec(&mut self, reg: Reg) {
        self.code.push(0x48);
        self.code.push(0xff);
        self.modrm_reg(1, reg);
    }

    /// `jmp target` (rel32).
    pub fn jmp(&mut self, target: Label) {
        self.code.push(0xe9);
        self.rel32(target);
    }

    /// `jcc target` (rel32).
    pub fn jcc(&mut self, cond: Cond, target: Label) {
        self.code.extend_from_slice(&[0x0f, 0x80 | cond.code()]);
        self.rel32(target);
    }

    /// `dec rcx; jnz target`: a `loop` with a 32-bit displacement.
    pub fn loop_rcx(&mut self, target: Label) {
        self.dec(Reg::Rcx);
        self.jcc(Cond::Ne, target);
    }

    /// `out dx, al|ax|eax`. Panics for [`Width::B8`].
    pub fn out_dx(&mut self, w: Width) {
        match w {
            Width::B1 => self.code.push(0xee),
            Width::B2 => self.code.extend_from_slice(&[0x66, 0xef]),
            Width::B4 => self.code.push(0xef),
            Width::B8 => panic!("no 8-byte port I/O on x86"),
        }
    }

    /// `in al|ax|eax, dx`. Panics for [`Width::B8`].
    pub fn in_dx(&mut self, w: Width) {
        match w {
            Width::B1 => self.code.push(0xec),
            Width::B2 => self.code.extend_from_slice(&[0x66, 0xed]),
            Width::B4 => self.code.push(0xed),
            Width::B8 => panic!("no 8-byte port I/O on x86"),
        }
    }

    /// `rep outs{b,w,d}`: writes `rcx` elements from `[rsi]` to port `dx`.
    /// Panics for [`Width::B8`].
    pub fn rep_outs(&mut self, w: Width) {
        match w {
            Width::B1 => self.code.extend_from_slice(&[0xf3, 0x6e]),
            Width::B2 => self.code.extend_from_slice(&[0x66, 0xf3, 0x6f]),
            Width::B4 => self.code.extend_from_slice(&[0xf3, 0x6f]),
            Width::B8 => panic!("no 8-byte port I/O on x86"),
        }
    }

    /// `rep ins{b,w,d}`: reads `rcx` elements from port `dx` into `[rdi]`.
    /// Panics for [`Width::B8`].
    pub fn rep_ins(&mut self, w: Width) {
        match w {
            Width::B1 => self.code.extend_from_slice(&[0xf3, 0x6c]),
            Width::B2 => self.code.extend_from_slice(&[0x66, 0xf3, 0x6d]),
            Width::B4 => self.code.extend_from_slice(&[0xf3, 0x6d]),
            Width::B8 => panic!("no 8-byte port I/O on x86"),
        }
    }

    /// `pause` (spin-loop hint).
    pub fn pause(&mut self) {
        self.code.extend_from_slice(&[0xf3, 0x90]);
    }

    /// `hlt`: with the mini VM (no in-kernel irqchip) this returns
    /// [`VmExit::Hlt`](super::VmExit::Hlt) to the VMM.
    pub fn hlt(&mut self) {
        self.code.push(0xf4);
    }

    /// `count` `pause`s (at least 1), counted down in `rcx`: a breather in
    /// a guest loop that should leave the host CPUs to the VMM's threads
    /// now and then. Clobbers `rcx` and flags.
    ///
    /// ```
    /// let mut a = kvm_bus::kvm::Asm::new();
    /// a.pause_n(50);
    /// a.hlt();
    /// // mov ecx, 50; pause; dec rcx; jnz -9; hlt
    /// assert_eq!(a.finish().len(), 5 + 2 + 3 + 6 + 1);
    /// ```
    pub fn pause_n(&mut self, count: u64) {
        self.mov_imm(Reg::Rcx, count);
        let top = self.label();
        self.bind(top);
        self.pause();
        self.loop_rcx(top);
    }

    /// What a polling 8250/16550 UART driver does to transmit: writes the
    /// `rcx` bytes at `[rsi]` (`rcx` at least 1) to the UART at port
    /// `uart`, each once its line status register (`uart + 5`) says the
    /// transmitter holding register is empty (bit 5). Clobbers `rax`,
    /// `rcx`, `rdx`, `rsi` and flags.
    ///
    /// ```
    /// use kvm_bus::kvm::{Asm, Reg};
    ///
    /// let mut a = Asm::new();
    /// a.mov_imm(Reg::Rsi, 0x2000); // the text, in guest memory
    /// a.mov_imm(Reg::Rcx, 5); // its length
    /// a.uart_write(0x3f8); // COM1
    /// a.hlt();
    /// assert!(a.finish().ends_with(&[0xf4]));
    /// ```
    pub fn uart_write(&mut self, uart: u64) {
        /// Line status register: transmitter holding register empty.
        const LSR_THR_EMPTY: i32 = 0x20;
        let (next, busy) = (self.label(), self.label());
        self.bind(next);
        self.mov_imm(Reg::Rdx, uart + 5);
        self.bind(busy);
        self.in_dx(Width::B1);
        self.and_imm(Reg::Rax, LSR_THR_EMPTY);
        self.cmp_imm(Reg::Rax, 0);
        self.jcc(Cond::Eq, busy);
        self.load(Width::B1, Reg::Rax, Reg::Rsi, 0);
        self.mov_imm(Reg::Rdx, uart);
        self.out_dx(Width::B1);
        self.inc(Reg::Rsi);
        self.loop_rcx(next);
    }

    /// Spins (with `pause`) until the dword at `[base + disp]` equals the
    /// low 32 bits of `value`. Clobbers nothing but flags.
    pub fn wait_eq32(&mut self, base: Reg, disp: i32, value: Reg) {
        let top = self.label();
        let done = self.label();
        self.bind(top);
        self.cmp_mem32(base, disp, value);
        self.jcc(Cond::Eq, done);
        self.pause();
        self.jmp(top);
        self.bind(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::new();
        a.mov_imm(Reg::Rdx, 0x3f8);
        assert_eq!(a.finish(), [0xba, 0xf8, 0x03, 0, 0]);
        let mut a = Asm::new();
        a.mov_imm(Reg::Rdi, 0xd000_0000_0000);
        assert_eq!(a.finish()[..2], [0x48, 0xbf]);
        let mut a = Asm::new();
        a.store(Width::B8, Reg::Rdi, 8, Reg::Rax);
        assert_eq!(a.finish(), [0x48, 0x89, 0x87, 8, 0, 0, 0]);
        let mut a = Asm::new();
        a.load(Width::B2, Reg::Rcx, Reg::Rsp, 0);
        assert_eq!(a.finish(), [0x66, 0x8b, 0x8c, 0x24, 0, 0, 0, 0]);
        let mut a = Asm::new();
        a.sub_reg(Reg::Rax, Reg::Rcx);
        a.or_reg(Reg::Rax, Reg::Rdx);
        assert_eq!(a.finish(), [0x48, 0x29, 0xc8, 0x48, 0x09, 0xd0]);
        let mut a = Asm::new();
        a.xchg_mem(Reg::Rbp, 0x10, Reg::Rax);
        a.lock_inc32(Reg::Rbp, 0x20);
        a.rdtsc();
        assert_eq!(
            a.finish(),
            [0x48, 0x87, 0x85, 0x10, 0, 0, 0, 0xf0, 0xff, 0x85, 0x20, 0, 0, 0, 0x0f, 0x31]
        );
        let mut a = Asm::new();
        let l = a.label();
        a.bind(l);
        a.jmp(l);
        assert_eq!(a.finish(), [0xe9, 0xfb, 0xff, 0xff, 0xff]);
    }
}
