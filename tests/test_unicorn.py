"""pks_emu as the MMU of the Unicorn engine (issue 5): real x86-64 machine code
runs in Unicorn, every TLB fill goes through pks_emu's page walk and key check,
and the guest's WRMSR/RDMSR of IA32_PKRS and WRPKRU/RDPKRU act on pks_emu's
registers.

The programs are hand-assembled (no assembler here); each byte string is
listed with its assembly. Encodings (SDM Vol. 2): MOV r32, imm32 = B8+rd id;
MOV r64, imm64 = REX.W B8+rd io; MOV r/m32, imm32 = C7 /0 id (ModRM 00 000
rm: [rax] = 00, [rbx] = 03); XOR r/m32, r32 = 31 /r (ModRM 11 src dst:
C0 eax,eax; C9 ecx,ecx; D2 edx,edx); MOV r/m32, r32 = 89 /r; WRMSR = 0F 30;
RDMSR = 0F 32; WRPKRU = 0F 01 EF; RDPKRU = 0F 01 EE; SYSRET (64-bit) =
REX.W 0F 07; MOV r32(r11d), imm32 = REX.B BB id.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

import pks_emu
from pks_emu.constants import (CR0_WP, CR4_PKE, CR4_PKS, PF_P, PF_PK, PF_U, PF_W, PKR_AD_KEY,
                               PKR_WD_KEY)

unicorn = pytest.importorskip("unicorn")
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

from pks_emu.integrations import unicorn as pkuc  # noqa: E402

KCODE_VA = 0xFFFF_FFFF_8100_0000    # supervisor code, pkey 0
PROT_VA = 0xFFFF_8880_0010_0000     # supervisor data, pkey 3
UCODE_VA = 0x0000_0000_0040_0000    # user code, pkey 0
UDATA_VA = 0x0000_0000_0060_0000    # user data, pkey 5
KCODE_PA, PROT_PA, UCODE_PA, UDATA_PA = 0x10_0000, 0x11_0000, 0x12_0000, 0x13_0000
PKRS = pks_emu.MSR_IA32_PKRS


def imm64(v):
    return struct.pack("<Q", v)


def imm32(v):
    return struct.pack("<I", v)


def setup(kernel=b"", user=b"", pkrs=PKR_AD_KEY(3) | PKR_WD_KEY(3), pkru=PKR_AD_KEY(5), **kw):
    m = pks_emu.Machine()
    a = m.address_space()
    a.map(KCODE_VA, KCODE_PA)
    a.map(PROT_VA, PROT_PA, pkey=3, nx=True)
    a.map(PROT_VA - 0x1000, PROT_PA - 0x1000, pkey=0, nx=True)
    a.map(UCODE_VA, UCODE_PA, user=True)
    a.map(UDATA_VA, UDATA_PA, user=True, pkey=5, nx=True)
    cpu = m.cpus[0]
    a.activate(cpu)
    cpu.cr0 |= CR0_WP
    cpu.efer |= pks_emu.constants.EFER_NXE
    cpu.cr4 |= CR4_PKE | CR4_PKS
    cpu.wrmsr(PKRS, pkrs)
    cpu.wrpkru(pkru)
    m.memory.write(KCODE_PA, kernel)
    m.memory.write(UCODE_PA, user)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    att = pkuc.attach(uc, m, **kw)
    return m, cpu, uc, att


# --- programs ----------------------------------------------------------------

# Program 1: a supervisor write to the key-3 page.
#   +0   48 B8 <imm64>        mov rax, PROT_VA+0x18
#   +10  C7 00 EF BE AD DE    mov dword [rax], 0xDEADBEEF
#   +16
WRITE_PROT = b"\x48\xb8" + imm64(PROT_VA + 0x18) + b"\xc7\x00" + imm32(0xDEADBEEF)

# Program 2: open key 3 with WRMSR, write, read PKRS back with RDMSR.
#   +0   B9 E1 06 00 00       mov ecx, 0x6E1            ; IA32_PKRS
#   +5   B8 00 55 55 55       mov eax, 0x55555500       ; keys 4..15 AD, keys 0..3 open
#   +10  31 D2                xor edx, edx
#   +12  0F 30                wrmsr
#   +14  48 B8 <imm64>        mov rax, PROT_VA+0x18
#   +24  C7 00 EF BE AD DE    mov dword [rax], 0xDEADBEEF
#   +30  31 C0                xor eax, eax
#   +32  0F 32                rdmsr                     ; EDX:EAX = IA32_PKRS
#   +34
OPEN_THEN_WRITE = (b"\xb9" + imm32(PKRS) + b"\xb8" + imm32(0x55555500) + b"\x31\xd2\x0f\x30"
                   + WRITE_PROT + b"\x31\xc0\x0f\x32")

# Program 3: write with the key open (Unicorn caches a writable entry), close
# key 3 with WRMSR, write again: must fault although the entry was cached.
#   +0   48 BB <imm64>        mov rbx, PROT_VA+0x20
#   +10  C7 03 11 11 11 11    mov dword [rbx], 0x11111111
#   +16  B9 E1 06 00 00       mov ecx, 0x6E1
#   +21  B8 C0 00 00 00       mov eax, 0xC0             ; key 3: AD|WD
#   +26  31 D2                xor edx, edx
#   +28  0F 30                wrmsr
#   +30  C7 03 22 22 22 22    mov dword [rbx], 0x22222222
#   +36
CLOSE_BETWEEN_WRITES = (b"\x48\xbb" + imm64(PROT_VA + 0x20) + b"\xc7\x03" + imm32(0x11111111)
                        + b"\xb9" + imm32(PKRS) + b"\xb8" + imm32(0xC0) + b"\x31\xd2\x0f\x30"
                        + b"\xc7\x03" + imm32(0x22222222))

# Kernel stub that drops to CPL 3 at UCODE_VA (SYSRET: CS = STAR[63:48]+16 | 3,
# SS = STAR[63:48]+8 | 3, RIP = RCX, RFLAGS = R11; needs EFER.SCE in Unicorn).
#   +0   48 B9 <imm64>        mov rcx, UCODE_VA
#   +10  41 BB 02 02 00 00    mov r11d, 0x202
#   +16  48 0F 07             sysretq
TO_USER = b"\x48\xb9" + imm64(UCODE_VA) + b"\x41\xbb" + imm32(0x202) + b"\x48\x0f\x07"

# User program A: write the key-5 user page.
#   +0   48 BB <imm64>        mov rbx, UDATA_VA+0x30
#   +10  C7 03 33 33 33 33    mov dword [rbx], 0x33333333
#   +16
USER_WRITE = b"\x48\xbb" + imm64(UDATA_VA + 0x30) + b"\xc7\x03" + imm32(0x33333333)

# User program B: open key 5 with WRPKRU, write, read PKRU back with RDPKRU.
#   +0   31 C9                xor ecx, ecx
#   +2   31 D2                xor edx, edx
#   +4   B8 00 50 55 55       mov eax, 0x55555000       ; keys 6..15 AD, key 5 open
#   +9   0F 01 EF             wrpkru
#   +12  48 BB <imm64>        mov rbx, UDATA_VA+0x30
#   +22  C7 03 33 33 33 33    mov dword [rbx], 0x33333333
#   +28  31 C0                xor eax, eax
#   +30  0F 01 EE             rdpkru                    ; EAX = PKRU, EDX = 0
#   +33
USER_WRPKRU_WRITE = (b"\x31\xc9\x31\xd2\xb8" + imm32(0x55555000) + b"\x0f\x01\xef" + USER_WRITE
                     + b"\x31\xc0\x0f\x01\xee")

# User program C: WRMSR at CPL 3.
#   +0   B9 E1 06 00 00       mov ecx, 0x6E1
#   +5   31 C0                xor eax, eax
#   +7   31 D2                xor edx, edx
#   +9   0F 30                wrmsr                     ; #GP(0) at CPL 3
#   +11
USER_WRMSR = b"\xb9" + imm32(PKRS) + b"\x31\xc0\x31\xd2\x0f\x30"


def enable_sysret(uc):
    uc.msr_write(0xC0000080, uc.msr_read(0xC0000080) | 1)     # EFER.SCE
    uc.msr_write(0xC0000081, 0x10 << 48 | 0x08 << 32)         # STAR


def test_assembly_lengths():
    # offsets quoted in the listings above
    assert (len(WRITE_PROT), len(OPEN_THEN_WRITE), len(CLOSE_BETWEEN_WRITES)) == (16, 34, 36)
    assert (len(TO_USER), len(USER_WRITE), len(USER_WRPKRU_WRITE), len(USER_WRMSR)) == (19, 16, 33, 11)


def test_write_to_key_protected_supervisor_page_faults():
    m, cpu, uc, att = setup(kernel=WRITE_PROT)
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    f = ei.value
    assert f.error_code == PF_P | PF_W | PF_PK
    assert f.address == PROT_VA + 0x18            # exact CR2, not the page
    assert f.rip == KCODE_VA + 10                 # the MOV, not the block start
    assert f.pkey == 3
    assert m.memory.read(PROT_PA + 0x18, 4) == bytes(4)
    assert uc.reg_read(X.UC_X86_REG_RIP) == KCODE_VA + 10
    assert "pkey 3" in str(f) and "rip" in str(f)


def test_wrmsr_opens_the_key_and_rdmsr_reads_pks_emu():
    m, cpu, uc, att = setup(kernel=OPEN_THEN_WRITE)
    att.run(KCODE_VA, KCODE_VA + len(OPEN_THEN_WRITE))
    assert cpu.pkrs == 0x55555500
    assert m.memory.read(PROT_PA + 0x18, 4) == imm32(0xDEADBEEF)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 0x55555500     # RDMSR saw pks_emu's PKRS
    assert uc.reg_read(X.UC_X86_REG_RDX) == 0
    assert att.stats["emulated"] == 2
    assert cpu.counters()["wrmsr_pkrs"] == 2                # setup + guest
    # pks_emu did the walk: the PTE of the written page is now dirty
    level, pte_address, pte = cpu.walk(PROT_VA)[-1]
    assert level == 1 and pte & pks_emu.constants.PTE_D


# Data accesses that fault: Unicorn tells the TLB-fill hook only the page, the
# attachment recovers the byte address (CR2).
#   48 B8 <imm64>   mov rax, <address>
#   8B 00           mov eax, dword [rax]          (read, 4 bytes)
#   48 89 10        mov qword [rax], rdx          (write, 8 bytes)
@pytest.mark.parametrize("insn,address,cr2,error_code", [
    (b"\x8b\x00", PROT_VA + 0x7, PROT_VA + 0x7, PF_P | PF_PK),
    (b"\x8b\x00", PROT_VA + 0xFFC, PROT_VA + 0xFFC, PF_P | PF_PK),
    # crosses from the open page below into the key-3 page: CR2 is the first
    # byte of the second page (SDM Vol. 3A §4.7)
    (b"\x48\x89\x10", PROT_VA - 4, PROT_VA, PF_P | PF_W | PF_PK),
    (b"\x8b\x00", PROT_VA - 2, PROT_VA, PF_P | PF_PK),
], ids=["read", "read-end", "write-crossing", "read-crossing"])
def test_fault_address_is_the_byte(insn, address, cr2, error_code):
    code = b"\x48\xb8" + imm64(address) + insn
    m, cpu, uc, att = setup(kernel=code)
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(KCODE_VA, KCODE_VA + len(code))
    assert (ei.value.address, ei.value.error_code, ei.value.rip) == (cr2, error_code, KCODE_VA + 10)
    assert uc.reg_read(X.UC_X86_REG_RAX) == address        # registers restored after the replay


def test_key_change_flushes_unicorns_tlb():
    m, cpu, uc, att = setup(kernel=CLOSE_BETWEEN_WRITES, pkrs=0)
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(KCODE_VA, KCODE_VA + len(CLOSE_BETWEEN_WRITES))
    assert ei.value.rip == KCODE_VA + 30
    assert ei.value.address == PROT_VA + 0x20
    assert ei.value.error_code == PF_P | PF_W | PF_PK
    assert m.memory.read(PROT_PA + 0x20, 4) == imm32(0x11111111)
    assert cpu.pkrs == 0xC0


def test_without_the_flush_the_cached_entry_would_skip_the_key_check(monkeypatch):
    """The control for the test above: Unicorn really caches the permission."""
    m, cpu, uc, att = setup(kernel=CLOSE_BETWEEN_WRITES, pkrs=0)
    att.run(KCODE_VA, KCODE_VA + 10)                 # just sets rbx; warms nothing
    monkeypatch.setattr(att, "flush_tlb", lambda: None)
    uc.emu_start(KCODE_VA, KCODE_VA + len(CLOSE_BETWEEN_WRITES))
    assert cpu.pkrs == 0xC0
    assert m.memory.read(PROT_PA + 0x20, 4) == imm32(0x22222222)   # the stale entry let it through


def test_python_side_key_change_applies_at_next_run():
    m, cpu, uc, att = setup(kernel=WRITE_PROT, pkrs=0)
    att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))    # allowed, and cached by Unicorn
    assert m.memory.read(PROT_PA + 0x18, 4) == imm32(0xDEADBEEF)
    cpu.wrmsr(PKRS, PKR_WD_KEY(3))
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert ei.value.error_code == PF_P | PF_W | PF_PK


def test_user_write_faults_then_wrpkru_opens_the_key():
    m, cpu, uc, att = setup(kernel=TO_USER, user=USER_WRITE)
    enable_sysret(uc)
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(KCODE_VA, UCODE_VA + len(USER_WRITE))
    f = ei.value
    assert f.error_code == PF_P | PF_W | PF_U | PF_PK
    assert (f.address, f.rip, f.pkey) == (UDATA_VA + 0x30, UCODE_VA + 10, 5)
    assert cpu.cpl == 3 and uc.reg_read(X.UC_X86_REG_CS) & 3 == 3

    m, cpu, uc, att = setup(kernel=TO_USER, user=USER_WRPKRU_WRITE)
    enable_sysret(uc)
    att.run(KCODE_VA, UCODE_VA + len(USER_WRPKRU_WRITE))
    assert cpu.pkru == 0x55555000
    assert m.memory.read(UDATA_PA + 0x30, 4) == imm32(0x33333333)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 0x55555000     # RDPKRU saw pks_emu's PKRU
    assert cpu.counters()["writes_user"] >= 1


def test_wrmsr_at_cpl3_is_a_general_protection_fault():
    m, cpu, uc, att = setup(kernel=TO_USER, user=USER_WRMSR)
    enable_sysret(uc)
    with pytest.raises(pks_emu.GeneralProtectionFault, match="CPL 3") as ei:
        att.run(KCODE_VA, UCODE_VA + len(USER_WRMSR))
    assert ei.value.rip == UCODE_VA + 9
    assert cpu.pkrs == PKR_AD_KEY(3) | PKR_WD_KEY(3)        # unchanged


def test_wrpkru_with_cr4_pke_clear_is_invalid_opcode():
    m, cpu, uc, att = setup(kernel=TO_USER, user=USER_WRPKRU_WRITE)
    cpu.cr4 &= ~CR4_PKE
    enable_sysret(uc)
    with pytest.raises(pks_emu.InvalidOpcode) as ei:
        att.run(KCODE_VA, UCODE_VA + len(USER_WRPKRU_WRITE))
    assert ei.value.rip == UCODE_VA + 9


def test_fetch_from_nx_page_faults_at_rip():
    m, cpu, uc, att = setup()
    with pytest.raises(pks_emu.PageFault) as ei:
        att.run(PROT_VA + 0x40, PROT_VA + 0x50)
    f = ei.value
    assert f.error_code & (PF_P | 0x10) == PF_P | 0x10 and not f.error_code & PF_PK
    assert f.address == f.rip == PROT_VA + 0x40


def test_on_fault_callback_can_open_the_key_and_retry():
    seen = []

    def on_fault(exc):
        seen.append((exc.address, exc.error_code))
        cpu.wrmsr(PKRS, 0)                 # the "handler" opens the key
        return pkuc.RETRY

    m, cpu, uc, att = setup(kernel=WRITE_PROT, on_fault=on_fault)
    att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert seen == [(PROT_VA + 0x18, PF_P | PF_W | PF_PK)]
    assert m.memory.read(PROT_PA + 0x18, 4) == imm32(0xDEADBEEF)


def test_unicorn_sees_pks_emu_memory_and_detach():
    m, cpu, uc, att = setup(kernel=WRITE_PROT, pkrs=0)
    att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert PROT_PA in att.mapped_frames and KCODE_PA in att.mapped_frames
    m.memory.write(PROT_PA + 0x100, b"shared")
    assert bytes(uc.mem_read(PROT_PA + 0x100, 6)) == b"shared"      # physical read in Unicorn
    att.detach()
    assert att.mapped_frames == []


def test_attach_rejects_other_architectures():
    with pytest.raises(ValueError, match="x86-64"):
        pkuc.attach(Uc(UC_ARCH_X86, unicorn.UC_MODE_32), pks_emu.Machine())
    with pytest.raises(TypeError, match="unicorn.Uc"):
        pkuc.attach(object(), pks_emu.Machine())
    with pytest.raises(ValueError, match="cpl"):
        pkuc.attach(Uc(UC_ARCH_X86, UC_MODE_64), pks_emu.Machine(), cpl=4)


def test_pks_emu_imports_without_unicorn(tmp_path):
    code = ("import sys; sys.modules['unicorn'] = None\n"
            "import pks_emu, pks_emu.integrations.unicorn as u\n"
            "try:\n"
            "    u.attach(object(), pks_emu.Machine())\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n")
    # Run outside the source tree so the installed (compiled) package is imported.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and "pip install" in out.stdout


# Program 6: a #PF handler (at KCODE_VA + 0x100) that opens every key with
# WRMSR and returns to the faulting instruction without IRETQ (no GDT here).
# It keeps RAX and RDX (the faulting write uses RAX); RCX is scratch.
#   +0   50                   push rax
#   +1   52                   push rdx
#   +2   B9 E1 06 00 00       mov ecx, 0x6E1          ; IA32_PKRS
#   +7   31 C0                xor eax, eax            ; all keys read/write
#   +9   31 D2                xor edx, edx
#   +11  0F 30                wrmsr
#   +13  5A                   pop rdx
#   +14  58                   pop rax
#   +15  48 83 C4 08          add rsp, 8              ; drop the error code
#   +19  59                   pop rcx                 ; the faulting RIP
#   +20  48 83 C4 08          add rsp, 8              ; CS
#   +24  9D                   popfq                   ; RFLAGS
#   +25  5C                   pop rsp                 ; the interrupted RSP (SS stays behind)
#   +26  FF E1                jmp rcx                 ; retry
PF_HANDLER = (b"\x50\x52\xb9" + imm32(0x6E1) + b"\x31\xc0\x31\xd2\x0f\x30\x5a\x58"
              b"\x48\x83\xc4\x08\x59\x48\x83\xc4\x08\x9d\x5c\xff\xe1")
IDT_VA, IDT_PA = 0xFFFF_FE00_0000_0000, 0x14_0000
STACK_VA, STACK_PA = 0xFFFF_C900_0000_0000, 0x15_0000


def setup_with_pf_handler(handler_code):
    """WRITE_PROT at KCODE_VA, ``handler_code`` at KCODE_VA + 0x100 installed
    as the #PF handler (IDT gate 14), a kernel stack, deliver_faults=True."""
    kernel = WRITE_PROT + b"\x90" * (0x100 - len(WRITE_PROT)) + handler_code
    m, cpu, uc, att = setup(kernel=kernel, deliver_faults=True)
    a = pks_emu.AddressSpace(m, cr3=cpu.cr3)
    a.map(IDT_VA, IDT_PA, nx=True)
    a.map(STACK_VA, STACK_PA, nx=True)
    handler = KCODE_VA + 0x100
    # 64-bit interrupt gate (SDM Figure 6-8): offset 15:0, selector 8,
    # type 0xE, P=1, DPL 0, offset 31:16, offset 63:32.
    gate = struct.pack("<HHBBHI I", handler & 0xFFFF, 8, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)
    m.memory.write(IDT_PA + 14 * 16, gate)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT_VA, 0xFFF, 0))
    uc.reg_write(X.UC_X86_REG_RSP, STACK_VA + 0xF00)
    return m, cpu, uc, att


def test_page_fault_is_delivered_to_the_guest_handler_which_retries():
    """deliver_faults=True: the key violation becomes a #PF in the guest
    (IDT vector 14, frame on the stack, CR2); the guest's handler opens the
    key with WRMSR and returns; the retried write succeeds."""
    m, cpu, uc, att = setup_with_pf_handler(PF_HANDLER)
    att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert att.stats["delivered"] == 1
    assert att.cr2 == PROT_VA + 0x18 and uc.reg_read(X.UC_X86_REG_CR2) == PROT_VA + 0x18
    assert m.memory.read_u64(PROT_PA + 0x18) & 0xFFFFFFFF == 0xDEADBEEF     # the retry wrote
    assert cpu.pkrs == 0                                                    # the handler's WRMSR
    # The frame the CPU pushed: error code P|W|PK, then RIP of the faulting write.
    frame = struct.unpack("<2Q", m.memory.read(STACK_PA + 0xF00 - 48, 16))
    assert frame == (PF_P | PF_W | PF_PK, KCODE_VA + 10)
    assert uc.reg_read(X.UC_X86_REG_RSP) == STACK_VA + 0xF00


def test_without_a_handler_the_fault_is_raised():
    m, cpu, uc, att = setup(kernel=WRITE_PROT, deliver_faults=True)
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0, 0))          # empty IDT
    with pytest.raises(pks_emu.PageFault) as e:
        att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert e.value.error_code == PF_P | PF_W | PF_PK and att.stats["delivered"] == 0


def test_a_handler_that_fixes_nothing_does_not_hang():
    # The handler returns straight to the faulting write: the same #PF again.
    #   +0  48 83 C4 08  add rsp, 8 ; +4 59 pop rcx ; +5 48 83 C4 08 add rsp, 8
    #   +9  9D popfq ; +10 5C pop rsp ; +11 FF E1 jmp rcx
    noop = b"\x48\x83\xc4\x08\x59\x48\x83\xc4\x08\x9d\x5c\xff\xe1"
    m, cpu, uc, att = setup_with_pf_handler(noop)
    with pytest.raises(pks_emu.PageFault):
        att.run(KCODE_VA, KCODE_VA + len(WRITE_PROT))
    assert att.stats["delivered"] == pkuc.MAX_REDELIVERIES
