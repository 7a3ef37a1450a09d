"""The benchmark guest under QEMU's TCG: it runs the storm pattern with PKS
enforced, and QEMU's count of PK faults must be what the pattern implies and
what pks_emu's replay of the same accesses, in the same machine state, finds
(benchmarks/calibration/qemu_pks.py; a real x86 emulator as the oracle)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "calibration"))
import qemu_pks  # noqa: E402

from pks_emu.trace.replay import replay  # noqa: E402


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("qemu-guest")
    return qemu_pks.build_guest(str(d)), qemu_pks.guest_patterns(), d


def _expected(storm):
    keys = ((storm - np.uint64(qemu_pks.TEST_VA)) >> np.uint64(12)) & np.uint64(15)
    return int(np.count_nonzero(keys >= 3))


@pytest.mark.parametrize("levels", [4, 5])
def test_qemu_and_pks_emu_count_the_same_pk_faults(guest, levels):
    import shutil
    elf, pats, d = guest
    secs, counts = qemu_pks.run_guest(shutil.which("qemu-system-x86_64"), elf, levels)
    per_pass = _expected(pats["D"])
    assert 0.7 * len(pats["D"]) < per_pass < 0.9 * len(pats["D"])      # about 13/16
    assert counts == {"F": 2 * per_pass, "E": 2 * per_pass, "N": 0}
    assert all(s > 0 for s in secs.values())
    path = str(d / f"storm{levels}.pkt")
    qemu_pks.write_trace(path, levels, "D", pats["D"], 1)
    r = replay(path, log_limit=0)
    assert r.fault_total == per_pass
    # Every one a PK fault of a present page: P | PK, W for the writes.
    assert len(r.faults) == per_pass
    codes = set(zip(r.faults["error_code"].tolist(), r.faults["kind"].tolist()))
    assert codes == {(0x21, 0), (0x23, 1)}
    assert set(r.faults["vector"].tolist()) == {14}
    assert (r.faults["pkey"] >= 3).all()


def test_the_other_phases_fault_nowhere(guest):
    elf, pats, d = guest
    for ph in "ABC":
        path = str(d / f"{ph}.pkt")
        qemu_pks.write_trace(path, 4, ph, pats[ph], 1)
        r = replay(path)
        assert r.fault_total == 0
        assert r.record_counts["access"] == len(pats[ph])
    # The permutation visits every test page once.
    pages = (pats["C"] - np.uint64(qemu_pks.TEST_VA)) >> np.uint64(12)
    assert sorted(pages.tolist()) == list(range(qemu_pks.TEST_PAGES))
