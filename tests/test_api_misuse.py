"""Issue 13: API misuse never crashes and never truncates — None and wrong
types give TypeError; floats are refused where integers are expected (bools
and numpy integers keep working). The None cases run in a child process: before
the fix they ended in a segmentation fault, which would take pytest down."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pks_emu
from pks_emu import GeneralProtectionFault, Machine, PageFault

NONE_CALLS = [
    "pks_emu.access_batch(None, np.zeros(4, np.uint64), 0)",
    "pks_emu.access_batch('cpu', np.zeros(4, np.uint64), 0)",
    "_core.load_cpu_state(None, 0, 0, 0, 0, 0, 0, 0, 0)",
    "_core.first_invalid_record(None, 1, 1)",
    "_core.ReplayEngine(m).run(None, 0)",
    "_lackey.scan_block(None, 0, 0, None, None, None, 0, True)",
    "_lackey.scan_block(b'I  1,1\\n', 0, 7, None, None, None, 0, True)",
    "_capi._run_until_fault(cpu, None, None, None, None, 0, None, None)",
    "pks_emu.CPU(None)",
    "pks_emu.CPU.__new__(pks_emu.CPU).access(0, 'read')",
    "pks_emu.CPU.__new__(pks_emu.CPU).walk(0)",
    "cpu.access(None, 'read')",
    "m.memory.write(None, b'x')",
]


@pytest.mark.parametrize("call", NONE_CALLS)
def test_none_and_wrong_types_raise_type_error(call):
    code = textwrap.dedent(f"""
        import numpy as np
        import pks_emu
        from pks_emu import _core, _lackey, _capi
        m = pks_emu.Machine(); cpu = m.cpus[0]
        try:
            {call}
        except TypeError as e:
            print("TypeError:", e)
        else:
            print("accepted")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{call}: exit {p.returncode} {p.stderr[-300:]}"
    assert p.stdout.startswith("TypeError:"), (call, p.stdout)


@pytest.fixture
def cpu():
    m = Machine()
    a = m.address_space()
    a.map(0x1000, 0x5000, user=False)
    a.activate()
    yield m.cpus[0]      # the machine stays alive (CPU.machine is a weak reference)
    del m


@pytest.mark.parametrize("call", [
    lambda c: c.access(4096.0, "read"),
    lambda c: c.access(1.5, "read"),
    lambda c: c.access(0x1000, "read", size=2.5),
    lambda c: c.access(np.float64(4096), "read"),
    lambda c: c.translate(1.5, "read"),
    lambda c: c.translate(0x1000, "read", size=8.0),
    lambda c: c.walk(1.5),
    lambda c: c.invlpg(1.5),
    lambda c: c.cpuid(7.0),
    lambda c: setattr(c, "cr0", float(c.cr0)),
    lambda c: setattr(c, "cr4", float(c.cr4)),
    lambda c: setattr(c, "cpl", 1.5),
    lambda c: setattr(c, "rflags", 2.0),
    lambda c: c.wrmsr(0x6E1 + 0.0, 0),
    lambda c: c.wrpkru(0.0),
    lambda c: c.machine.memory.read_u64(0x5000 + 0.5),
    lambda c: c.machine.memory.write_u64(0x5000, 1.0),
    lambda c: c.machine.memory.write(20480.0, b"x"),
    lambda c: c.machine.memory.is_allocated(1.5),
    lambda c: pks_emu.access_batch(c, [4096.0, 8192.0], 0),
    lambda c: pks_emu.access_batch(c, [4096, 1.5], 0),
    lambda c: pks_emu.access_batch(c, [4096], 0, size=2.5),
    lambda c: pks_emu.access_batch(c, [4096], 0, size=[2.5]),
    lambda c: pks_emu.access_batch(c, np.array([4096.0]), 0),
])
def test_floats_are_refused(cpu, call):
    with pytest.raises(TypeError, match="integer"):
        call(cpu)


def test_integers_bools_and_numpy_integers_still_work(cpu):
    assert cpu.access(0x1000, "read") == 0x5000
    assert cpu.access(np.uint64(0x1008), "read", size=np.uint16(8)) == 0x5008
    assert cpu.access(np.int64(0x1010), "read", size=True) == 0x5010
    assert cpu.translate(np.uint32(0x1000), "write").pa == 0x5000
    assert pks_emu.access_batch(cpu, [0x1000, np.uint64(0x1008)], 0)[0].tolist() == [0x5000, 0x5008]
    assert pks_emu.access_batch(cpu, (0x1000,), 0, size=np.uint8(4))[0].tolist() == [0x5000]
    cpu.cpl = np.int8(0)
    cpu.cr0 = np.uint64(cpu.cr0)
    assert cpu.walk(np.uint64(0x1000))[-1][0] == 1
    with pytest.raises(OverflowError):
        cpu.walk(-1)
    with pytest.raises(OverflowError):
        cpu.rflags = -1


def test_wrap_past_2_64_is_named(cpu):
    with pytest.raises(GeneralProtectionFault, match=r"8 bytes at 0xffffffffffffffff wraps past 2\*\*64"):
        cpu.access(2**64 - 1, "read", size=8)
    t = cpu.translate(2**64 - 4, "read", size=8)
    assert not t.ok and t.vector == 13
    with pytest.raises(GeneralProtectionFault, match="non-canonical address 0x800000000000"):
        cpu.access(0x8000_0000_0000, "read", size=1)
    with pytest.raises(PageFault):        # canonical top of memory, no wrap: an ordinary #PF
        cpu.access(2**64 - 8, "read", size=8)
