"""Run x86-64 guest code in the Unicorn engine with pks_emu as its MMU.

``attach(uc, machine)`` puts Unicorn (``unicorn`` 2.1.x from PyPI,
``UC_ARCH_X86``/``UC_MODE_64``) in virtual-TLB mode and installs a
``UC_HOOK_TLB_FILL`` hook: every Unicorn TLB miss becomes a
``CPU.translate`` of pks_emu (page walk, U/S, R/W, XD, SMAP/SMEP, PKRU and
PKRS checks, A/D updates), and the Unicorn TLB entry receives the physical
frame and only the permission pks_emu granted. A denied access stops the
guest; ``UnicornAttachment.run`` raises ``pks_emu.PageFault`` with the error
code, the faulting address (CR2) and the guest RIP.

Physical memory is pks_emu's: each frame a translation yields is mapped into
Unicorn's physical address space with ``Uc.mem_map_ptr`` on the host memory
of that very frame, so guest stores, Python's ``machine.memory`` and the page
tables are the same bytes. Unicorn never walks the page tables itself.

Key registers: Unicorn 2.1.4 cannot hook WRMSR/RDMSR (``uc_hook_add`` with
``UC_HOOK_INSN`` and ``UC_X86_INS_WRMSR`` returns ``UC_ERR_HOOK``: its x86
instruction hooks are IN, OUT, SYSCALL, SYSENTER, CPUID, RDTSC, RDTSCP), and
its CPU model has no PKU. So:

* WRMSR/RDMSR (0F 30 / 0F 32, optionally after a REX prefix): when a code
  page is first filled for a fetch, its bytes are scanned and a
  ``UC_HOOK_CODE`` hook is placed on each candidate address. The hook checks
  the instruction, emulates IA32_PKRS against pks_emu and skips it by setting
  RIP (IA32_EFER is mirrored into pks_emu, then executed by Unicorn too).
* WRPKRU/RDPKRU (0F 01 EF / 0F 01 EE) raise #UD in Unicorn (CR4.PKE is 0
  there); a ``UC_HOOK_INSN_INVALID`` hook emulates them against pks_emu and
  skips them.

Unicorn caches the permissions the hook granted, so after every change of
PKRS or PKRU (by the guest or from Python) its TLB is flushed: in the
instruction hooks, and at the start of each ``run``. See docs/embedding.md
for the limitations (self-modifying code, guest MOV CR/INVLPG, POPF of AC).

Importing this module does not import ``unicorn``; ``attach`` does, with a
clear error if it is missing.
"""
from __future__ import annotations

import struct

from typing import Any, Callable

from .. import _capi
from ..constants import CR4_SMAP, MSR_IA32_EFER, MSR_IA32_PKRS, PAGE_SIZE
from ..errors import CPUException, PageFault
from ..hooks import RETRY

#: ``RETRY`` (from ``pks_emu.hooks``, one sentinel for every ``on_fault``
#: API): returned by an ``on_fault`` callback to resume the guest at the
#: faulting instruction (the callback changed what made it fault).

_PAGE_MASK = ~(PAGE_SIZE - 1)
_REX = range(0x40, 0x50)
_WRMSR, _RDMSR = b"\x0f\x30", b"\x0f\x32"
_WRPKRU, _RDPKRU = b"\x0f\x01\xef", b"\x0f\x01\xee"


def _unicorn():
    """The unicorn modules, imported on first use."""
    try:
        import unicorn
        from unicorn import unicorn_const, x86_const
    except ImportError as e:
        raise ImportError(
            "pks_emu.integrations.unicorn needs the 'unicorn' package "
            "(pip install 'unicorn>=2.1.4,<2.2')") from e
    version = tuple(int(p) for p in unicorn.__version__.split(".")[:2] if p.isdigit())
    if version < (2, 1):
        raise ImportError(
            f"pks_emu.integrations.unicorn needs unicorn >= 2.1 (virtual TLB and "
            f"UC_HOOK_TLB_FILL); found {unicorn.__version__}")
    return unicorn, unicorn_const, x86_const


#: identical #PFs in a row delivered to the guest before ``run`` raises instead
MAX_REDELIVERIES = 16


class UnicornAttachment:
    """A pks_emu CPU acting as the MMU of one Unicorn engine (see ``attach``)."""

    def __init__(self, uc: Any, cpu: Any, *, cpl: int | str = "guest",
                 on_fault: Callable[[CPUException], Any] | None = None,
                 deliver_faults: bool = False) -> None:
        unicorn, uconst, x86 = _unicorn()
        self._uc_mod, self._K, self._X = unicorn, uconst, x86
        if not isinstance(uc, unicorn.Uc):
            raise TypeError(f"expected a unicorn.Uc, got {type(uc).__name__}")
        if uc.ctl_get_arch() != uconst.UC_ARCH_X86 or uc.ctl_get_mode() != uconst.UC_MODE_64:
            raise ValueError("pks_emu attaches to x86-64 engines only: "
                             "Uc(UC_ARCH_X86, UC_MODE_64)")
        if cpu.machine is None:
            raise ValueError("the CPU must belong to a pks_emu.Machine (for its memory)")
        if cpl != "guest" and cpl not in (0, 1, 2, 3):
            raise ValueError(f"cpl {cpl!r} not understood: expected 'guest' or 0..3")
        self.uc = uc
        self.cpu = cpu
        self.machine = cpu.machine
        self.memory = cpu.memory
        self.on_fault = on_fault
        self.deliver_faults = deliver_faults
        #: CR2 of the last #PF delivered to the guest
        self.cr2 = 0
        self._follow_cpl = cpl == "guest"
        if not self._follow_cpl:
            cpu.cpl = cpl
        self._perm = {0: uconst.UC_PROT_READ,
                      1: uconst.UC_PROT_READ | uconst.UC_PROT_WRITE,
                      2: uconst.UC_PROT_EXEC}
        self._kind_of = {uconst.UC_MEM_READ: 0, uconst.UC_MEM_WRITE: 1, uconst.UC_MEM_FETCH: 2}
        self._mapped: set[int] = set()          # physical frame numbers mapped in Unicorn
        self._code_pages: dict[int, int] = {}   # linear page -> frame, from fetch fills
        self._scanned: set[tuple[int, int]] = set()
        self._insn_hooks: dict[int, int] = {}   # address -> hook handle (WRMSR/RDMSR)
        self._fault: tuple[int, int, Any] | None = None
        self._pending: BaseException | None = None
        self._replay_page: int | None = None
        # A frame of the machine's own memory that no page table maps, used
        # when replaying a faulting instruction to learn its exact address.
        self._scratch = self.machine.alloc_frames(1)
        self.stats = {"tlb_fills": 0, "faults": 0, "emulated": 0, "tlb_flushes": 0,
                      "frames_mapped": 0, "delivered": 0}

        uc.ctl_set_tlb_mode(uconst.UC_TLB_VIRTUAL)
        # Translation blocks made before attach carry no instruction hooks.
        uc.ctl_flush_tb()
        self._map_frame(self._scratch)
        self._hooks = [
            uc.hook_add(uconst.UC_HOOK_TLB_FILL, self._on_tlb_fill),
            uc.hook_add(uconst.UC_HOOK_INSN_INVALID, self._on_invalid_insn),
        ]
        self.flush_tlb()

    # --- public ------------------------------------------------------------
    def run(self, begin: int, until: int, *, timeout: int = 0, count: int = 0) -> None:
        """``uc.emu_start`` with pks_emu's faults raised as exceptions.

        Raises ``PageFault`` (``address`` = CR2, ``error_code``, ``pkey``,
        ``rip``) for a denied access, ``GeneralProtectionFault`` /
        ``InvalidOpcode`` (with a ``rip`` attribute) for an emulated
        WRMSR/RDMSR/WRPKRU/RDPKRU that faults. With ``on_fault``, the
        callback sees the exception first; if it returns ``RETRY`` the guest
        resumes at the faulting instruction.
        """
        last, repeats = None, 0
        while True:
            try:
                self._run_once(begin, until, timeout, count)
                return
            except CPUException as exc:
                if self.on_fault is not None and self.on_fault(exc) == RETRY:
                    begin = getattr(exc, "rip")
                    continue
                if self.deliver_faults and isinstance(exc, PageFault) and self.cpu.cpl == 0:
                    # A handler that returns without fixing anything would
                    # fault again forever (so would hardware); stop after
                    # MAX_REDELIVERIES identical faults in a row instead.
                    key = (exc.rip, exc.address, exc.error_code)
                    repeats = repeats + 1 if key == last else 0
                    last = key
                    if repeats < MAX_REDELIVERIES:
                        begin = self._deliver_page_fault(exc)
                        continue
                raise

    def flush_tlb(self) -> None:
        """Drop Unicorn's TLB (not pks_emu's): needed after PKRS, PKRU, CR or
        page-table changes made from Python while the guest is stopped.
        ``run`` does it on entry."""
        self.uc.ctl(self._K.UC_CTL_TLB_FLUSH, self._K.UC_CTL_IO_WRITE)
        self.stats["tlb_flushes"] += 1

    def invlpg(self, va: int) -> None:
        """INVLPG on the pks_emu CPU and a flush of Unicorn's TLB."""
        self.cpu.invlpg(va)
        self.flush_tlb()

    def flush_code(self) -> None:
        """Forget translated code and instruction scans: call it after
        rewriting guest code through ``machine.memory``."""
        for h in self._insn_hooks.values():
            self.uc.hook_del(h)
        self._insn_hooks.clear()
        self._scanned.clear()
        self._code_pages.clear()
        self.uc.ctl_flush_tb()
        self.flush_tlb()

    @property
    def mapped_frames(self) -> list[int]:
        """Physical addresses of the frames mapped into Unicorn so far."""
        return sorted(pfn << 12 for pfn in self._mapped)

    def detach(self) -> None:
        """Remove the hooks and the frame mappings; Unicorn goes back to its own MMU."""
        for h in [*self._hooks, *self._insn_hooks.values()]:
            self.uc.hook_del(h)
        self._hooks.clear()
        self._insn_hooks.clear()
        for pfn in sorted(self._mapped):
            self.uc.mem_unmap(pfn << 12, PAGE_SIZE)
        self._mapped.clear()
        self.uc.ctl_set_tlb_mode(self._K.UC_TLB_CPU)
        self.uc.ctl_flush_tb()

    # --- running -----------------------------------------------------------
    def _run_once(self, begin: int, until: int, timeout: int, count: int) -> None:
        self._fault = None
        self._pending = None
        self.flush_tlb()
        try:
            self.uc.emu_start(begin, until, timeout, count)
        except self._uc_mod.UcError as e:
            if self._pending is not None:
                raise self._pending from None
            if self._fault is not None and e.errno == self._K.UC_ERR_EXCEPTION:
                raise self._page_fault() from None
            raise
        if self._pending is not None:
            raise self._pending

    def _stop(self, exc: BaseException, rip: int) -> None:
        exc.rip = rip  # type: ignore[attr-defined]
        if self._pending is None:
            self._pending = exc
        self.uc.emu_stop()

    def _sync_cpl(self) -> None:
        if self._follow_cpl:
            # In protected mode CS.RPL is the CPL.
            cpl = self.uc.reg_read(self._X.UC_X86_REG_CS) & 3
            if cpl != self.cpu.cpl:
                self.cpu.cpl = cpl
        if self.cpu.cr4 & CR4_SMAP:
            self.cpu.rflags = self.uc.reg_read(self._X.UC_X86_REG_EFLAGS)

    # --- exception delivery -------------------------------------------------
    def _implicit(self, va: int, kind: str, size: int) -> int:
        """Physical address of an implicit supervisor access (IDT read, stack
        push of event delivery, SDM §4.6.1), through pks_emu; a fault here
        would be a double fault, which is reported as the fault itself."""
        t = self.cpu.translate(va, kind, size, implicit=True)
        if not t.ok:
            raise t.exception()
        return t.pa

    def _deliver_page_fault(self, pf: PageFault) -> int:
        """Deliver ``pf`` to the guest's #PF handler as IA-32e event delivery
        does at CPL 0 (SDM §6.14): read gate 14 of the IDT, align RSP to 16,
        push SS, RSP, RFLAGS, CS, RIP and the error code, load CR2, clear
        IF for an interrupt gate, continue at the handler. Only faults at CPL 0
        are delivered (no stack switch through the TSS); returns the new RIP."""
        X = self._X
        _sel, idt_base, idt_limit, _flags = self.uc.reg_read(X.UC_X86_REG_IDTR)
        if 14 * 16 + 15 > idt_limit:
            raise pf
        gate = self.memory.read(self._implicit(idt_base + 14 * 16, "read", 16), 16)
        lo, hi = struct.unpack("<QQ", gate)
        gate_type = (lo >> 40) & 0xF
        if not (lo >> 47) & 1 or gate_type not in (0xE, 0xF):
            raise pf        # not-present or non-gate descriptor: #NP/#GP, then #DF
        handler = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
        rsp = self.uc.reg_read(X.UC_X86_REG_RSP) & ~0xF
        rflags = self.uc.reg_read(X.UC_X86_REG_EFLAGS)
        frame = [pf.error_code, pf.rip, self.uc.reg_read(X.UC_X86_REG_CS), rflags, rsp,
                 self.uc.reg_read(X.UC_X86_REG_SS)]
        rsp -= 8 * len(frame)
        data = struct.pack("<6Q", *frame)
        for i in range(0, len(data), 8):
            self.memory.write(self._implicit(rsp + i, "write", 8), data[i:i + 8])
        self.cr2 = pf.address
        self.uc.reg_write(X.UC_X86_REG_CR2, pf.address)
        self.uc.reg_write(X.UC_X86_REG_RSP, rsp)
        if gate_type == 0xE:
            rflags &= ~(1 << 9)                         # interrupt gate: IF = 0
        self.uc.reg_write(X.UC_X86_REG_EFLAGS, rflags & ~((1 << 8) | (1 << 16)))  # TF, RF
        self.stats["delivered"] += 1
        return handler

    # --- the MMU -----------------------------------------------------------
    def _on_tlb_fill(self, uc: Any, vaddr: int, access: int, entry: Any, user_data: Any) -> bool:
        # Unicorn passes the page address, not the accessed byte.
        if self._replay_page is not None and vaddr == self._replay_page:
            entry.paddr = self._scratch
            entry.perms = self._K.UC_PROT_ALL
            return True
        kind = self._kind_of.get(access, 0)
        self._sync_cpl()
        self.stats["tlb_fills"] += 1
        t = self.cpu.translate(vaddr, kind, 1)
        if not t.ok:
            if self._replay_page is None:
                self._fault = (vaddr, kind, t)
            return False
        frame = t.pa & _PAGE_MASK
        self._map_frame(frame)
        if kind == 2:
            self._scan_code(vaddr, frame)
        entry.paddr = frame
        # Only what pks_emu granted: a later access of another kind misses
        # and comes back here. A write implies a read on x86 (no write-only
        # pages; AD denies both), a fetch does not (keys ignore fetches).
        entry.perms = self._perm[kind]
        return True

    def _map_frame(self, frame: int) -> None:
        pfn = frame >> 12
        if pfn in self._mapped:
            return
        host = _capi.frame_address(self.memory, frame, True)
        self.uc.mem_map_ptr(frame, PAGE_SIZE, self._K.UC_PROT_ALL, host)
        self._mapped.add(pfn)
        self.stats["frames_mapped"] += 1

    def _page_fault(self) -> PageFault:
        vpage, kind, t = self._fault  # type: ignore[misc]
        rip = self.uc.reg_read(self._X.UC_X86_REG_RIP)
        if t.vector == 13:  # cannot happen for a page address, kept for safety
            exc: CPUException = t.exception()
            exc.rip = rip  # type: ignore[attr-defined]
            return exc  # type: ignore[return-value]
        if kind == 2:
            # An instruction that starts on an earlier page faults at the first byte of this one.
            address = rip if (rip & _PAGE_MASK) == vpage else vpage
        else:
            address = self._exact_address(rip, vpage)
        self.stats["faults"] += 1
        return PageFault(address, t.error_code, pkey=t.pkey, cpu=self.cpu.index, rip=rip)

    def _exact_address(self, rip: int, vpage: int) -> int:
        """Unicorn tells the TLB-fill hook only the page. Replay the faulting
        instruction once with that page backed by a scratch frame and a memory
        hook, read the offset, and restore the registers. An access that
        starts on the page before faults at the first byte of this page (SDM:
        CR2 is the address of the byte that faulted)."""
        uc, K = self.uc, self._K
        scratch_pfn = self._scratch >> 12
        offsets: list[int] = []

        def on_mem(uc: Any, access: int, address: int, size: int, value: int, user_data: Any) -> None:
            # In virtual-TLB mode memory hooks see the physical address.
            if address >> 12 == scratch_pfn:
                offsets.append(address & 0xFFF)
                uc.emu_stop()

        ctx = uc.context_save()
        self._replay_page = vpage
        h = uc.hook_add(K.UC_HOOK_MEM_READ | K.UC_HOOK_MEM_WRITE, on_mem)
        try:
            uc.emu_start(rip, 0, 0, 1)
        except self._uc_mod.UcError:
            pass
        finally:
            uc.hook_del(h)
            self._replay_page = None
            uc.context_restore(ctx)
            self.flush_tlb()
        return vpage + offsets[0] if offsets else vpage

    # --- key-register instructions -----------------------------------------
    def _scan_code(self, vpage: int, frame: int) -> None:
        if (vpage, frame) in self._scanned:
            return
        self._scanned.add((vpage, frame))
        self._code_pages[vpage] = frame
        data = self.memory.read(frame, PAGE_SIZE)
        offsets = set()
        for pattern in (_WRMSR, _RDMSR):
            i = data.find(pattern)
            while i >= 0:
                offsets.add(i)
                if i and data[i - 1] in _REX:
                    offsets.add(i - 1)
                i = data.find(pattern, i + 1)
        if data[-1] == 0x0F:        # may continue on the next page
            offsets.add(PAGE_SIZE - 1)
        for off in offsets:
            va = vpage + off
            if va not in self._insn_hooks:
                self._insn_hooks[va] = self.uc.hook_add(
                    self._K.UC_HOOK_CODE, self._on_msr_insn, begin=va, end=va)

    def _insn_bytes(self, va: int, size: int) -> bytes:
        out = b""
        while size > 0:
            frame = self._code_pages.get(va & _PAGE_MASK)
            if frame is None:
                return b""
            n = min(size, PAGE_SIZE - (va & 0xFFF))
            out += self.memory.read(frame + (va & 0xFFF), n)
            va += n
            size -= n
        return out

    def _reg(self, name: str) -> int:
        return self.uc.reg_read(getattr(self._X, "UC_X86_REG_" + name))

    def _set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(getattr(self._X, "UC_X86_REG_" + name), value)

    def _on_msr_insn(self, uc: Any, address: int, size: int, user_data: Any) -> None:
        insn = self._insn_bytes(address, size)
        if len(insn) == 3 and insn[0] in _REX:
            insn = insn[1:]
        if insn not in (_WRMSR, _RDMSR):
            return              # the pattern was inside another instruction's bytes
        self._sync_cpl()
        msr = self._reg("RCX") & 0xFFFFFFFF
        if msr not in (MSR_IA32_PKRS, MSR_IA32_EFER):
            return              # not ours: Unicorn executes it
        try:
            if insn == _WRMSR:
                value = (self._reg("RDX") & 0xFFFFFFFF) << 32 | (self._reg("RAX") & 0xFFFFFFFF)
                self.cpu.wrmsr(msr, value)
                # Permissions Unicorn cached were decided with the old value.
                self.flush_tlb()
                if msr == MSR_IA32_EFER:
                    return      # mirrored; Unicorn executes it too (SCE, NXE for itself)
            else:
                if msr == MSR_IA32_EFER:
                    return
                value = self.cpu.rdmsr(msr)
                # RDMSR writes EDX:EAX, which zero-extends into RDX:RAX.
                self._set_reg("RAX", value & 0xFFFFFFFF)
                self._set_reg("RDX", value >> 32)
        except CPUException as exc:
            self._stop(exc, address)
            return
        self.stats["emulated"] += 1
        self._set_reg("RIP", address + size)    # skip it: Unicorn resumes after it

    def _on_invalid_insn(self, uc: Any, user_data: Any) -> bool:
        rip = self._reg("RIP")
        insn = self._insn_bytes(rip, 3)
        if insn not in (_WRPKRU, _RDPKRU):
            return False        # a real #UD: Unicorn stops with UC_ERR_INSN_INVALID
        self._sync_cpl()
        try:
            if insn == _WRPKRU:
                self.cpu.wrpkru(self._reg("RAX") & 0xFFFFFFFF, self._reg("RCX") & 0xFFFFFFFF,
                                self._reg("RDX") & 0xFFFFFFFF)
                self.flush_tlb()
            else:
                # RDPKRU: EAX = PKRU, EDX = 0, upper halves cleared.
                self._set_reg("RAX", self.cpu.rdpkru(self._reg("RCX") & 0xFFFFFFFF))
                self._set_reg("RDX", 0)
        except CPUException as exc:
            self._stop(exc, rip)
            return False
        self.stats["emulated"] += 1
        self._set_reg("RIP", rip + 3)
        return True


def attach(uc: Any, target: Any, *, cpu: int = 0, cpl: int | str = "guest",
           on_fault: Callable[[CPUException], Any] | None = None,
           deliver_faults: bool = False) -> UnicornAttachment:
    """Make pks_emu the MMU of the Unicorn engine ``uc``.

    ``target`` is a ``pks_emu.Machine`` (its CPU ``cpu`` is used) or a
    ``pks_emu.CPU``. The CPU's CR3/CR4/CR0/EFER, PKRS and PKRU decide every
    access; set them up (and the page tables, with ``AddressSpace``) before
    running. ``cpl="guest"`` takes the CPL from the guest's CS at each TLB
    fill; an int pins it. Run the guest with ``attachment.run(begin, until)``.
    ``deliver_faults=True`` delivers a #PF taken at CPL 0 to the guest's own
    handler (IDT vector 14, frame on the stack, CR2) instead of raising it.
    """
    from ..machine import Machine
    the_cpu = target.cpus[cpu] if isinstance(target, Machine) else target
    return UnicornAttachment(uc, the_cpu, cpl=cpl, on_fault=on_fault,
                             deliver_faults=deliver_faults)


__all__ = ["RETRY", "UnicornAttachment", "attach"]
