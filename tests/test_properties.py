"""Property tests: the compiled core against the pure-Python reference model
(tests/refmodel.py) over random page tables, registers and accesses.

The model has no TLB. The comparison stays exact because:

* page-table edits between accesses are followed by a full TLB flush (as a
  kernel would do; stale translations are tested by hand in test_tlb.py);
* in compat="qemu", a change of CR4.PKE/PKS or EFER.NXE is followed by a flush,
  because QEMU 7.2 does not flush there and keeps the fill-time key decision
  (also tested by hand in test_tlb.py). In compat="sdm" the core's own flush
  rules must keep the TLB coherent with a fresh walk, so no extra flush is done.

After every access the outcome (pa, #PF error code and address, #GP, the key
of the faulting leaf) and every word of the page tables (so the A/D bits) must
agree.
"""
from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pks_emu
import refmodel as ref
from refmodel import Regs

ALL = pks_emu.ALL_FEATURES
MSR_PKRS = 0x6E1
TABLE_BASE = 0x10_0000


# --- random page tables -----------------------------------------------------------------

def _weighted_bool(p_true_tenths: int):
    return _percent(10 * p_true_tenths)


def _percent(p: int):
    return st.integers(0, 99).map(lambda x: x < p)


def _sign_extend(va: int, bits: int) -> int:
    if va >> (bits - 1) & 1:
        va |= ((1 << 64) - 1) & ~((1 << bits) - 1)
    return va


def draw_tables(draw, levels: int, maxphyaddr: int):
    """Random tables in a dict; returns (words, cr3, [(va_of_page, leaf_size)])."""
    words: dict[int, int] = {}
    next_frame = [TABLE_BASE]
    pages: list[tuple[int, int]] = []
    rsvd_phys = [b for b in range(maxphyaddr, 52)]

    def alloc() -> int:
        a = next_frame[0]
        next_frame[0] += 0x1000
        return a

    def fill(table: int, level: int, va_prefix: int) -> None:
        choices = [0, 1, 511] if level == levels else [0, 1, 255, 511]
        idxs = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=2, unique=True))
        for idx in idxs:
            shift = 12 + 9 * (level - 1)
            va = va_prefix | (idx << shift)
            e = 0
            # Biased so that most walks reach a leaf: faults of every kind
            # still occur, but allowed accesses and key checks are common too.
            if draw(_percent(95)):
                e |= ref.P
            if draw(_percent(85)):
                e |= ref.RW
            if draw(_percent(85)):
                e |= ref.US
            if draw(_percent(6)):
                e |= ref.XD
            e |= draw(st.integers(0, 15)) << 59                    # key (ignored if not a leaf)
            e |= draw(st.sampled_from([0, ref.A, ref.A | ref.D]))
            e |= draw(st.sampled_from([0, 1 << 8, 1 << 53, 1 << 10]))  # G and ignored bits
            if rsvd_phys and draw(_percent(4)):
                e |= 1 << draw(st.sampled_from(rsvd_phys))
            if level == 1:
                leaf = True
            elif level <= 3:
                leaf = draw(_weighted_bool(3))
            else:
                leaf = False
                if draw(_percent(3)):
                    e |= ref.PS                                     # reserved in PML4E/PML5E
            if leaf:
                if level > 1:
                    e |= ref.PS
                    if draw(_percent(20)):                          # PAT or reserved low bits
                        e |= 1 << draw(st.integers(12, shift - 1))
                frame = draw(st.integers(0, (1 << (maxphyaddr - shift)) - 1)) << shift
                words[table + 8 * idx] = e | frame
                pages.append((va, 1 << shift))
            else:
                sub = alloc()
                words[table + 8 * idx] = e | sub
                fill(sub, level - 1, va)

    cr3 = alloc()
    fill(cr3, levels, 0)
    bits = 57 if levels == 5 else 48
    return words, cr3, [(_sign_extend(va, bits), size) for va, size in pages]


@st.composite
def register_state(draw, features, levels: int, compat: str, cr3: int, maxphyaddr: int):
    cr4 = (1 << 5) | (ref.CR4_LA57 if levels == 5 else 0)
    for bit, feat, pct in ((ref.CR4_SMEP, "smep", 40), (ref.CR4_SMAP, "smap", 50),
                           (ref.CR4_PKE, "pku", 70), (ref.CR4_PKS, "pks", 70), (1 << 7, None, 30)):
        if (feat is None or feat in features) and draw(_percent(pct)):
            cr4 |= bit
    efer = (1 << 8) | ref.EFER_LMA
    if "nx" in features and draw(_weighted_bool(6)):
        efer |= ref.EFER_NXE
    pkr = st.one_of(st.sampled_from([0, 0x55555554, 0xFFFFFFFF, 0xAAAAAAAA]),
                    st.integers(0, 0xFFFFFFFF))
    return Regs(cr3=cr3, cr0=0x80000011 | (ref.CR0_WP if draw(st.booleans()) else 0), cr4=cr4,
                efer=efer, rflags=2 | (ref.RFLAGS_AC if draw(st.booleans()) else 0),
                cpl=draw(st.sampled_from([0, 0, 1, 3, 3])),
                pkru=draw(pkr) if "pku" in features else 0,
                pkrs=draw(pkr) if "pks" in features else 0,
                features=frozenset(features), maxphyaddr=maxphyaddr, compat=compat)


def apply_regs(cpu, old: Regs, new: Regs) -> Regs:
    """Move ``cpu`` from ``old`` to ``new`` with the fewest register writes, so
    that the TLB sees only the flushes those writes cause. Returns the state
    reached (PKRU cannot change while CR4.PKE stays 0)."""
    if not (old.cr4 | new.cr4) & ref.CR4_PKE:
        new = new.with_(pkru=old.pkru)
    cpu.cpl = 0
    if new.pkrs != old.pkrs:
        cpu.wrmsr(MSR_PKRS, new.pkrs)
    if new.efer != old.efer:
        cpu.efer = new.efer
    if new.cr0 != old.cr0:
        cpu.cr0 = new.cr0
    if new.pkru != old.pkru and old.cr4 & ref.CR4_PKE:
        cpu.wrpkru(new.pkru)
    if new.cr4 != old.cr4:
        cpu.cr4 = new.cr4
    if cpu.pkru != new.pkru:
        cpu.wrpkru(new.pkru)
    cpu.rflags = new.rflags
    cpu.cpl = new.cpl
    if new.compat == "qemu" and ((old.cr4 ^ new.cr4) & (ref.CR4_PKE | ref.CR4_PKS)
                                 or (old.efer ^ new.efer) & ref.EFER_NXE):
        cpu.flush_tlb()           # QEMU keeps fill-time decisions; the model has no TLB
    assert (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer, cpu.rflags, cpu.cpl, cpu.pkru, cpu.pkrs) == (
        new.cr0, new.cr3, new.cr4, new.efer, new.rflags, new.cpl, new.pkru, new.pkrs)
    return new


def compare(cpu, memory, model_mem, regs: Regs, va: int, kind: int, size: int, implicit: bool):
    want = ref.access(model_mem, regs, va, kind, size, implicit)
    got = cpu.translate(va, kind, size=size, implicit=implicit)
    label = (f"{['read', 'write', 'fetch'][kind]} va={va:#x} size={size} implicit={implicit} "
             f"cpl={regs.cpl} cr0={regs.cr0:#x} cr4={regs.cr4:#x} efer={regs.efer:#x} "
             f"ac={bool(regs.rflags & ref.RFLAGS_AC)} pkru={regs.pkru:#x} pkrs={regs.pkrs:#x} "
             f"compat={regs.compat}")
    note(label)
    if want.ok:
        assert got.ok, f"{label}: core faults {got!r}, model allows pa={want.pa:#x}"
        assert got.pa == want.pa, f"{label}: pa {got.pa:#x} != {want.pa:#x}"
        if (va & 0xFFF) + size <= 4096:
            assert got.pkey == want.pkey, f"{label}: pkey {got.pkey} != {want.pkey}"
    elif want.vector == 13:
        assert not got.ok and got.vector == 13, f"{label}: core {got!r}, model #GP"
    else:
        assert not got.ok and got.vector == 14, (
            f"{label}: core {got!r}, model #PF {pks_emu.pf_error_code_str(want.error_code)}")
        assert got.error_code == want.error_code, (
            f"{label}: error code {pks_emu.pf_error_code_str(got.error_code)} != "
            f"{pks_emu.pf_error_code_str(want.error_code)}")
        assert got.address == want.address, f"{label}: CR2 {got.address:#x} != {want.address:#x}"
        if want.error_code & ref.PF_P and not want.error_code & ref.PF_RSVD:
            assert got.pkey == want.pkey, f"{label}: pkey {got.pkey} != {want.pkey}"
    for ea, word in model_mem.words.items():
        assert memory.read_u64(ea) == word, (
            f"{label}: entry at {ea:#x} is {memory.read_u64(ea):#x}, model {word:#x} "
            f"(A/D differ: {(memory.read_u64(ea) ^ word) & 0x60:#x})")


KIND = st.sampled_from([ref.READ, ref.WRITE, ref.FETCH])
SIZE = st.sampled_from([1, 2, 4, 8, 8, 16, 64, 4096])


@given(st.data())
def test_core_matches_reference_model(data):
    draw = data.draw
    levels = draw(st.sampled_from([4, 5]), label="levels")
    compat = draw(st.sampled_from(["sdm", "qemu"]), label="compat")
    maxphyaddr = draw(st.sampled_from([52, 46, 40]), label="maxphyaddr")
    features = ALL - draw(st.sampled_from([frozenset(), frozenset({"1g"}), frozenset({"nx"}),
                                           frozenset({"pks"}), frozenset({"smap", "smep"})]),
                          label="missing features")
    words, cr3, pages = draw_tables(draw, levels, maxphyaddr)
    m = pks_emu.Machine(paging_levels=levels, compat=compat, features=features,
                        maxphyaddr=maxphyaddr)
    for ea, w in words.items():
        m.memory.write_u64(ea, w)
    model_mem = ref.DictMemory(words)
    cpu = m.cpus[0]
    cpu.cr3 = cr3
    regs = Regs(cr3=cr3, cr4=cpu.cr4, features=frozenset(features), maxphyaddr=maxphyaddr,
                compat=compat)
    regs = apply_regs(cpu, regs, draw(register_state(features, levels, compat, cr3, maxphyaddr)))
    bits = 57 if levels == 5 else 48

    for _ in range(draw(st.integers(1, 12), label="steps")):
        step = draw(st.sampled_from(["access"] * 6 + ["regs", "edit"]))
        if step == "regs":
            regs = apply_regs(cpu, regs, draw(register_state(features, levels, compat, cr3,
                                                             maxphyaddr)))
            continue
        if step == "edit":
            ea = draw(st.sampled_from(sorted(words)))
            flip = draw(st.sampled_from([ref.P, ref.RW, ref.US, ref.PS, ref.XD, ref.A | ref.D,
                                         0xF << 59, 1 << 13, 1 << (maxphyaddr % 52)]))
            model_mem.words[ea] ^= flip
            m.memory.write_u64(ea, model_mem.words[ea])
            cpu.flush_tlb()       # the model has no TLB (see the module docstring)
            continue
        where = draw(st.sampled_from(["page", "page", "page", "next page", "random"]))
        if where == "random" or not pages:
            va = draw(st.one_of(
                st.integers(0, (1 << 64) - 1),
                st.integers(0, (1 << bits) - 1).map(lambda v: _sign_extend(v, bits)),
                # the edges of the canonical ranges, where an access may cross out
                st.sampled_from([(1 << (bits - 1)) - 8, (1 << (bits - 1)) - 4096, 1 << (bits - 1),
                                 _sign_extend(1 << (bits - 1), bits), (1 << 64) - 8]),
            ))
        else:
            page, size = draw(st.sampled_from(pages))
            off = draw(st.one_of(st.integers(0, size - 1), st.sampled_from([0, size - 4, 0xFF8])))
            va = page + off + (size if where == "next page" else 0)
            va &= (1 << 64) - 1
        size = draw(SIZE)
        if va + size > 1 << 64:
            size = 1
        compare(cpu, m.memory, model_mem, regs, va, draw(KIND), size,
                draw(_weighted_bool(2), label="implicit"))


# --- stateful: registers, mappings and accesses interleaved -------------------------------

SLOTS = [
    (0x0000_1000_0000_0000, 4096), (0x0000_1000_0000_1000, 4096), (0x0000_1000_0000_2000, 4096),
    (0xFFFF_8880_0000_0000, 4096), (0xFFFF_8880_0000_1000, 4096),
    (0x0000_2000_0020_0000, 2 << 20), (0xFFFF_C900_0000_0000, 2 << 20),
    (0x0000_3000_4000_0000, 1 << 30),
]


class CoreVersusModel(RuleBasedStateMachine):
    """The compiled CPU and the reference model driven side by side (the
    PyRoaringBitMap test_state_machine.py pattern): every rule acts on both and
    the invariants compare them after each rule."""

    @initialize(levels=st.sampled_from([4, 5]), compat=st.sampled_from(["sdm", "qemu"]),
                pkru=st.integers(0, 0xFFFFFFFF), pkrs=st.integers(0, 0xFFFFFFFF),
                keys=st.lists(st.integers(0, 15), min_size=len(SLOTS), max_size=len(SLOTS)))
    def setup(self, levels, compat, pkru, pkrs, keys):
        self.m = pks_emu.Machine(paging_levels=levels, compat=compat)
        self.cpu = self.m.cpus[0]
        self.space = self.m.address_space()
        self.space.activate(self.cpu)
        # Start with every slot mapped (user and supervisor pages alternate)
        # and both key registers live, so that accesses mostly reach the
        # rights and key checks; the rules then change all of it.
        for i, ((va, size), key) in enumerate(zip(SLOTS, keys)):
            self.space.map(va, (i + 1) * size, size, user=i % 2 == 0, pkey=key)
        self.cpu.cr4 = self.cpu.cr4 | ref.CR4_PKE | ref.CR4_PKS
        self.cpu.wrpkru(pkru)
        self.cpu.wrmsr(MSR_PKRS, pkrs)
        self.regs = Regs(cr3=self.cpu.cr3, cr4=self.cpu.cr4, pkru=pkru, pkrs=pkrs, compat=compat)
        self.sync_model_memory()

    def sync_model_memory(self):
        """Copy the page tables into the model after the builder changed them."""
        words = {}
        for frame in self.m.memory.frame_addresses():
            data = self.m.memory.read(frame, 4096)
            for i in range(512):
                w = int.from_bytes(data[8 * i:8 * i + 8], "little")
                if w:
                    words[frame + 8 * i] = w
        self.model_mem = ref.DictMemory(words)

    # registers
    @rule(value=st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)))
    def wrmsr_pkrs(self, value):
        expect_gp = self.regs.cpl != 0 or value >> 32 != 0
        try:
            self.cpu.wrmsr(MSR_PKRS, value)
        except pks_emu.GeneralProtectionFault:
            assert expect_gp
        else:
            assert not expect_gp
            self.regs = self.regs.with_(pkrs=value)

    @rule(value=st.integers(0, 0xFFFFFFFF), ecx=st.sampled_from([0, 0, 0, 1]))
    def wrpkru(self, value, ecx):
        try:
            self.cpu.wrpkru(value, ecx=ecx)
        except pks_emu.InvalidOpcode:
            assert not self.regs.cr4 & ref.CR4_PKE
        except pks_emu.GeneralProtectionFault:
            assert self.regs.cr4 & ref.CR4_PKE and ecx != 0
        else:
            assert self.regs.cr4 & ref.CR4_PKE and ecx == 0
            self.regs = self.regs.with_(pkru=value)

    def _privileged_write(self, attr, value):
        """MOV to CRn / WRMSR of EFER: #GP above CPL 0 and nothing changes."""
        if self.regs.cpl != 0:
            with pytest.raises(pks_emu.GeneralProtectionFault):
                setattr(self.cpu, attr, value)
            return False
        setattr(self.cpu, attr, value)
        return True

    @rule(bit=st.sampled_from([ref.CR4_SMEP, ref.CR4_SMAP, ref.CR4_PKE, ref.CR4_PKS, 1 << 7]))
    def toggle_cr4(self, bit):
        new = self.regs.cr4 ^ bit
        if not self._privileged_write("cr4", new):
            return
        if self.regs.compat == "qemu" and bit in (ref.CR4_PKE, ref.CR4_PKS):
            self.cpu.flush_tlb()    # see the module docstring
        self.regs = self.regs.with_(cr4=new)

    @rule()
    def toggle_wp(self):
        new = self.regs.cr0 ^ ref.CR0_WP
        if self._privileged_write("cr0", new):
            self.regs = self.regs.with_(cr0=new)

    @rule()
    def toggle_nxe(self):
        new = self.regs.efer ^ ref.EFER_NXE
        if not self._privileged_write("efer", new):
            return
        if self.regs.compat == "qemu":
            self.cpu.flush_tlb()
        self.regs = self.regs.with_(efer=new)

    @rule(ac=st.booleans(), cpl=st.integers(0, 3))
    def set_ac_cpl(self, ac, cpl):
        self.cpu.rflags = 2 | (ref.RFLAGS_AC if ac else 0)
        self.cpu.cpl = cpl
        self.regs = self.regs.with_(rflags=self.cpu.rflags, cpl=cpl)

    @rule()
    def reload_cr3(self):
        self._privileged_write("cr3", self.cpu.cr3)

    # mappings
    @rule(slot=st.sampled_from(SLOTS), frame=st.integers(1, 1000), user=st.booleans(),
          writable=st.booleans(), nx=st.booleans(), pkey=st.integers(0, 15), global_=st.booleans())
    def map(self, slot, frame, user, writable, nx, pkey, global_):
        va, size = slot
        self.space.map(va, frame * size, size, user=user, writable=writable, nx=nx, pkey=pkey,
                       global_=global_)
        self.space.invalidate(va)
        self.sync_model_memory()

    @rule(slot=st.sampled_from(SLOTS))
    def unmap(self, slot):
        self.space.unmap(slot[0])
        self.space.invalidate(slot[0])
        self.sync_model_memory()

    @rule(slot=st.sampled_from(SLOTS), pkey=st.integers(0, 15), writable=st.booleans(),
          user=st.booleans())
    def protect(self, slot, pkey, writable, user):
        va = slot[0]
        if self.space.lookup(va) is None:
            with pytest.raises(ValueError, match="not mapped"):
                self.space.protect(va, pkey=pkey)
            return
        self.space.protect(va, pkey=pkey, writable=writable, user=user)
        self.space.invalidate(va)
        self.sync_model_memory()

    # accesses
    @rule(slot=st.sampled_from(SLOTS), off=st.sampled_from([0, 8, 0xFF8, 0xFFC, -4, 0x123456]),
          kind=KIND, size=st.sampled_from([1, 8, 16]), implicit=st.booleans(),
          edge=st.integers(0, 19))
    def access(self, slot, off, kind, size, implicit, edge):
        va, page = slot
        va = (va + off % page) & ((1 << 64) - 1)
        if edge == 0:
            # now and then the edge of the canonical range (#GP, or a crossing into it)
            va = [0x0000_8000_0000_0000, 0x0100_0000_0000_0000, 0x0000_7FFF_FFFF_FFFC][off % 3]
        compare(self.cpu, self.m.memory, self.model_mem, self.regs, va, kind, size, implicit)

    @invariant()
    def registers_agree(self):
        if not hasattr(self, "cpu"):
            return
        r = self.regs
        assert (self.cpu.cr0, self.cpu.cr4, self.cpu.efer, self.cpu.rflags, self.cpu.cpl,
                self.cpu.pkru, self.cpu.pkrs) == (r.cr0, r.cr4, r.efer, r.rflags, r.cpl,
                                                   r.pkru, r.pkrs)

    @invariant()
    def tables_agree(self):
        if not hasattr(self, "cpu"):
            return
        for ea, word in self.model_mem.words.items():
            assert self.m.memory.read_u64(ea) == word


TestCoreVersusModel = CoreVersusModel.TestCase
