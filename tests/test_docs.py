"""The worked examples of docs/semantics.md are true of the emulator.

Each row of the "Worked examples" table is parsed, set up on a fresh machine
and run; the documented outcome (ok, #GP, or the #PF error code and its bit
names) must be what the core returns. A rule changed in the code without the
page, or a wrong row in the page, fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import pks_emu
from pks_emu.constants import (CR0_WP, CR4_PKE, CR4_PKS, CR4_SMAP, CR4_SMEP, EFER_NXE,
                               MSR_IA32_PKRS, PAGE_SIZE, PAGE_SIZE_1G, PAGE_SIZE_2M, PF_I, PF_P,
                               PF_PK, PF_RSVD, PF_U, PF_W, PTE_P, PTE_RW, PTE_US, RFLAGS_AC)

DOC = Path(__file__).resolve().parents[1] / "docs" / "semantics.md"
VA = 0x40_0000_0000
PA = 0x8_0000_0000
BITS = {"P": PF_P, "W": PF_W, "U": PF_U, "RSVD": PF_RSVD, "I": PF_I, "PK": PF_PK}


def example_rows() -> list[list[str]]:
    text = DOC.read_text()
    section = text.split("## Worked examples", 1)[1]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "compat":
            continue
        assert len(cells) == 7, f"semantics.md example row with {len(cells)} cells: {line}"
        rows.append(cells)
    return rows


ROWS = example_rows()


def tokens(cell: str) -> list[str]:
    return [t.strip() for t in cell.split(",") if t.strip()]


def run_row(compat, cpl, access, page, entry, regs):
    entry_t, reg_t = tokens(entry), tokens(regs)
    m = re.fullmatch(r"(implicit )?(read|write|fetch)(?: @(0x[0-9a-f]+))?", access)
    assert m, f"access {access!r} not understood"
    implicit, kind, at = bool(m.group(1)), m.group(2), m.group(3)
    va = int(at, 16) if at else VA
    features = set(pks_emu.ALL_FEATURES)
    maxphyaddr, levels = 52, 4
    for t in reg_t:
        if t.startswith("-"):
            features.discard(t[1:])
        elif t.startswith("MAXPHYADDR="):
            maxphyaddr = int(t.split("=")[1])
        elif t == "5-level":
            levels = 5
    mach = pks_emu.Machine(paging_levels=levels, compat=compat, features=features,
                           maxphyaddr=maxphyaddr)
    cpu = mach.cpus[0]
    aspace = mach.address_space()
    size = PAGE_SIZE_1G if "1G" in entry_t else PAGE_SIZE_2M if "2M" in entry_t else PAGE_SIZE
    key = next((int(t.split("=")[1]) for t in entry_t if t.startswith("key=")), 0)
    try:
        aspace.map(va, PA, size, user=(page == "user"), pkey=key)
    except ValueError:
        assert "@" in access, "only a non-canonical example may skip the mapping"
    else:
        leaf_level = {PAGE_SIZE: 1, PAGE_SIZE_2M: 2, PAGE_SIZE_1G: 3}[size]
        leaf = aspace.entry_address(va, leaf_level)
        e = mach.memory.read_u64(leaf)
        for t in entry_t:
            if t == "RW=0":
                e &= ~PTE_RW
            elif t == "XD":
                e |= 1 << 63
            elif t == "P=0":
                e &= ~PTE_P
            elif t.startswith("bit="):
                e |= 1 << int(t.split("=")[1])
            elif t in ("PDE.US=0", "PDE.RW=0"):
                pde = aspace.entry_address(va, 2)
                mach.memory.write_u64(pde, mach.memory.read_u64(pde)
                                      & ~(PTE_US if t == "PDE.US=0" else PTE_RW))
            else:
                assert t in ("1G", "2M") or t.startswith("key="), f"entry token {t!r}"
        mach.memory.write_u64(leaf, e)
    aspace.activate(cpu)
    cr4 = cpu.cr4
    for t in reg_t:
        if t == "NXE":
            cpu.efer |= EFER_NXE
        elif t == "WP":
            cpu.cr0 |= CR0_WP
        elif t == "AC":
            cpu.rflags |= RFLAGS_AC
        elif t.startswith("PKRS="):
            cpu.wrmsr(MSR_IA32_PKRS, int(t.split("=")[1], 16))
        elif t.startswith("PKRU="):
            cpu.cr4 |= CR4_PKE          # WRPKRU needs CR4.PKE
            cpu.wrpkru(int(t.split("=")[1], 16))
            cpu.cr4 = cr4
        elif t in ("PKS", "PKE", "SMAP", "SMEP"):
            cr4 |= {"PKS": CR4_PKS, "PKE": CR4_PKE, "SMAP": CR4_SMAP, "SMEP": CR4_SMEP}[t]
        else:
            assert t.startswith(("-", "MAXPHYADDR=")) or t == "5-level", f"register token {t!r}"
    cpu.cr4 = cr4
    cpu.cpl = int(cpl)
    return cpu.translate(va, kind, 1, implicit)


def test_the_table_is_there_and_covers_both_modes():
    assert len(ROWS) >= 30
    assert {r[0] for r in ROWS} == {"sdm", "qemu"}


@pytest.mark.parametrize("row", ROWS, ids=[f"row{i + 1}" for i in range(len(ROWS))])
def test_worked_example(row):
    compat, cpl, access, page, entry, regs, outcome = row
    t = run_row(compat, cpl, access, page, entry, regs)
    if outcome == "ok":
        assert t.ok, f"{row}: {t!r}"
        return
    if outcome == "`#GP`":
        assert not t.ok and t.vector == 13, f"{row}: {t!r}"
        return
    m = re.fullmatch(r"`#PF (0x[0-9a-f]+)`((?: [A-Z]+)*)", outcome)
    assert m, f"outcome {outcome!r} not understood"
    code = int(m.group(1), 16)
    names = m.group(2).split()
    assert code == sum(BITS[n] for n in names), f"{row}: the hex and the bit names disagree"
    assert not t.ok and t.vector == 14 and t.error_code == code, f"{row}: {t!r}"


# --- the Python examples of the pages run as shown --------------------------------

def python_blocks(page: str) -> list[str]:
    text = (DOC.parent / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md"])
def test_python_examples_run(page, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page[:-3]}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/{page} block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/{page}, Python block {i + 1} failed: {e!r}\n{block}") from e
