/*
 * common.h: what the two pks_emu capture plugins share (option parsing,
 * classification of an access, the recording window, the statistics file).
 *
 * Classification.  QEMU's plugin API does not expose the CPL.  An access is
 * taken as a supervisor access (CPL 0) when the instruction that made it is in
 * the kernel half of the address space (bit 63 of its address set), else as a
 * user access (CPL 3).  A supervisor access to a user-half address (bit 63
 * clear) is kernel code touching user memory, which Linux does only between
 * stac/clac (copy_to/from_user and friends): it gets access flag bit 1 (AC).
 * Firmware and early boot code run at low addresses, so before the kernel
 * reaches its high mapping their accesses count as "user"; the start=kernel
 * and start=user options leave them out.
 */
#ifndef PKS_EMU_CAPTURE_COMMON_H
#define PKS_EMU_CAPTURE_COMMON_H

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qemu_api.h"

#define PKS_CAP_FLAG_AC 0x2u   /* access flag bit 1: EFLAGS.AC was 1 */
#define PKS_CAP_FLAG_IMPLICIT 0x1u   /* access flag bit 0: implicit supervisor access */

static inline int pks_ip_is_kernel(uint64_t ip) { return (int)(ip >> 63); }

/* Counters of one vCPU, alone on its cache line(s): no sharing between vCPU
 * threads under MTTCG. */
enum { C_KLOAD, C_KSTORE, C_ULOAD, C_USTORE, C_KUSER, C_KFETCH, C_UFETCH,
       C_PANONE,   /* recorded accesses without a physical address */
       C_MERGED,   /* accesses merged into the record before them (coalesce=on) */
       C_PACHECKED, C_PAMISMATCH,  /* pa_shortcut=check: compared, disagreeing */
       C_NCOUNT };
typedef struct pks_vcounts {
    uint64_t c[C_NCOUNT];
    uint64_t pad[16 - C_NCOUNT];
} __attribute__((aligned(64))) pks_vcounts;

/* ---- the recording window: start=boot|kernel|user ------------------------ */
enum { START_BOOT, START_KERNEL, START_USER };
static int pks_start_mode = START_BOOT;
static atomic_int pks_window_open = 0;   /* 1 once recording/counting started */
static atomic_int pks_kernel_seen = 0;

/* Called for every access until the window opens; returns whether it is open. */
static inline int pks_window(uint64_t ip)
{
    if (__builtin_expect(atomic_load_explicit(&pks_window_open, memory_order_relaxed), 1))
        return 1;
    int kern = pks_ip_is_kernel(ip);
    if (pks_start_mode == START_BOOT || (pks_start_mode == START_KERNEL && kern)) {
        atomic_store(&pks_window_open, 1);
        return 1;
    }
    if (pks_start_mode == START_USER) {
        if (kern) {
            atomic_store_explicit(&pks_kernel_seen, 1, memory_order_relaxed);
        } else if (atomic_load_explicit(&pks_kernel_seen, memory_order_relaxed)) {
            atomic_store(&pks_window_open, 1);
            return 1;
        }
    }
    return 0;
}

/* ---- options ------------------------------------------------------------- */
static int pks_opt(const char *arg, const char *key, const char **val)
{
    size_t n = strlen(key);
    if (strncmp(arg, key, n) == 0 && arg[n] == '=') {
        *val = arg + n + 1;
        return 1;
    }
    return 0;
}

static __attribute__((unused)) int pks_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

static int pks_parse_bool(const char *s, int *out)
{
    if (!strcmp(s, "on") || !strcmp(s, "1") || !strcmp(s, "true") || !strcmp(s, "yes")) {
        *out = 1;
        return 0;
    }
    if (!strcmp(s, "off") || !strcmp(s, "0") || !strcmp(s, "false") || !strcmp(s, "no")) {
        *out = 0;
        return 0;
    }
    return -1;
}

static int pks_parse_start(const char *s)
{
    if (!strcmp(s, "boot")) pks_start_mode = START_BOOT;
    else if (!strcmp(s, "kernel")) pks_start_mode = START_KERNEL;
    else if (!strcmp(s, "user")) pks_start_mode = START_USER;
    else return -1;
    return 0;
}

/* ---- statistics at exit: one JSON object ---------------------------------- */
static __attribute__((unused)) void pks_sum_counts(const pks_vcounts *v, unsigned n, uint64_t tot[C_NCOUNT])
{
    memset(tot, 0, sizeof(uint64_t) * C_NCOUNT);
    for (unsigned i = 0; i < n; i++)
        for (int k = 0; k < C_NCOUNT; k++)
            tot[k] += v[i].c[k];
}

/* Writes {"plugin": ..., counts..., extra} to path (or stderr when path is
 * NULL).  extra: already formatted `"key": value` pairs, comma-separated, or "". */
static void pks_write_stats(const char *path, const char *plugin, const uint64_t tot[C_NCOUNT],
                            unsigned nvcpus, const char *extra)
{
    FILE *f = path ? fopen(path, "w") : stderr;
    if (!f) {
        fprintf(stderr, "%s: cannot write stats to %s: %s\n", plugin, path, strerror(errno));
        f = stderr;
    }
    fprintf(f, "{\"plugin\": \"%s\", \"vcpus\": %u, "
               "\"kernel_loads\": %llu, \"kernel_stores\": %llu, "
               "\"user_loads\": %llu, \"user_stores\": %llu, "
               "\"kernel_user_accesses\": %llu, "
               "\"kernel_fetches\": %llu, \"user_fetches\": %llu%s%s}\n",
            plugin, nvcpus,
            (unsigned long long)tot[C_KLOAD], (unsigned long long)tot[C_KSTORE],
            (unsigned long long)tot[C_ULOAD], (unsigned long long)tot[C_USTORE],
            (unsigned long long)tot[C_KUSER],
            (unsigned long long)tot[C_KFETCH], (unsigned long long)tot[C_UFETCH],
            extra[0] ? ", " : "", extra);
    if (f != stderr)
        fclose(f);
    else
        fflush(f);
}

/* Instruction address and length packed into one callback userdata word (for
 * fetch callbacks): a canonical address has bits 63..57 equal (LA57; LA48 is
 * stricter), so bits 57..60 can carry the length (x86: 1..15) and bit 63 the
 * sign. */
#define PKS_VA_LOW ((UINT64_C(1) << 57) - 1)
static inline uint64_t pks_pack_insn(uint64_t va, unsigned len)
{
    return (va & PKS_VA_LOW) | ((uint64_t)(len & 0xF) << 57) | (va & (UINT64_C(1) << 63));
}
static inline uint64_t pks_insn_va(uint64_t packed)
{
    return (packed >> 63) ? (packed | ~PKS_VA_LOW) : (packed & PKS_VA_LOW);
}
static inline unsigned pks_insn_len(uint64_t packed) { return (unsigned)((packed >> 57) & 0xF); }

#endif
