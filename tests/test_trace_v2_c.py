"""The header-only C writer (pks_emu/include/pks_trace.h), compiled with the
system compiler: what it writes, pks_emu.trace.v2 reads back record for record."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pks_emu.trace import v2
from pks_emu.trace.format import RECORD

from test_trace_v2 import STATE, random_records, read_all

INCLUDE = Path(v2.__file__).resolve().parent.parent / "include"
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")

PROGRAM = r"""
#define _POSIX_C_SOURCE 200809L
#include "pks_trace.h"
#include <stdio.h>
#include <stdlib.h>

/* argv: out-path records-file ncpus trace_flags chunk_records use_fd
 * records-file: n x 10 little-endian u64 (type cpu op flags size cpl addr value ip pa) */
int main(int argc, char **argv)
{
    pks_tw_config cfg;
    pks_tw *w;
    FILE *in;
    uint64_t f[10];
    uint64_t states[2 * 8] = {0x80010033, 0x1000, 0x1406e0 | 0x1000000, 0xd01, 2, 0, 0, 0x55555554,
                              0x80010033, 0x1000, 0x1406e0 | 0x1000000, 0xd01, 2, 0, 0, 0x55555554};
    unsigned char frame[4096];
    size_t i = 0;
    int r;
    if (argc != 7)
        return 64;
    memset(&cfg, 0, sizeof cfg);
    cfg.ncpus = (unsigned)atoi(argv[3]);
    cfg.paging_levels = 4;
    cfg.features = 0x7f;
    cfg.maxphyaddr = 52;
    cfg.max_tasks = 65536;
    cfg.tlb_entries = 1024;
    cfg.pkrs_init = 0x55555554;
    cfg.api = 10;
    cfg.trace_flags = (unsigned)atoi(argv[4]);
    cfg.chunk_records = (unsigned)atoi(argv[5]);
    cfg.cpu_states = cfg.ncpus == 2 ? states : NULL;
    if (atoi(argv[6])) {
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        w = pks_tw_open_fd(fd, &cfg);
    } else {
        w = pks_tw_open_path(argv[1], &cfg);
    }
    if (!w)
        return 65;
    for (i = 0; i < sizeof frame; i++)
        frame[i] = (unsigned char)i;
    if (pks_tw_memory(w, 0x7000, frame) != 0)
        return 66;
    if (pks_tw_memory(w, 0x7001, frame) != -EINVAL)
        return 67;
    in = fopen(argv[2], "rb");
    if (!in)
        return 68;
    for (i = 0; fread(f, 8, 10, in) == 10; i++) {
        if (f[0] == 0 && f[2] <= 2 && f[7] == 0 && (i & 1)) {
            r = pks_tw_access(w, (unsigned)f[1], (unsigned)f[2], (unsigned)f[4], (unsigned)f[5],
                              (unsigned)f[3], f[6], f[8], f[9]);
        } else {
            pks_tw_rec rec;
            rec.type = (uint8_t)f[0];
            rec.cpu = (uint8_t)f[1];
            rec.op = (uint8_t)f[2];
            rec.flags = (uint8_t)f[3];
            rec.size = (uint16_t)f[4];
            rec.cpl = (uint8_t)f[5];
            rec.addr = f[6];
            rec.value = f[7];
            rec.ip = f[8];
            rec.pa = f[9];
            r = pks_tw_records(w, &rec, 1);
        }
        if (r != 0)
            return 69;
        if (i == 777 && pks_tw_flush(w) != 0)
            return 70;
    }
    fclose(in);
    if (pks_tw_memory(w, 0x8000, frame) != -EINVAL)   /* too late: records started */
        return 71;
    return pks_tw_close(w) == 0 ? 0 : 72;
}
"""


@pytest.fixture(scope="module", params=["crc-auto", "crc-portable"])
def writer_program(tmp_path_factory, request):
    """The writer, built twice: with the CPU's CRC-32C instruction where it has
    one, and with the portable table (PKS_TW_PORTABLE_CRC): both must give the
    bytes the Python reader checks."""
    if CC is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("cwriter")
    src = d / "w.c"
    src.write_text(PROGRAM)
    exe = d / "w"
    defs = ["-DPKS_TW_PORTABLE_CRC"] if request.param == "crc-portable" else []
    cmd = [CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", *defs, f"-I{INCLUDE}",
           str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.mark.parametrize("ncpus,flags,chunk,use_fd", [(2, v2.TF_HAS_PA | v2.TF_KERNEL_CAPTURE, 1000, 0),
                                                      (2, 0, 0, 1), (1, v2.TF_HAS_PA, 7, 0)])
def test_c_writer_round_trip(tmp_path, writer_program, ncpus, flags, chunk, use_fd):
    rng = np.random.default_rng(ncpus * 10 + flags + chunk)
    recs, ip, pa = random_records(rng, 5000, ncpus)
    fields = np.stack([recs[k].astype(np.uint64) for k in ("type", "cpu", "op", "flags", "size", "cpl",
                                                           "addr", "value")] + [ip, pa], axis=1)
    (tmp_path / "recs.bin").write_bytes(fields.astype("<u8").tobytes())
    out = tmp_path / "c.pkt2"
    proc = subprocess.run([str(writer_program), str(out), str(tmp_path / "recs.bin"), str(ncpus),
                           str(flags), str(chunk), str(use_fd)], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc
    r, mem, recs2, ip2, pa2 = read_all(out)
    assert r.header.api == 10 and r.header.trace_flags == flags and r.header.ncpus == ncpus
    assert r.cpu_states == ([STATE, STATE] if ncpus == 2 else [])
    assert mem == [(0x7000, bytes(range(256)) * 16)]
    assert recs2.tobytes() == recs.tobytes()
    assert (ip2 == ip).all()
    if flags & v2.TF_HAS_PA:
        assert (pa2 == pa).all()
    else:
        assert pa2 is None
    expect_chunks = -(-5000 // (chunk or v2.DEFAULT_CHUNK_RECORDS))
    if chunk and 778 % chunk:
        expect_chunks += 1                 # pks_tw_flush after record 777
    assert r.totals == (5000, expect_chunks if chunk else 2, 1)


def test_c_writer_bytes_equal_python_writer(tmp_path, writer_program):
    """Same records, same chunking: the C and Python writers give the same chunks."""
    rng = np.random.default_rng(9)
    recs, ip, pa = random_records(rng, 700, 2)
    fields = np.stack([recs[k].astype(np.uint64) for k in ("type", "cpu", "op", "flags", "size", "cpl",
                                                           "addr", "value")] + [ip, pa], axis=1)
    (tmp_path / "recs.bin").write_bytes(fields.astype("<u8").tobytes())
    subprocess.run([str(writer_program), str(tmp_path / "c.pkt2"), str(tmp_path / "recs.bin"), "2",
                    str(v2.TF_HAS_PA), "100", "0"], check=True, timeout=120)
    hdr = v2.TraceHeaderV2(ncpus=2, api=10, trace_flags=v2.TF_HAS_PA, cpu_states=[STATE, STATE])
    with v2.V2Writer(tmp_path / "p.pkt2", hdr, chunk_records=100, codec="none") as w:
        w.write_memory(0x7000, bytes(range(256)) * 16)
        w.write(recs, ip, pa)
    assert (tmp_path / "c.pkt2").read_bytes() == (tmp_path / "p.pkt2").read_bytes()


def test_header_compiles_as_cxx_free_c99_without_warnings(tmp_path):
    if CC is None:
        pytest.skip("no C compiler")
    src = tmp_path / "empty.c"
    src.write_text('#define _POSIX_C_SOURCE 200809L\n#include "pks_trace.h"\nint main(void) { return 0; }\n')
    proc = subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{INCLUDE}",
                           "-c", str(src), "-o", os.devnull], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.dtype(RECORD).itemsize == 24
