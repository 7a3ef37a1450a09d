"""End to end: boot the default guest under QEMU with the capture plugins.

These need qemu-system-x86_64, a kernel in /boot, busybox-static and a C
compiler; each skips (with the reason) only when one of them is absent.
Each boot takes roughly 5-15 s of one core.
"""
import struct

import pytest

from capture_marks import needs_busybox, needs_cc, needs_kernel, needs_qemu
from pks_emu.capture import capture
from pks_emu.errors import PksEmuError

pytestmark = [needs_qemu, needs_kernel, needs_busybox, needs_cc]

PA_NONE = 0xFFFF_FFFF_FFFF_FFFF


def test_count_only_boot(tmp_path):
    info = capture(None, count_only=True, kallsyms_out=tmp_path / "kallsyms", timeout=300)
    c = info.counts
    assert info.exit_status == 0 and info.workload_status == 0
    assert info.plugin == "count" and c["plugin"] == "pks_count"
    # a boot makes hundreds of millions of kernel accesses; a few million is a floor
    assert c["kernel_loads"] > 5_000_000 and c["kernel_stores"] > 5_000_000
    assert c["user_loads"] > 10_000 and c["user_stores"] > 10_000   # init, busybox
    assert 0 < c["kernel_user_accesses"] < c["kernel_loads"] + c["kernel_stores"]
    assert c["kernel_fetches"] == 0 and c["user_fetches"] == 0
    assert info.kallsyms == tmp_path / "kallsyms"
    syms = {}
    for line in info.kallsyms.read_text().splitlines():
        addr, typ, name = line.split()[:3]
        syms[name] = int(addr, 16)
    assert syms["_stext"] >> 63 == 1           # kernel half
    assert syms["_stext"] == 0xFFFF_FFFF_8100_0000  # nokaslr: the link address
    assert "\r" not in info.kallsyms.read_text()


def _crc():
    try:
        from pks_emu._tracev2 import crc32c   # the checksum of trace v2 blocks (CRC-32C)
    except ImportError:
        return None
    return crc32c


def _v2_frames(data):
    """Framing check independent of the v2 decoder: header, CRCs, chunk and end totals."""
    crc32c = _crc()
    assert data[:8] == b"PKSEMUTR" and struct.unpack_from("<H", data, 8)[0] == 2
    assert crc32c is None or struct.unpack_from("<I", data, 48)[0] == crc32c(data[:48])
    pos, chunk_records, end = 128, 0, None
    while pos < len(data):
        tag, n, crc = struct.unpack_from("<4sII", data, pos)
        payload = data[pos + 16:pos + 16 + n]
        assert len(payload) == n, (tag, pos)
        assert crc32c is None or crc32c(payload) == crc, (tag, pos)
        if tag == b"PKSC":
            chunk_records += struct.unpack_from("<I", payload, 8)[0]
        elif tag == b"PKSE":
            end = struct.unpack_from("<QQQ", payload)
        pos += 16 + n
    assert end is not None, "no end marker"
    return chunk_records, end


def test_record_boot_v2(tmp_path):
    out = tmp_path / "boot.pkt2"
    limit = 2_000_000
    info = capture(out, smp=2, start="user", limit=limit, timeout=300, save_kallsyms=False)
    c = info.counts
    assert info.trace == out and out.exists() and not (tmp_path / "boot.pkt2.part").exists()
    assert c["records"] == limit and c["limit_reached"] is True
    assert c["records_dropped"] > 0 and c["write_error"] is None
    assert c["vcpus"] == 2
    data = out.read_bytes()
    assert info.trace_bytes == len(data)
    chunk_records, (total, chunks, frames) = _v2_frames(data)
    assert chunk_records == total == limit and frames == 0

    v2 = pytest.importorskip("pks_emu.trace.v2", reason="the trace v2 reader is not built in")
    import numpy as np
    with v2.open_trace_v2(out) as r:
        assert r.header.ncpus == 2
        n, cpus, kinds = 0, set(), set()
        saw_ac = saw_pa = False
        for first, recs, ip, pa in r.chunks():
            assert first == n
            n += len(recs)
            assert pa is not None
            assert (recs["type"] == 0).all()
            cpus.update(np.unique(recs["cpu"]).tolist())
            kinds.update(np.unique(recs["op"]).tolist())
            kernel_ip = (ip >> np.uint64(63)) == 1
            # classification: CPL from the instruction pointer's half
            assert (recs["cpl"][kernel_ip] == 0).all() and (recs["cpl"][~kernel_ip] == 3).all()
            user_va = (recs["addr"] >> np.uint64(63)) == 0
            ac = (recs["flags"] & 2) != 0
            assert (ac == (kernel_ip & user_va)).all()
            saw_ac |= bool(ac.any())
            assert np.isin(recs["size"], [1, 2, 4, 8, 16, 32, 64]).all()
            has = pa != np.uint64(PA_NONE)
            saw_pa |= bool(has.any())
            # RAM accesses: the page offset survives translation; pa within guest RAM (512M)
            assert ((pa[has] & np.uint64(0xFFF)) == (recs["addr"][has] & np.uint64(0xFFF))).all()
            assert (pa[has] < np.uint64(512 << 20)).all()
    assert n == limit
    assert kinds == {0, 1}          # loads and stores, no fetches
    assert cpus == {0, 1}           # both vCPUs are up once user space runs
    assert saw_pa


def test_qemu_failure_shows_its_output(tmp_path):
    with pytest.raises(PksEmuError, match=r"QEMU exited with status 1(.|\n)*no-such-option"):
        capture(None, count_only=True, extra_qemu_args=["-no-such-option"], timeout=120)


def test_timeout(tmp_path):
    with pytest.raises(PksEmuError, match="did not finish within 0.5 s"):
        capture(tmp_path / "t.pkt2", timeout=0.5)
    assert not (tmp_path / "t.pkt2").exists() and not (tmp_path / "t.pkt2.part").exists()


def test_failing_workload_is_reported(tmp_path):
    script = tmp_path / "w.sh"
    script.write_text("exit 7\n")
    info = capture(None, count_only=True, workload=script, save_kallsyms=False, timeout=300)
    assert info.workload_status == 7 and info.kallsyms is None


def test_record_into_a_pipe(tmp_path):
    # the stream goes through a pipe (as into 'pks-emu replay -'): no seeking back
    from pks_emu.capture import capture_pipe
    reader, job = capture_pipe(start="user", limit=300_000, fetches=True, save_kallsyms=False,
                               timeout=300)
    with reader:
        data = reader.read()
    info = job.wait()
    assert info.trace is None and info.counts["records"] == 300_000
    chunk_records, (total, _, _) = _v2_frames(data)
    assert chunk_records == total == 300_000
    assert info.counts["kernel_fetches"] > 0 and info.counts["user_fetches"] > 0

    v2 = pytest.importorskip("pks_emu.trace.v2", reason="the trace v2 reader is not built in")
    import io
    import numpy as np
    kinds = set()
    with v2.open_trace_v2(io.BytesIO(data)) as r:
        for _, recs, ip, pa in r.chunks():
            kinds.update(np.unique(recs["op"]).tolist())
            fetch = recs["op"] == 2
            # a fetch is at its own instruction address, 1..15 bytes, with no pa
            assert (recs["addr"][fetch] == ip[fetch]).all()
            assert ((recs["size"][fetch] >= 1) & (recs["size"][fetch] <= 15)).all()
            assert (pa[fetch] == np.uint64(PA_NONE)).all()
    assert kinds == {0, 1, 2}


def test_reader_gone(tmp_path):
    import os
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(PksEmuError, match="writing the trace failed: Broken pipe"):
            capture(w, start="user", save_kallsyms=False, timeout=300)
    finally:
        os.close(w)


def test_output_path_that_is_not_a_regular_file(tmp_path):
    # A FIFO (like /dev/null, a device) is written in place: the finished
    # trace must not be renamed onto it, which would replace the node itself.
    import os
    import stat
    import threading
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    got = {}

    def drain():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    info = capture(fifo, start="user", limit=50_000, save_kallsyms=False, timeout=300)
    t.join(60)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not (tmp_path / "trace.fifo.part").exists()
    assert info.counts["records"] == 50_000
    chunk_records, (total, _, _) = _v2_frames(got["data"])
    assert chunk_records == total == 50_000


def test_cancel_stops_qemu(tmp_path):
    # A reader that gives up (a failed replay) stops the boot feeding it: QEMU
    # must not run on to the guest's power-off as an orphan.
    import time

    from pks_emu.capture import capture_pipe
    reader, job = capture_pipe(save_kallsyms=False, timeout=300)
    with reader:
        assert len(reader.read(1 << 20)) == 1 << 20   # the boot is under way
        t0 = time.monotonic()
        job.cancel()
        waited = time.monotonic() - t0
    assert job.done()
    with pytest.raises(PksEmuError, match="the capture was cancelled and QEMU stopped"):
        job.wait()
    # a boot takes 5-15 s; a cancelled one ends within the SIGTERM grace
    assert waited < 12, f"cancel() took {waited:.1f} s"


def test_pa_shortcut_agrees_with_the_api_on_every_access(tmp_path):
    # pa_shortcut=check: the plugin takes each guest-RAM address both from
    # the host address it learned and from QEMU's API, and counts disagreements.
    info = capture(tmp_path / "c.pkt2", pa_shortcut="check", coalesce=True, start="user",
                   save_kallsyms=False, timeout=300)
    c = info.counts
    assert c["pa_shortcut"] is True and c["pa_shortcut_failed"] is False
    assert c["pa_checked"] > 1_000_000
    assert c["pa_mismatches"] == 0
    # off: the API alone, nothing compared
    info = capture(tmp_path / "o.pkt2", pa_shortcut="off", start="user", limit=10_000,
                   save_kallsyms=False, timeout=300)
    assert info.counts["pa_shortcut"] is False and info.counts["pa_checked"] == 0
    with pytest.raises(PksEmuError, match="pa_shortcut 'maybe'"):
        capture(tmp_path / "x.pkt2", pa_shortcut="maybe", timeout=300)
