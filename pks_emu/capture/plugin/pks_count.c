/*
 * pks_count.c: a QEMU TCG plugin that only counts guest memory accesses,
 * by kernel/user instruction address and load/store (the classification of
 * common.h), and reports the totals at exit.  It is the baseline the
 * recording plugin (pks_capture.c) is timed against.
 *
 * Options (-plugin pks_count.so,OPT=VAL,...):
 *   stats=PATH          write the totals as one JSON object (default: stderr)
 *   fetches=on|off      also count instruction fetches (default off)
 *   start=boot|kernel|user   when counting starts (see common.h)
 */
#include "common.h"

PKS_PLUGIN_EXPORT int qemu_plugin_version = PKS_QEMU_PLUGIN_API;

static pks_vcounts *counts;
static unsigned ncounts;
static const char *stats_path;
static int want_fetches;

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t va, void *udata)
{
    uint64_t ip = (uint64_t)(uintptr_t)udata;
    if (!pks_window(ip) || vcpu >= ncounts)
        return;
    uint64_t *c = counts[vcpu].c;
    int st = qemu_plugin_mem_is_store(info);
    if (pks_ip_is_kernel(ip)) {
        c[st ? C_KSTORE : C_KLOAD]++;
        if (!(va >> 63))
            c[C_KUSER]++;
    } else {
        c[st ? C_USTORE : C_ULOAD]++;
    }
}

static void on_fetch(unsigned int vcpu, void *udata)
{
    uint64_t va = pks_insn_va((uint64_t)(uintptr_t)udata);
    if (!pks_window(va) || vcpu >= ncounts)
        return;
    counts[vcpu].c[pks_ip_is_kernel(va) ? C_KFETCH : C_UFETCH]++;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t va = qemu_plugin_insn_vaddr(insn);
        if (want_fetches)
            qemu_plugin_register_vcpu_insn_exec_cb(
                insn, on_fetch, QEMU_PLUGIN_CB_NO_REGS,
                (void *)(uintptr_t)pks_pack_insn(va, (unsigned)qemu_plugin_insn_size(insn)));
        qemu_plugin_register_vcpu_mem_cb(insn, on_mem, QEMU_PLUGIN_CB_NO_REGS,
                                         QEMU_PLUGIN_MEM_RW, (void *)(uintptr_t)va);
    }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    uint64_t tot[C_NCOUNT];
    pks_sum_counts(counts, ncounts, tot);
    pks_write_stats(stats_path, "pks_count", tot, ncounts, "");
}

PKS_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                          int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        const char *v;
        if (pks_opt(argv[i], "stats", &v)) {
            stats_path = v;
        } else if (pks_opt(argv[i], "fetches", &v)) {
            if (pks_parse_bool(v, &want_fetches)) goto bad;
        } else if (pks_opt(argv[i], "start", &v)) {
            if (pks_parse_start(v)) goto bad;
        } else {
        bad:
            fprintf(stderr, "pks_count: bad option '%s' (expected stats=PATH, fetches=on|off, "
                            "start=boot|kernel|user)\n", argv[i]);
            return -1;
        }
    }
    ncounts = info->system_emulation && info->system.max_vcpus > 0
                  ? (unsigned)info->system.max_vcpus : 1;
    counts = aligned_alloc(64, sizeof(pks_vcounts) * ncounts);
    if (!counts)
        return -1;
    memset(counts, 0, sizeof(pks_vcounts) * ncounts);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
