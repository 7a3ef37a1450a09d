"""Kernel policies (pks_emu/trace/kpolicy.py) and the KernelMapper replay of
a captured kernel (pks_emu/_kmap.pxi), on a small hand-written kallsyms file
and synthetic v2 kernel-capture traces."""
from __future__ import annotations

import numpy as np
import pytest

import pks_emu
from pks_emu.errors import TraceFormatError
from pks_emu.trace import v2
from pks_emu.trace.format import RECORD, RecordType
from pks_emu.trace.kpolicy import Kallsyms, load_kernel_policy, resolve, window_ranges

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81001000 T pmem_do_write
ffffffff81001100 T pmem_do_read
ffffffff81001200 T memcpy_flushcache
ffffffff81001300 T other_func
ffffffff81001400 T text_poke
ffffffff81c00000 T __entry_text_start
ffffffff81c00100 T native_irq_return_iret
ffffffff81c01000 T __entry_text_end
ffffffff81e00000 T _etext
ffffffff82000000 D __start_rodata
ffffffff82001000 D some_table
ffffffff82001800 d next_object
ffffffff82002000 D __end_rodata
ffffffffc0000000 t pmem_submit_bio\t[nd_pmem]
ffffffffc0000100 t pmem_end\t[nd_pmem]
"""

FUNC = {"pmem_do_write": 0xffffffff81001000, "pmem_do_read": 0xffffffff81001100,
        "memcpy_flushcache": 0xffffffff81001200, "other_func": 0xffffffff81001300,
        "text_poke": 0xffffffff81001400}
RODATA = 0xffffffff82000000
DIRECT_MAP = 0xff11000000000000          # 5-level paging
PMEM_PA = 0x40000000


@pytest.fixture
def kallsyms(tmp_path):
    p = tmp_path / "t.kallsyms"
    p.write_text(KALLSYMS)
    return p


def policy_file(tmp_path, text, name="p.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def write_trace(path, rows, ncpus=1, levels=5):
    """rows: (cpu, op, addr, ip, pa[, cpl, flags, size])."""
    recs = np.zeros(len(rows), RECORD)
    ip = np.zeros(len(rows), np.uint64)
    pa = np.zeros(len(rows), np.uint64)
    for i, row in enumerate(rows):
        cpu, op, addr, ipv, pav, *rest = row
        cpl, flags, size = (list(rest) + [None, None, None])[:3]
        recs[i]["type"] = RecordType.ACCESS
        recs[i]["cpu"] = cpu
        recs[i]["op"] = op
        recs[i]["addr"] = addr
        recs[i]["size"] = size or 8
        recs[i]["cpl"] = 0 if cpl is None else cpl
        recs[i]["flags"] = flags or 0
        ip[i] = ipv
        pa[i] = pav
    hdr = v2.TraceHeaderV2(paging_levels=levels, ncpus=ncpus, maxphyaddr=40, api=10,
                           features=frozenset({"la57", "nx", "smep", "smap", "pku", "pks", "1g"}),
                           trace_flags=v2.TF_KERNEL_CAPTURE | v2.TF_HAS_PA)
    with v2.V2Writer(path, hdr) as w:
        w.write(recs, ip, pa)
    return path


def kva_pa(va):
    """A kernel-image address's physical address with nokaslr."""
    return va - 0xffffffff80000000


# --- the policy loader and resolver -------------------------------------------------

def test_resolve_every_way(tmp_path, kallsyms):
    p = load_kernel_policy(policy_file(tmp_path, """
[kernel]
pkrs = { 1 = "read-only", 4 = "no-access" }
[default]
pkey = 2
[[region]]
name = "ro"
section = "rodata"
pkey = 1
[[region]]
symbol = "some_table"
pkey = 3
[[region]]
from = "_stext"
to = "_etext"
pkey = 5
[[region]]
module = "nd_pmem"
pkey = 6
[[region]]
area = "vmalloc"
pkey = 7
[[region]]
phys_start = 0x40000000
phys_end = 0x44000000
pkey = 4
[[region]]
start = 0xffffffffff600000
end = 0xffffffffff601000
pkey = 8
"""))
    assert p.pkrs == (2 << 2) | (1 << 8) and p.default_pkey == 2
    resolve(p, Kallsyms(kallsyms), 5)
    got = [(r.start, r.end, r.by_pa, r.pkey) for r in p.regions]
    assert got == [(RODATA, 0xffffffff82002000, False, 1),
                   (0xffffffff82001000, 0xffffffff82001800, False, 3),
                   (0xffffffff81000000, 0xffffffff81e00000, False, 5),
                   (0xffffffffc0000000, 0xffffffffc0001100, False, 6),
                   (0xffa0000000000000, 0xffd2000000000000, False, 7),
                   (PMEM_PA, 0x44000000, True, 4),
                   (0xffffffffff600000, 0xffffffffff601000, False, 8)]


def test_kallsyms_skips_absolute_and_zero(kallsyms):
    k = Kallsyms(kallsyms)
    assert "fixed_percpu_data" not in k
    assert k.extent("pmem_do_write", "t") == (0xffffffff81001000, 0xffffffff81001100)
    assert k.module_of["pmem_end"] == "nd_pmem"


@pytest.mark.parametrize("text,msg", [
    ('[[region]]\nsymbol = "nope"\npkey = 1\n', "'nope' is not in"),
    ('[[region]]\nsection = "text"\nstart = 1\nend = 2\npkey = 1\n', "exactly one of"),
    ('[[region]]\nsection = "heap"\npkey = 1\n', "expected one of"),
    ('[[region]]\nstart = 5\nend = 5\npkey = 1\n', "empty"),
    ('[[region]]\nstart = 1\nend = 2\npkey = 1\ncolour = 3\n', "unknown setting"),
    ('[kernel]\npkrs = { 16 = "ro" }\n', "out of range"),
    ('[[window]]\nfunctions = ["pmem_do_write"]\npkey = 1\nrights = "rwx"\n', "expected one of"),
])
def test_policy_errors(tmp_path, kallsyms, text, msg):
    with pytest.raises(TraceFormatError, match=msg):
        resolve(load_kernel_policy(policy_file(tmp_path, text)), Kallsyms(kallsyms), 5)


def test_window_ranges_table(tmp_path, kallsyms):
    p = load_kernel_policy(policy_file(tmp_path, """
[[window]]
functions = ["pmem_do_write", "pmem_do_read"]
callees = ["memcpy_flushcache", "not_in_this_kernel"]
pkey = 4
"""))
    resolve(p, Kallsyms(kallsyms), 5)
    assert window_ranges(p) == [(FUNC["pmem_do_write"], FUNC["pmem_do_read"], 0, 0),
                                (FUNC["pmem_do_read"], FUNC["memcpy_flushcache"], 0, 0),
                                (FUNC["memcpy_flushcache"], FUNC["other_func"], -1, 1)]


# --- replay through the KernelMapper ------------------------------------------------

RODATA_POLICY = """
[kernel]
pkrs = { 1 = "read-only" }
[[region]]
section = "rodata"
pkey = 1
"""


def replay(tmp_path, kallsyms, rows, policy_text, **kw):
    trace = write_trace(tmp_path / "k.pkt2", rows, ncpus=kw.pop("ncpus", 1))
    return pks_emu.replay(str(trace), policy=str(policy_file(tmp_path, policy_text)),
                          kallsyms=str(kallsyms), **kw)


def faults(r):
    return [(int(f["record"]), int(f["vector"]), int(f["pkey"])) for f in r.faults]


def test_region_by_va_write_disabled(tmp_path, kallsyms):
    a = RODATA + 0x1008
    r = replay(tmp_path, kallsyms, [(0, 0, a, FUNC["other_func"], kva_pa(a)),
                                    (0, 1, a, FUNC["text_poke"], kva_pa(a)),
                                    (0, 1, 0xffffffff82a00000, FUNC["other_func"], 0x2a00000)],
               RODATA_POLICY)
    assert faults(r) == [(1, 14, 1)]
    assert r.faults[0]["error_code"] == 0x23                # P|W|PK
    d = r.to_dict()
    assert d["sites"][0]["symbol"].startswith("text_poke+")
    assert r.input_info["mapper"]["pages_mapped"] == 2


def test_region_by_pa_catches_an_alias(tmp_path, kallsyms):
    pol = """
[kernel]
pkrs = { 4 = "no-access" }
[[region]]
phys_start = 0x40000000
phys_end = 0x44000000
pkey = 4
"""
    rows = [(0, 1, DIRECT_MAP + PMEM_PA + 0x10, FUNC["other_func"], PMEM_PA + 0x10),
            (0, 0, 0xffa0000000001000, FUNC["other_func"], PMEM_PA + 0x2000),   # a vmalloc alias
            (0, 0, DIRECT_MAP + 0x1000, FUNC["other_func"], 0x1000)]
    r = replay(tmp_path, kallsyms, rows, pol)
    assert faults(r) == [(0, 14, 4), (1, 14, 4)]


def test_first_touch_and_remap(tmp_path, kallsyms):
    va = 0xffa0000000005000
    rows = [(0, 0, va, FUNC["other_func"], 0x100000),
            (0, 0, va + 8, FUNC["other_func"], 0x100008),        # same page: no new mapping
            (0, 0, va, FUNC["other_func"], 0x200000),            # vmalloc reuse: a remap
            (0, 0, va, FUNC["other_func"], 0x200000)]
    r = replay(tmp_path, kallsyms, rows, RODATA_POLICY)
    assert faults(r) == []
    m = r.input_info["mapper"]
    assert m["pages_mapped"] == 1 and m["pages_remapped"] == 1


def test_remap_into_a_physical_region(tmp_path, kallsyms):
    """A virtual page the guest remaps onto a protected frame takes the frame's key."""
    pol = '[kernel]\npkrs = { 4 = "no-access" }\n[[region]]\nphys_start = 0x40000000\nphys_end = 0x44000000\npkey = 4\n'
    va = 0xffa0000000005000
    rows = [(0, 0, va, FUNC["other_func"], 0x100000),
            (0, 0, va, FUNC["other_func"], PMEM_PA)]
    r = replay(tmp_path, kallsyms, rows, pol)
    assert faults(r) == [(1, 14, 4)]


def test_remap_out_of_a_physical_region(tmp_path, kallsyms):
    """A virtual page that faulted on a protected frame and that the guest
    then remaps onto an unprotected one (a vmalloc or kmap address reused)
    takes the new frame's key: its accesses there do not fault, whether the
    replay answers the repeated faults in its loop or one record at a time."""
    pol = '[kernel]\npkrs = { 4 = "no-access" }\n[[region]]\nphys_start = 0x40000000\nphys_end = 0x44000000\npkey = 4\n'
    va = 0xffa0000000005000
    rows = ([(0, 0, va, FUNC["other_func"], PMEM_PA)] * 3 + [(0, 1, va + 8, FUNC["other_func"], 0x100008)] * 3
            + [(0, 0, va, FUNC["other_func"], PMEM_PA + 16)] * 2)
    for chunk in (None, 1):
        r = replay(tmp_path, kallsyms, rows, pol, **({} if chunk is None else {"chunk_records": chunk}))
        assert faults(r) == [(0, 14, 4), (1, 14, 4), (2, 14, 4), (6, 14, 4), (7, 14, 4)]
        assert r.input_info["mapper"]["pages_remapped"] == 2


WINDOW_POLICY = """
[kernel]
pkrs = { 4 = "no-access" }
[[region]]
phys_start = 0x40000000
phys_end = 0x44000000
pkey = 4
[[window]]
name = "pmem"
functions = ["pmem_do_write", "pmem_do_read"]
callees = ["memcpy_flushcache"]
pkey = 4
rights = "read-write"
"""


def test_windows_and_callees(tmp_path, kallsyms):
    a = DIRECT_MAP + PMEM_PA
    rows = [(0, 1, a, FUNC["pmem_do_write"], PMEM_PA),            # 0 in the window
            (0, 1, a + 8, FUNC["memcpy_flushcache"], PMEM_PA + 8),  # 1 its callee, from it
            (0, 0, a, FUNC["pmem_do_write"] + 0x10, PMEM_PA),     # 2 back in the caller
            (0, 0, a, FUNC["other_func"], PMEM_PA),               # 3 outside: closes, faults
            (0, 1, a, FUNC["memcpy_flushcache"], PMEM_PA),        # 4 the callee from outside
            (0, 0, a, FUNC["pmem_do_read"], PMEM_PA)]             # 5 the window again
    r = replay(tmp_path, kallsyms, rows, WINDOW_POLICY)
    assert faults(r) == [(3, 14, 4), (4, 14, 4)]
    m = r.input_info["mapper"]
    assert m["window_opens"] == 2 and m["window_closes"] == 1
    assert r.input_info["windows"][0]["opened"] == 2
    # each opening and closing is a consumer PKRS update: a WRMSR each (the value changes)
    assert r.kernel["pkrs_writes"] == 3


def test_windows_per_cpu(tmp_path, kallsyms):
    a = DIRECT_MAP + PMEM_PA
    rows = [(0, 1, a, FUNC["pmem_do_write"], PMEM_PA),     # CPU 0 opens
            (1, 1, a, FUNC["other_func"], PMEM_PA),        # CPU 1 has it closed
            (0, 1, a, FUNC["pmem_do_write"], PMEM_PA)]
    r = replay(tmp_path, kallsyms, rows, WINDOW_POLICY, ncpus=2)
    assert faults(r) == [(1, 14, 4)]


def test_window_update_avoided_by_the_cache(tmp_path, kallsyms):
    """A window whose rights equal the closed ones changes nothing: the
    per-CPU cache avoids the WRMSR."""
    pol = WINDOW_POLICY.replace('pkrs = { 4 = "no-access" }', 'pkrs = { 4 = "read-write" }')
    a = DIRECT_MAP + PMEM_PA
    rows = [(0, 1, a, FUNC["pmem_do_write"], PMEM_PA), (0, 0, a, FUNC["other_func"], PMEM_PA)]
    r = replay(tmp_path, kallsyms, rows, pol)
    assert faults(r) == []
    assert r.kernel["pkrs_writes"] == 0 and r.kernel["pkrs_writes_avoided"] == 2


def test_flag_ac_user_access(tmp_path, kallsyms):
    user = 0x7ffd1000
    rows = [(0, 1, user, FUNC["other_func"], 0x300000, 0, v2.FLAG_AC),   # copy_to_user
            (0, 0, user, FUNC["other_func"], 0x300000, 0, 0),            # no stac: SMAP
            (0, 0, user + 16, 0x401000, 0x300010, 3, 0)]                 # the user itself
    r = replay(tmp_path, kallsyms, rows, RODATA_POLICY)
    assert faults(r) == [(1, 14, 0)]
    assert r.faults[0]["error_code"] & 0x4 == 0      # a supervisor access


def test_default_key(tmp_path, kallsyms):
    pol = '[kernel]\npkrs = { 2 = "no-access" }\n[default]\npkey = 2\n'
    rows = [(0, 0, DIRECT_MAP + 0x5000, FUNC["other_func"], 0x5000),
            (0, 0, 0x601000, 0x401000, 0x7000, 3, 0)]       # user pages keep key 0
    r = replay(tmp_path, kallsyms, rows, pol)
    assert faults(r) == [(0, 14, 2)]


def test_unknown_pa_gets_frame_zero(tmp_path, kallsyms):
    rows = [(0, 0, 0xffffc90000001000, FUNC["other_func"], v2.PA_NONE)]
    r = replay(tmp_path, kallsyms, rows, RODATA_POLICY)
    assert faults(r) == [] and r.input_info["mapper"]["pages_mapped"] == 1


ALIAS_POLICY = """
[kernel]
pkrs = { 1 = "read-only", 2 = "read-only" }
[[region]]
section = "rodata"
pkey = 1
[[region]]
phys_start = 0x2000000          # the same pages, any other alias
phys_end = 0x2002000
pkey = 2
"""


def test_pa_region_catches_a_text_poke_alias(tmp_path, kallsyms):
    """text_poke writes through a lower-half address of its temporary mm
    (PAGE_KERNEL): the capture flags it AC; the physical region's page is a
    supervisor page there, under the region's key."""
    poke = 0x7f0000001000
    rows = [(0, 1, poke + 8, FUNC["text_poke"], kva_pa(RODATA) + 8, 0, v2.FLAG_AC),
            (0, 1, DIRECT_MAP + kva_pa(RODATA) + 0x1000, FUNC["other_func"], kva_pa(RODATA) + 0x1000),
            (0, 1, RODATA + 0x10, FUNC["other_func"], kva_pa(RODATA) + 0x10)]
    r = replay(tmp_path, kallsyms, rows, ALIAS_POLICY)
    assert faults(r) == [(0, 14, 2), (1, 14, 2), (2, 14, 1)]
    assert r.faults[0]["error_code"] == 0x23           # P|W|PK: a supervisor page


def test_pa_region_user_mode_alias_is_a_user_page(tmp_path, kallsyms):
    rows = [(0, 1, 0x7f0000001000, 0x401000, kva_pa(RODATA), 3, 0)]
    r = replay(tmp_path, kallsyms, rows, ALIAS_POLICY)
    assert faults(r) == []                    # a user page: PKRU decides, and allows


def test_interrupt_inside_a_window(tmp_path, kallsyms):
    """An interrupt in a window's callee suspends the window (the handler
    runs closed); the return into the callee reopens it. A callee entered
    later from outside stays closed."""
    a = DIRECT_MAP + PMEM_PA
    entry, iret = 0xffffffff81c00010, 0xffffffff81c00100
    rows = [(0, 1, a, FUNC["pmem_do_write"], PMEM_PA),                # 0 opens
            (0, 1, a + 8, FUNC["memcpy_flushcache"], PMEM_PA + 8),      # 1 callee
            (0, 1, DIRECT_MAP + 0x9000, entry, 0x9000),               # 2 interrupt entry
            (0, 0, a, FUNC["other_func"], PMEM_PA),                   # 3 handler: closed
            (0, 0, DIRECT_MAP + 0x9000, iret, 0x9000),                # 4 iret
            (0, 1, a + 16, FUNC["memcpy_flushcache"], PMEM_PA + 16),    # 5 back: reopened
            (0, 0, DIRECT_MAP + 0x9000, FUNC["other_func"], 0x9000),  # 6 returned: closed
            (0, 1, a, FUNC["memcpy_flushcache"], PMEM_PA)]            # 7 callee from outside
    r = replay(tmp_path, kallsyms, rows, WINDOW_POLICY)
    assert faults(r) == [(3, 14, 4), (7, 14, 4)]
    m = r.input_info["mapper"]
    assert m["window_opens"] == 2 and m["window_closes"] == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_windows_in_the_hot_path_match_one_record_at_a_time(tmp_path, kallsyms, seed):
    """Random runs of accesses in and out of a window, its callee from inside
    and outside, interrupts (entry text) inside and outside, on two CPUs:
    the replay's hot path takes records whose IP is where the window would
    not change, and must leave the faults, counters, window transitions and
    PKRS writes of a replay one record at a time (which never takes it)."""
    rng = np.random.default_rng(seed)
    a = DIRECT_MAP + PMEM_PA
    entry, handler, iret = 0xffffffff81c00010, FUNC["other_func"] + 0x80, 0xffffffff81c00100
    write, callee, outside = FUNC["pmem_do_write"], FUNC["memcpy_flushcache"], FUNC["other_func"]

    def interrupt():
        return [entry] * int(rng.integers(1, 4)) + [handler] * int(rng.integers(0, 6)) + [iret]

    def some(ip):
        return [ip + 4 * int(rng.integers(8))] * int(rng.integers(1, 12))

    rows = []
    cpu = 0
    while len(rows) < 4000:
        # an accessor (caller, callee, maybe interrupted, caller again), code
        # outside it, or its callee called from outside; any of them interrupted
        kind = int(rng.integers(3))
        seq = (some(write) + some(callee) if kind == 0 else some(outside) if kind == 1 else some(callee))
        if rng.integers(2):
            seq += interrupt()
        seq += some(callee) if kind != 1 else some(outside)
        if rng.integers(8) == 0:
            cpu = 1 - cpu
        for ip in seq:
            off = 8 * int(rng.integers(64))
            if rng.integers(3):
                rows.append((cpu, int(rng.integers(2)), a + off, ip, PMEM_PA + off))
            else:
                rows.append((cpu, int(rng.integers(2)), DIRECT_MAP + 0x9000 + off, ip, 0x9000 + off))
    whole = replay(tmp_path, kallsyms, rows, WINDOW_POLICY, ncpus=2, log_limit=0)
    single = replay(tmp_path, kallsyms, rows, WINDOW_POLICY, ncpus=2, log_limit=0, chunk_records=1)
    assert whole.fault_total > 100
    assert whole.input_info["mapper"]["window_opens"] > 20
    assert np.array_equal(whole.faults, single.faults)
    assert whole.counters == single.counters and whole.kernel == single.kernel
    assert whole.input_info["mapper"] == single.input_info["mapper"]


def test_replay_with_and_without_read_ahead_threads_agree(tmp_path, kallsyms):
    # Many chunks, remaps and faults: decoding chunks ahead on a thread
    # (threads=True) must give the result of decoding them in line.
    rng = np.random.default_rng(11)
    n = 40_000
    pages = rng.integers(0, 64, n)
    rows = []
    for i in range(n):
        va = RODATA + 0x1000 * int(pages[i]) + 8 * int(rng.integers(0, 500))
        pa = kva_pa(va) if rng.random() > 0.01 else 0x300000 + (va & 0xFFF)   # some remaps
        op = int(rng.random() < 0.2)
        ip = FUNC["text_poke"] if rng.random() < 0.3 else FUNC["other_func"]
        rows.append((0, op, va, ip, pa))
    trace = tmp_path / "many.pkt2"
    recs = np.zeros(n, RECORD)
    ips = np.zeros(n, np.uint64)
    pas = np.zeros(n, np.uint64)
    for i, (cpu, op, va, ip, pa) in enumerate(rows):
        recs[i]["type"], recs[i]["cpu"], recs[i]["op"] = RecordType.ACCESS, cpu, op
        recs[i]["addr"], recs[i]["size"] = va, 8
        ips[i], pas[i] = ip, pa
    hdr = v2.TraceHeaderV2(paging_levels=5, ncpus=1, maxphyaddr=40, api=10,
                           features=frozenset({"la57", "nx", "smep", "smap", "pku", "pks", "1g"}),
                           trace_flags=v2.TF_KERNEL_CAPTURE | v2.TF_HAS_PA)
    with v2.V2Writer(trace, hdr, chunk_records=1000) as w:
        w.write(recs, ips, pas)
    pol = policy_file(tmp_path, RODATA_POLICY)

    def doc(threads):
        d = pks_emu.replay(str(trace), policy=str(pol), kallsyms=str(kallsyms),
                           threads=threads).to_dict()
        for k in ("elapsed_seconds", "accesses_per_second"):
            d.pop(k, None)
        return d
    a, b = doc(True), doc(False)
    assert a["fault_count"] > 100 and a["records_replayed"] == n
    assert a == b
