"""The recording plugin's buffering under concurrent vCPU threads, without QEMU.

A small C host stands in for QEMU: it exports the plugin API functions the plugin
calls, loads the plugin with dlopen, "translates" one block, then runs one host
thread per vCPU calling the memory callback as MTTCG would, and calls the exit
callback. Every access carries its vCPU and sequence number in its address, so the
test can check that each vCPU's records come out complete and in order, whatever
the interleaving, with tiny buffers (many hand-offs, the pool running dry).
"""
import subprocess

import numpy as np
import pytest

from capture_marks import needs_cc
from pks_emu.capture import build

pytestmark = needs_cc

HOST = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t id_t_;
typedef struct { const char *target_name; struct { int min, cur; } version; int system_emulation;
                 struct { int smp_vcpus, max_vcpus; } system; } info_t;
typedef void (*trans_cb)(id_t_, void *);
typedef void (*mem_cb)(unsigned, uint32_t, uint64_t, void *);
typedef void (*exit_cb)(id_t_, void *);

static trans_cb the_trans; static exit_cb the_exit; static void *exit_ud;
#define NINSN 4
static const uint64_t insn_va[NINSN] = {0xffffffff81000010ull, 0xffffffff81000020ull,
                                         0x401000ull, 0xffffffff81000030ull};
static mem_cb cbs[NINSN]; static void *uds[NINSN]; static int ncb;
static __thread uint64_t last_va;

void qemu_plugin_register_vcpu_tb_trans_cb(id_t_ id, trans_cb cb) { (void)id; the_trans = cb; }
size_t qemu_plugin_tb_n_insns(const void *tb) { (void)tb; return NINSN; }
void *qemu_plugin_tb_get_insn(const void *tb, size_t i) { (void)tb; return (void *)&insn_va[i]; }
uint64_t qemu_plugin_insn_vaddr(const void *insn) { return *(const uint64_t *)insn; }
size_t qemu_plugin_insn_size(const void *insn) { (void)insn; return 3; }
void qemu_plugin_register_vcpu_mem_cb(void *insn, mem_cb cb, int f, int rw, void *ud)
{ (void)insn; (void)f; (void)rw; cbs[ncb] = cb; uds[ncb] = ud; ncb++; }
void qemu_plugin_register_vcpu_insn_exec_cb(void *insn, void *cb, int f, void *ud)
{ (void)insn; (void)cb; (void)f; (void)ud; }
unsigned qemu_plugin_mem_size_shift(uint32_t info) { return info & 15; }
int qemu_plugin_mem_is_store(uint32_t info) { return (info >> 4) & 1; }
void *qemu_plugin_get_hwaddr(uint32_t info, uint64_t va) { (void)info; last_va = va; return &last_va; }
static int rep_mode;   /* no MMIO in the rep movs runs */
int qemu_plugin_hwaddr_is_io(const void *h) { return !rep_mode && (*(const uint64_t *)h & 0xFFF) == 0x008; }
uint64_t qemu_plugin_hwaddr_phys_addr(const void *h) { return *(const uint64_t *)h & 0xFFFFFFF; }
void qemu_plugin_register_atexit_cb(id_t_ id, exit_cb cb, void *ud) { (void)id; the_exit = cb; exit_ud = ud; }

static long per_cpu;
static void *vcpu(void *arg)
{
    unsigned cpu = (unsigned)(uintptr_t)arg;
    if (getenv("HOST_REP")) {   /* rep movsb by instruction 0: load src+i, store dst+i */
        uint64_t src = ((uint64_t)cpu << 32) | 0x100800, dst = ((uint64_t)cpu << 32) | 0x300000;
        for (long i = 0; i < per_cpu; i++) {
            cbs[0](cpu, 0, src + i, uds[0]);
            cbs[0](cpu, 1 << 4, dst + i, uds[0]);
        }
        return NULL;
    }
    for (long i = 0; i < per_cpu; i++) {
        int k = (int)(i % NINSN);
        uint64_t va = ((uint64_t)cpu << 32) | ((uint64_t)i << 3);   /* user half */
        if (i % 3 == 0)
            va |= 0xffff888000000000ull;                            /* kernel half */
        cbs[k](cpu, 3 | (uint32_t)((i & 1) << 4), va, uds[k]);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int ncpu = atoi(argv[2]);
    per_cpu = atol(argv[3]);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    int *ver = dlsym(h, "qemu_plugin_version");
    int (*install)(id_t_, const info_t *, int, char **) = dlsym(h, "qemu_plugin_install");
    if (!ver || *ver != 1 || !install) { fprintf(stderr, "not a v1 plugin\n"); return 1; }
    info_t info = {"x86_64", {1, 1}, 1, {ncpu, ncpu}};
    if (install(1, &info, argc - 4, argv + 4)) { fprintf(stderr, "install failed\n"); return 1; }
    rep_mode = getenv("HOST_REP") != NULL;
    the_trans(1, NULL);
    pthread_t t[64];
    for (int c = 0; c < ncpu; c++) pthread_create(&t[c], NULL, vcpu, (void *)(uintptr_t)c);
    for (int c = 0; c < ncpu; c++) pthread_join(t[c], NULL);
    the_exit(1, exit_ud);
    return 0;
}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tmp_path_factory.mktemp("host")
    (d / "host.c").write_text(HOST)
    cc = build.find_compiler()
    subprocess.run(cc + ["-O1", "-pthread", "-rdynamic", "-o", str(d / "host"), str(d / "host.c"),
                         "-ldl"], check=True)
    return d / "host"


def run_host(host, tmp_path, ncpu, per_cpu, *args):
    out, stats = tmp_path / "t.pkt2", tmp_path / "s.json"
    subprocess.run([str(host), str(build.plugin_path("record")), str(ncpu), str(per_cpu),
                    f"out={out}", f"stats={stats}", *args], check=True, timeout=120)
    import json
    return out, json.loads(stats.read_text())


def decode(path):
    v2 = pytest.importorskip("pks_emu.trace.v2", reason="the trace v2 reader is not built in")
    parts = []
    with v2.open_trace_v2(path) as r:
        for _, recs, ip, pa in r.chunks():
            parts.append((recs.copy(), ip.copy(), pa.copy()))
    recs = np.concatenate([p[0] for p in parts])
    return recs, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


@pytest.mark.parametrize("mode", ["thread=on", "thread=off"])
def test_every_vcpu_complete_and_in_order(host, tmp_path, mode):
    ncpu, per_cpu = 4, 50_000
    out, stats = run_host(host, tmp_path, ncpu, per_cpu, "bufsize=257", "chunk=4096", mode)
    assert stats["records"] == ncpu * per_cpu and stats["write_error"] is None
    recs, ip, pa = decode(out)
    assert len(recs) == ncpu * per_cpu
    low = recs["addr"] & np.uint64(0x3F_FFFF_FFFF)   # below the kernel-half bits
    for c in range(ncpu):
        mine = recs["cpu"] == c
        assert (low[mine] >> np.uint64(32) == c).all()
        seq = (low[mine] & np.uint64(0xFFFF_FFFF)) >> np.uint64(3)
        assert (seq == np.arange(per_cpu, dtype=np.uint64)).all(), f"vCPU {c} out of order"
    assert set(np.unique(recs["cpu"]).tolist()) == set(range(ncpu))
    # classification: the instruction's half decides the CPL; kernel IP + user address = AC
    kern = (ip >> np.uint64(63)) == 1
    assert (recs["cpl"][kern] == 0).all() and (recs["cpl"][~kern] == 3).all()
    user_va = (recs["addr"] >> np.uint64(63)) == 0
    assert (((recs["flags"] & 2) != 0) == (kern & user_va)).all()
    assert (recs["size"] == 8).all()
    seq_all = (low & np.uint64(0xFFFF_FFFF)) >> np.uint64(3)
    assert (recs["op"] == (seq_all & np.uint64(1))).all()      # odd accesses are stores
    # pa: what the host reported, PA_NONE for its "MMIO" addresses
    io = (recs["addr"] & np.uint64(0xFFF)) == 0x008
    assert (pa[io] == np.uint64(0xFFFF_FFFF_FFFF_FFFF)).all()
    assert (pa[~io] == (recs["addr"][~io] & np.uint64(0xFFFFFFF))).all()
    assert stats["pa_none"] == int(io.sum())
    assert stats["kernel_loads"] + stats["kernel_stores"] == int(kern.sum())


def test_limit_keeps_a_prefix_of_each_vcpu(host, tmp_path):
    out, stats = run_host(host, tmp_path, 3, 20_000, "bufsize=100", "limit=12345")
    assert stats["records"] == 12345 and stats["limit_reached"] is True
    assert stats["kernel_loads"] + stats["kernel_stores"] + stats["user_loads"] \
        + stats["user_stores"] == 60_000                        # counting went on
    recs, _, _ = decode(out)
    assert len(recs) == 12345
    low = recs["addr"] & np.uint64(0xFFFF_FFFF)
    for c in range(3):
        seq = low[recs["cpu"] == c] >> np.uint64(3)
        assert (seq == np.arange(len(seq), dtype=np.uint64)).all()


def test_bad_options_fail_install(host, tmp_path):
    res = subprocess.run([str(host), str(build.plugin_path("record")), "1", "1", "out=/x",
                          "fd=3"], capture_output=True, text=True)
    assert res.returncode != 0 and "exactly one of out=PATH and fd=N" in res.stderr
    res = subprocess.run([str(host), str(build.plugin_path("record")), "1", "1",
                          f"out={tmp_path}/t", "limit=lots"], capture_output=True, text=True)
    assert res.returncode != 0 and "bad value limit=lots" in res.stderr


@pytest.mark.parametrize("coalesce", [False, True])
def test_coalesce_rep_movs(host, tmp_path, coalesce):
    import os
    per_cpu = 3 * 4096
    env = dict(os.environ, HOST_REP="1")
    out, stats = tmp_path / "t.pkt2", tmp_path / "s.json"
    subprocess.run([str(host), str(build.plugin_path("record")), "2", str(per_cpu), f"out={out}",
                    f"stats={stats}", "bufsize=1000", f"coalesce={'on' if coalesce else 'off'}"],
                   check=True, timeout=120, env=env)
    import json
    stats = json.loads(stats.read_text())
    assert stats["kernel_loads"] == stats["kernel_stores"] == 2 * per_cpu   # counts per access
    recs, ip, pa = decode(out)
    assert len(recs) == stats["records"]
    assert int(recs["size"].astype(np.int64).sum()) == 2 * 2 * per_cpu   # every byte once
    if not coalesce:
        assert len(recs) == 4 * per_cpu and stats["merged"] == 0
        return
    # src starts mid-page (0x800): its 3 pages of bytes span 4 pages; dst is page-aligned: 3.
    # Buffer hand-offs (every 1000 records) may split a run: at most a few more records.
    assert 2 * (4 + 3) <= len(recs) <= 2 * (4 + 3) + 8
    assert stats["merged"] == 4 * per_cpu - len(recs)
    assert (recs["size"] <= 4096).all()
    first = (recs["addr"] & np.uint64(0xFFF)) + recs["size"].astype(np.uint64)
    assert (first <= 4096).all()                                    # never across a page
    for c in range(2):
        for op, base in ((0, 0x100800), (1, 0x300000)):
            sel = (recs["cpu"] == c) & (recs["op"] == op)
            a = (recs["addr"][sel] & np.uint64(0xFFFFFFFF)).astype(np.int64)
            sz = recs["size"][sel].astype(np.int64)
            assert a[0] == base and (a[1:] == a[:-1] + sz[:-1]).all()  # contiguous, in order
            assert sz.sum() == per_cpu
