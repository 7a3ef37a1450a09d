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
from pks_emu import GeneralProtectionFault, Machine, PageFault, TraceWriter

NONE_CALLS = [
    "pks_emu.access_batch(None, np.zeros(4, np.uint64), 0)",
    "pks_emu.access_batch('cpu', np.zeros(4, np.uint64), 0)",
    "_core.load_cpu_state(None, 0, 0, 0, 0, 0, 0, 0, 0)",
    "_core.first_invalid_record(None, 1, 1)",
    "_core.ReplayEngine(m).run(None, 0)",
    "_lackey.scan_block(None, 0, 0, None, None, None, 0, True)",
    "_lackey.scan_block(b'I  1,1\\n', 0, 7, None, None, None, 0, True)",
    "_hooks._run_until_fault(cpu, None, None, None, None, 0, None, None)",
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
        from pks_emu import _core, _lackey, _capi, _hooks
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


# --- Python layer: Machine, AddressSpace, TraceWriter, replay_records ------------------------

@pytest.mark.parametrize("kw", [{"paging_levels": 4.0}, {"ncpus": True}, {"ncpus": 2.0},
                                {"maxphyaddr": 52.0}, {"tlb_entries": 1024.0},
                                {"features": "pks"}, {"features": None}, {"compat": 1}])
def test_machine_refuses_wrong_types(kw):
    with pytest.raises(TypeError):
        Machine(**kw)


def test_machine_takes_numpy_integers():
    m = Machine(ncpus=np.int64(2), paging_levels=np.uint8(5))
    assert m.ncpus == 2 and m.paging_levels == 5 and type(m.paging_levels) is int


@pytest.mark.parametrize("call", [
    lambda a: a.map(0x1000, 0x2000, pkey=True),
    lambda a: a.map(0x1000, 0x2000, pkey=1.0),
    lambda a: a.map(0x1000, 8192.0),
    lambda a: a.map_range(0x1000, 0x2000, 4096, pkey=1.5),
    lambda a: a.map_range(0x1000, 0x2000, 4096.0),
    lambda a: a.protect(0x1000, pkey=1.5),
])
def test_address_space_refuses_floats_and_bool_keys(call):
    m = Machine()
    a = m.address_space()
    a.map(0x1000, 0x9000)
    with pytest.raises(TypeError):
        call(a)


def test_address_space_needs_a_machine():
    with pytest.raises(TypeError, match="needs a pks_emu.Machine"):
        pks_emu.AddressSpace(None)


@pytest.mark.parametrize("call,exc", [
    (lambda w: w.access(0, 1.5, "read"), TypeError),
    (lambda w: w.access(0, 0x1000, "read", size=2.5), TypeError),
    (lambda w: w.access(0, 0x1000, "read", cpl=True), TypeError),
    (lambda w: w.accesses(0, [1.5], 0), TypeError),
    (lambda w: w.accesses(0, np.array([4096.0]), 0), TypeError),
    (lambda w: w.accesses(0, [1], 0, size=[2.5]), TypeError),
    (lambda w: w.accesses(0, [-1], 0), (ValueError, OverflowError)),
    (lambda w: w.wrmsr(0, 0x6E1, 1.5), TypeError),
    (lambda w: w.wrmsr(0, 1 << 40, 0), ValueError),          # not an MSR number: unreadable file
    (lambda w: w.rdmsr(0, -1), ValueError),
    (lambda w: w.wrpkru(0, 1.5), TypeError),
    (lambda w: w.context_switch(0, -1), ValueError),
    (lambda w: w.context_switch(0, 1 << 30), ValueError),     # above max_tasks
    (lambda w: w.exception_entry(0, 300), ValueError),
    (lambda w: w.pte_write(1 << 52, 0), ValueError),
    (lambda w: w.invlpg(0, 2 ** 64), ValueError),
    (lambda w: w.access(1, 0x1000, "read"), ValueError),      # CPU 1 of 1
])
def test_trace_writer_refuses_what_the_reader_would(tmp_path, call, exc):
    from pks_emu import replay
    path = tmp_path / "t.pkt"
    with TraceWriter(path, Machine()) as w:
        with pytest.raises(exc):
            call(w)
        w.access(0, 0x1000, "read")
    assert replay(path).records == 1          # what was written stays readable


def test_trace_writer_and_replay_records_need_a_machine(tmp_path):
    from pks_emu import replay_records
    from pks_emu.trace.format import RECORD
    with pytest.raises(TypeError, match="needs a pks_emu.Machine"):
        TraceWriter(tmp_path / "t.pkt", None)
    with pytest.raises(TypeError, match="needs a pks_emu.Machine"):
        replay_records(None, np.zeros(1, RECORD))
    with pytest.raises(TypeError):
        TraceWriter(tmp_path / "t.pkt", Machine(), max_tasks=1.5)
    assert list(tmp_path.iterdir()) == []
