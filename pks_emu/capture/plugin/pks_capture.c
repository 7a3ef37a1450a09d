/*
 * pks_capture.c: a QEMU TCG plugin that records every guest data access
 * (and, with fetches=on, every instruction fetch) as trace-v2 records
 * through the C writer of pks_trace.h.
 *
 * A record: type ACCESS, the vCPU index, kind (0 load, 1 store, 2 fetch),
 * size (1 << qemu_plugin_mem_size_shift), the virtual address, the address of
 * the instruction (taken at translation time and passed to the callback as its
 * userdata), the CPL and flags of the classification in common.h, and the
 * guest-physical address (PKS_TW_PA_NONE for MMIO, or where QEMU gives none).
 *
 * Concurrency (MTTCG runs each vCPU on its own host thread): a vCPU appends
 * to its own buffer, touched by no other thread.  A full buffer is queued
 * (FIFO, under a mutex) for the writer thread, which encodes and writes the
 * buffers in queue order, so the records of one vCPU keep their order; the
 * vCPU takes an empty buffer from a fixed pool (waiting when all are queued:
 * memory stays bounded).  thread=off encodes on the vCPU thread instead,
 * still under the mutex.  At exit every partial buffer is queued, the writer
 * drains the queue and the stream is closed with its end marker.
 *
 * Options (-plugin pks_capture.so,OPT=VAL,...):
 *   out=PATH | fd=N     where the v2 stream goes (one of them is required)
 *   stats=PATH          totals at exit as one JSON object (default stderr)
 *   fetches=on|off      record instruction fetches too (default off)
 *   pa=on|off           look up physical addresses (default on)
 *   pa_shortcut=on|off|check   guest-RAM addresses from the host address,
 *                       learned and checked against the API (default on; see
 *                       lookup_pa); check: also ask the API every time and count
 *                       disagreements (pa_checked, pa_mismatches in the totals)
 *   start=boot|kernel|user   when recording starts (see common.h)
 *   limit=N             stop recording after N records (counting goes on)
 *   ram=BYTES,lowmem=BYTES   guest RAM size and the part below 4 GiB (pc
 *                       machine): QEMU reports RAM addresses as offsets in
 *                       its RAM block; these turn them into guest-physical
 *                       addresses (an address past the RAM becomes PA_NONE)
 *   levels=N, maxphyaddr=N, features=N, compat=N, pkrs=N, api=N, ncpus=N
 *                       trace header fields (defaults 5, 40, 0x7f, 0,
 *                       0x55555554, 0, the machine's vCPU count)
 *   chunk=N             records per chunk (writer default when absent)
 *   bufsize=N           records per vCPU buffer (default 8192)
 *   pool=N              buffers for the writer's queue, besides 4 per vCPU
 *                       (default 64: 16 MiB, ~0.1 s of boot)
 *   thread=on|off       encode on a writer thread (default on)
 *   writer_nice=N       raise the writer thread's nice value by N (0..19,
 *                       default 0)
 *   coalesce=on|off     merge runs (default off): an access that continues the
 *                       previous access of the same kind by the same instruction
 *                       (the next bytes, same page: see merge() for why the
 *                       physical frame is the same too)
 *                       extends that record's size instead of adding one, up to
 *                       4096 bytes.  rep movs/stos, which QEMU reports a byte or
 *                       a word at a time, become one record per page and stream;
 *                       the two streams of a rep movs are merged separately.
 *                       Counts stay per access.
 */
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#include "pks_trace.h"

PKS_PLUGIN_EXPORT int qemu_plugin_version = PKS_QEMU_PLUGIN_API;

/* What a vCPU buffers per access: 32 bytes, two to a cache line, 20 % less than
 * pks_tw_rec (whose value field an access does not use).  The buffers move
 * between the vCPU's core and the writer's, so their size is memory traffic. */
typedef struct cap_rec {
    uint64_t addr, ip, pa;
    uint16_t size;
    uint8_t op, flags, cpl, cpu, pad[2];
} cap_rec;

typedef struct buf {
    struct buf *next;
    size_t n;
    cap_rec *recs;
} buf;

typedef struct vstate {
    buf *cur;
    int pa_mode;          /* the physical-address shortcut: 0 learning, 1 on, -1 off */
    uint32_t pa_n;        /* look-ups so far (learning, then the periodic check) */
    uintptr_t pa_base;    /* host address of guest RAM's ram_addr 0 */
    pks_vcounts cnt;
} __attribute__((aligned(64))) vstate;

static vstate *vs;
static unsigned nvcpus;
static size_t bufcap = 8192;   /* 256 KiB: stays in cache between the two threads */
static unsigned pool_bufs = 64; /* buffers for the writer's queue (+3 per vCPU) */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queued_cv = PTHREAD_COND_INITIALIZER;  /* queue non-empty or done */
static pthread_cond_t free_cv = PTHREAD_COND_INITIALIZER;    /* pool non-empty */
static buf *qhead, *qtail, *pool;
static int done;                  /* exit: the writer drains the queue and ends */
static pthread_t writer_thread;
static int use_thread = 1, thread_started;

static pks_tw *writer;
static int write_err;             /* first -errno of the writer */
static atomic_int stopped;        /* limit reached, writer failed or exiting */
static uint64_t limit = UINT64_MAX, queued_records, written_records;

static const char *out_path, *stats_path;
static int out_fd = -1;
static int want_fetches, want_pa = 1, want_coalesce;
static uint64_t ram_size, lowmem_size;
static uint64_t pa_none_count;    /* summed from the vCPUs at exit */
static int pa_shortcut_used;      /* some vCPU used it (at exit) */

/* ---- buffers and the writer -------------------------------------------- */

static int write_recs(const cap_rec *recs, size_t n)
{
    /* pks_tw_records' loop, reading the compact records in place */
    pks_tw_rec r;
    int e;
    if (writer->err)
        return writer->err;
    memset(&r, 0, sizeof(r));
    r.type = PKS_TW_ACCESS;
    writer->records_started = 1;
    for (size_t i = 0; i < n; i++) {
        const cap_rec *c = &recs[i];
        /* the records were written on the vCPU's core: fetch ahead */
        __builtin_prefetch(c + 16, 0, 3);
        r.cpu = c->cpu;
        r.op = c->op;
        r.flags = c->flags;
        r.size = c->size;
        r.cpl = c->cpl;
        r.addr = c->addr;
        r.ip = c->ip;
        r.pa = c->pa;
        if ((e = pks_tw_one_(writer, &r)) != 0)
            return e;
        if (writer->nrec >= writer->chunk_records && (e = pks_tw_flush(writer)) != 0)
            return e;
    }
    return 0;
}

static void write_buf_locked(buf *b)
{
    if (!write_err && b->n) {
        int r = write_recs(b->recs, b->n);
        if (r) {
            write_err = r;
            atomic_store(&stopped, 1);
        } else {
            written_records += b->n;
        }
    }
    b->n = 0;
}

static int writer_nice;           /* added to the writer thread's nice value */

static void *writer_main(void *arg)
{
    (void)arg;
    if (writer_nice) {
        /* Linux: a thread's own nice value.  The vCPU thread is the boot's
         * critical path; when the writer (and a replay reading the pipe) share
         * a core with it, the scheduler then gives it that core. */
        id_t tid = (id_t)syscall(SYS_gettid);
        errno = 0;
        int cur = getpriority(PRIO_PROCESS, tid);
        if (errno == 0)
            (void)setpriority(PRIO_PROCESS, tid, cur + writer_nice);
    }
    pthread_mutex_lock(&lock);
    for (;;) {
        while (!qhead && !done)
            pthread_cond_wait(&queued_cv, &lock);
        if (!qhead)
            break;
        buf *b = qhead;
        qhead = b->next;
        if (!qhead)
            qtail = NULL;
        /* Encode outside the lock: vCPUs keep queueing meanwhile.  Only this
         * thread touches the writer while it runs. */
        pthread_mutex_unlock(&lock);
        int r = write_err ? write_err : write_recs(b->recs, b->n);
        pthread_mutex_lock(&lock);
        if (r) {
            if (!write_err)
                write_err = r;
            atomic_store(&stopped, 1);
        } else {
            written_records += b->n;
        }
        b->n = 0;
        b->next = pool;
        pool = b;
        pthread_cond_signal(&free_cv);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

/* Hands the vCPU's full (or, at exit, partial) buffer to the writer; returns
 * an empty one (NULL only at exit). */
static buf *hand_off(buf *b, int want_new)
{
    pthread_mutex_lock(&lock);
    if (queued_records + b->n > limit) {
        b->n = (size_t)(limit - queued_records);
        atomic_store(&stopped, 1);
    }
    queued_records += b->n;
    buf *nb = NULL;
    if (!use_thread || !thread_started) {
        write_buf_locked(b);
        nb = b;
    } else {
        b->next = NULL;
        if (qtail)
            qtail->next = b;
        else
            qhead = b;
        qtail = b;
        pthread_cond_signal(&queued_cv);
        if (want_new) {
            while (!pool)
                pthread_cond_wait(&free_cv, &lock);
            nb = pool;
            pool = nb->next;
        }
    }
    pthread_mutex_unlock(&lock);
    return nb;
}

/* Whether the access (op, size, va, ip) continues record r: the next bytes of
 * the same page by the same instruction. */
static inline int continues(const cap_rec *r, unsigned op, unsigned size, uint64_t va, uint64_t ip)
{
    return r->ip == ip && r->op == op && r->addr + r->size == va
        && ((va ^ r->addr) >> 12) == 0 && ((va + size - 1) ^ r->addr) >> 12 == 0;
}

/* coalesce=on: folds the access into the vCPU's last record (or, for the other
 * stream of a rep movs, the one before) when it continues it; returns whether
 * it did.  Decided before the physical-address look-up, which a merged access
 * skips: its frame is taken to be the record's.  A remap in between needs a
 * page-table store: on this vCPU that is a record in between (no merge); on
 * another, this vCPU sees it only after a flush of its own, and a shootdown's
 * handler leaves records in between too.  Left: this vCPU's own invlpg or CR3
 * write in a loop body that touches no memory while another vCPU remaps the
 * page (docs/capture.md, "Runs"); such a run keeps its first frame.
 * cpl and flags follow from ip and the page (same half): equal too. */
static inline __attribute__((always_inline)) int merge(unsigned vcpu, unsigned op, unsigned size,
                                                       uint64_t va, uint64_t ip)
{
    buf *b = vs[vcpu].cur;
    if (!b->n)
        return 0;
    cap_rec *last = &b->recs[b->n - 1];
    if (continues(last, op, size, va, ip)) {
        last->size = (uint16_t)(last->size + size);
        vs[vcpu].cnt.c[C_MERGED]++;
        return 1;
    }
    if (b->n >= 2 && last->ip == ip && last->op != op) {
        cap_rec *prev = &b->recs[b->n - 2];
        if (continues(prev, op, size, va, ip)) {
            prev->size = (uint16_t)(prev->size + size);
            vs[vcpu].cnt.c[C_MERGED]++;
            return 1;
        }
    }
    return 0;
}

static inline __attribute__((always_inline)) void put(unsigned vcpu, unsigned op, unsigned size,
                                                      unsigned cpl, unsigned flags, uint64_t va,
                                                      uint64_t ip, uint64_t pa)
{
    buf *b = vs[vcpu].cur;
    cap_rec *r = &b->recs[b->n++];
    /* The line a few records ahead was last read by the writer on the other
     * core: ask for it now, for writing, so the store below does not wait
     * (a prefetch past the buffer's end does not fault). */
    __builtin_prefetch(r + 8, 1, 3);
    r->cpu = (uint8_t)vcpu;
    r->op = (uint8_t)op;
    r->flags = (uint8_t)flags;
    r->size = (uint16_t)size;
    r->cpl = (uint8_t)cpl;
    r->addr = va;
    r->ip = ip;
    r->pa = pa;
    if (b->n == bufcap)
        vs[vcpu].cur = hand_off(b, 1);
}

/* ---- callbacks ----------------------------------------------------------- */

/* Store flag and size of a meminfo value, as the plugin API reports them, kept
 * by value: a boot uses a few dozen distinct values, and two calls into QEMU
 * per access become one load.  Entry: 0 not seen yet, else 0x80 | store << 4 |
 * size shift.  A racing vCPU can only store the same byte. */
#define MI_CACHE (1u << 18)
static _Atomic uint8_t mi_cache[MI_CACHE];

static inline unsigned meminfo_bits(qemu_plugin_meminfo_t info)
{
    unsigned e = info < MI_CACHE ? atomic_load_explicit(&mi_cache[info], memory_order_relaxed) : 0;
    if (__builtin_expect(e == 0, 0)) {
        e = 0x80u | (qemu_plugin_mem_is_store(info) ? 0x10u : 0u)
            | (qemu_plugin_mem_size_shift(info) & 0xFu);
        if (info < MI_CACHE)
            atomic_store_explicit(&mi_cache[info], (uint8_t)e, memory_order_relaxed);
    }
    return e;
}

static inline uint64_t guest_pa(uint64_t raw)
{
    if (raw >> 63)
        return PKS_TW_PA_NONE;
    if (!ram_size)
        return raw;
    if (raw < lowmem_size)
        return raw;
    if (raw < ram_size)
        return raw - lowmem_size + (UINT64_C(1) << 32);
    return PKS_TW_PA_NONE;
}

/* Physical addresses.  qemu_plugin_hwaddr_phys_addr finds the RAM block of
 * the access's host address (under RCU) for every access: with is_io, a fifth
 * of the vCPU's cost per access.  Guest RAM is one RAM block (pc.ram, offset 0,
 * ram= bytes) with one host mapping, so raw = host - base for every host
 * address in it.  The shortcut reads the host address from the record that
 * qemu_plugin_get_hwaddr returns: that layout (QEMU 7.2's plugin-memory.h:
 * is_io, is_store, then a union whose RAM member is the host pointer) is not
 * API, so it is learned and checked against the API.  Each vCPU makes its
 * first PA_LEARN look-ups through the API, which must all agree with the
 * layout (is_io) and on one base, else the shortcut stays off; after that
 * every PA_CHECK-th look-up still goes through the API, and a disagreement
 * stops the recording and fails the capture (pa_shortcut_failed) rather
 * than leave a wrong address in the trace.  pa_shortcut=off: the API only. */
typedef struct hw_view {
    _Bool is_io, is_store;
    void *host;
} hw_view;
#define PA_LEARN 4096u
#define PA_CHECK 1024u
static int want_pa_shortcut = 1;
static atomic_int pa_shortcut_failed;

static void pa_learn(vstate *v, const hw_view *hv, int io, uint64_t raw)
{
    if (v->pa_mode < 0)
        return;
    int ok = hv->is_io == (io != 0);
    if (ok && !io && raw < ram_size) {
        uintptr_t base = (uintptr_t)hv->host - (uintptr_t)raw;
        if (!v->pa_base)
            v->pa_base = base;     /* a host mapping is never at address 0 */
        else
            ok = base == v->pa_base;
    }
    if (!ok) {
        if (v->pa_mode > 0) {
            atomic_store(&pa_shortcut_failed, 1);
            atomic_store(&stopped, 1);
        }
        v->pa_mode = -1;
        return;
    }
    if (v->pa_mode == 0 && ++v->pa_n >= PA_LEARN && v->pa_base)
        v->pa_mode = 1;
}

static inline uint64_t lookup_pa(vstate *v, qemu_plugin_meminfo_t info, uint64_t va)
{
    struct qemu_plugin_hwaddr *h = qemu_plugin_get_hwaddr(info, va);
    if (!h)
        return PKS_TW_PA_NONE;
    const hw_view *hv = (const hw_view *)(const void *)h;
    uint64_t fast = PKS_TW_PA_NONE;
    int have_fast = 0;
    if (v->pa_mode > 0 && (++v->pa_n & (PA_CHECK - 1)) != 0) {
        uintptr_t off = (uintptr_t)hv->host - v->pa_base;
        if (!hv->is_io && off < ram_size) {
            if (want_pa_shortcut == 1)
                return guest_pa(off);
            fast = guest_pa(off);   /* pa_shortcut=check: compare with the API */
            have_fast = 1;
        }
    }
    int io = qemu_plugin_hwaddr_is_io(h);
    uint64_t raw = io ? 0 : qemu_plugin_hwaddr_phys_addr(h);
    uint64_t pa = io ? PKS_TW_PA_NONE : guest_pa(raw);
    if (want_pa_shortcut && ram_size)
        pa_learn(v, hv, io, raw);
    if (have_fast) {
        v->cnt.c[C_PACHECKED]++;
        if (fast != pa)
            v->cnt.c[C_PAMISMATCH]++;
    }
    return pa;
}

static void on_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t va, void *udata)
{
    uint64_t ip = (uint64_t)(uintptr_t)udata;
    if (!pks_window(ip) || vcpu >= nvcpus)
        return;
    uint64_t *c = vs[vcpu].cnt.c;
    unsigned mi = meminfo_bits(info);
    int st = (mi >> 4) & 1;
    int kern = pks_ip_is_kernel(ip);
    unsigned flags = 0;
    if (kern) {
        c[st ? C_KSTORE : C_KLOAD]++;
        if (!(va >> 63)) {
            c[C_KUSER]++;
            flags = PKS_CAP_FLAG_AC;
        }
    } else {
        c[st ? C_USTORE : C_ULOAD]++;
        /* A user instruction cannot reach kernel memory itself (it would
         * fault and not be recorded): such an access is the CPU's own, made
         * while delivering an event (IDT, GDT, TSS, the entry stack), an
         * implicit supervisor access (SDM Vol. 3A §4.6.1). */
        if (va >> 63)
            flags = PKS_CAP_FLAG_IMPLICIT;
    }
    if (atomic_load_explicit(&stopped, memory_order_relaxed))
        return;
    unsigned op = st ? PKS_TW_WRITE : PKS_TW_READ, size = 1u << (mi & 0xFu);
    if (want_coalesce && merge(vcpu, op, size, va, ip))
        return;
    uint64_t pa = PKS_TW_PA_NONE;
    if (want_pa) {
        pa = lookup_pa(&vs[vcpu], info, va);
        if (pa == PKS_TW_PA_NONE)
            c[C_PANONE]++;
    }
    put(vcpu, op, size, kern ? 0 : 3, flags, va, ip, pa);
}

static void on_fetch(unsigned int vcpu, void *udata)
{
    uint64_t packed = (uint64_t)(uintptr_t)udata;
    uint64_t va = pks_insn_va(packed);
    if (!pks_window(va) || vcpu >= nvcpus)
        return;
    int kern = pks_ip_is_kernel(va);
    vs[vcpu].cnt.c[kern ? C_KFETCH : C_UFETCH]++;
    if (atomic_load_explicit(&stopped, memory_order_relaxed))
        return;
    /* never merged: a fetch's record starts at its own ip, so no fetch of the
     * same instruction continues it */
    put(vcpu, PKS_TW_FETCH, pks_insn_len(packed), kern ? 0 : 3, 0, va, va, PKS_TW_PA_NONE);
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
    /* QEMU has stopped the vCPUs: their buffers are ours now. */
    atomic_store(&stopped, 1);
    for (unsigned i = 0; i < nvcpus; i++) {
        if (vs[i].cur && vs[i].cur->n) {
            buf *b = hand_off(vs[i].cur, 0);
            vs[i].cur = b;   /* NULL when the writer thread owns it now */
        }
        pa_none_count += vs[i].cnt.c[C_PANONE];
        if (vs[i].pa_mode > 0)
            pa_shortcut_used = 1;
    }
    if (thread_started) {
        pthread_mutex_lock(&lock);
        done = 1;
        pthread_cond_signal(&queued_cv);
        pthread_mutex_unlock(&lock);
        pthread_join(writer_thread, NULL);
    }
    int rc = pks_tw_close(writer);
    writer = NULL;
    if (rc && !write_err)
        write_err = rc;

    uint64_t tot[C_NCOUNT];
    memset(tot, 0, sizeof(tot));
    for (unsigned i = 0; i < nvcpus; i++)
        for (int k = 0; k < C_NCOUNT; k++)
            tot[k] += vs[i].cnt.c[k];
    /* QEMU's own peak: VmHWM belongs to this address space (getrusage's
     * maxrss, the parent's for its children too, keeps the peak of the
     * process before exec: the forking parent's memory) */
    long maxrss = 0;
    FILE *st = fopen("/proc/self/status", "r");
    if (st) {
        char line[256];
        while (fgets(line, sizeof(line), st))
            if (sscanf(line, "VmHWM: %ld kB", &maxrss) == 1)
                break;
        fclose(st);
    }
    char extra[768];
    snprintf(extra, sizeof(extra),
             "\"records\": %llu, \"records_dropped\": %llu, \"merged\": %llu, \"pa_none\": %llu, "
             "\"qemu_maxrss_kib\": %ld, \"pa_shortcut\": %s, \"pa_shortcut_failed\": %s, "
             "\"pa_checked\": %llu, \"pa_mismatches\": %llu, "
             "\"limit_reached\": %s, \"write_error\": %s%s%s",
             (unsigned long long)written_records,
             (unsigned long long)(tot[C_KLOAD] + tot[C_KSTORE] + tot[C_ULOAD] + tot[C_USTORE]
                                  + tot[C_KFETCH] + tot[C_UFETCH] - written_records
                                  - tot[C_MERGED]),
             (unsigned long long)tot[C_MERGED], (unsigned long long)pa_none_count, maxrss,
             pa_shortcut_used ? "true" : "false",
             atomic_load(&pa_shortcut_failed) ? "true" : "false",
             (unsigned long long)tot[C_PACHECKED], (unsigned long long)tot[C_PAMISMATCH],
             queued_records >= limit ? "true" : "false",
             write_err ? "\"" : "null", write_err ? strerror(-write_err) : "",
             write_err ? "\"" : "");
    pks_write_stats(stats_path, "pks_capture", tot, nvcpus, extra);
}

/* ---- install ------------------------------------------------------------- */

static int parse_uint(const char *key, const char *v, uint64_t max, uint64_t *out)
{
    if (pks_parse_u64(v, out) || *out > max) {
        fprintf(stderr, "pks_capture: bad value %s=%s\n", key, v);
        return -1;
    }
    return 0;
}

PKS_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                          int argc, char **argv)
{
    pks_tw_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.paging_levels = 5;
    cfg.maxphyaddr = 40;
    cfg.features = 0x7f;
    cfg.max_tasks = 65536;
    cfg.tlb_entries = 1024;
    cfg.pkrs_init = 0x55555554;
    cfg.trace_flags = PKS_TF_KERNEL_CAPTURE;
    uint64_t ncpus = info->system_emulation && info->system.max_vcpus > 0
                         ? (uint64_t)info->system.max_vcpus : 1;
    uint64_t u;
    for (int i = 0; i < argc; i++) {
        const char *v, *a = argv[i];
#define UINT_OPT(name, max, dst) \
        else if (pks_opt(a, name, &v)) { if (parse_uint(name, v, max, &u)) return -1; dst = u; }
        if (pks_opt(a, "out", &v)) out_path = v;
        else if (pks_opt(a, "stats", &v)) stats_path = v;
        else if (pks_opt(a, "fd", &v)) { if (parse_uint("fd", v, 1 << 30, &u)) return -1; out_fd = (int)u; }
        else if (pks_opt(a, "fetches", &v)) { if (pks_parse_bool(v, &want_fetches)) goto bad; }
        else if (pks_opt(a, "pa", &v)) { if (pks_parse_bool(v, &want_pa)) goto bad; }
        else if (pks_opt(a, "pa_shortcut", &v)) {
            if (strcmp(v, "check") == 0)
                want_pa_shortcut = 2;
            else if (pks_parse_bool(v, &want_pa_shortcut))
                goto bad;
        }
        else if (pks_opt(a, "thread", &v)) { if (pks_parse_bool(v, &use_thread)) goto bad; }
        else if (pks_opt(a, "coalesce", &v)) { if (pks_parse_bool(v, &want_coalesce)) goto bad; }
        else if (pks_opt(a, "start", &v)) { if (pks_parse_start(v)) goto bad; }
        else if (pks_opt(a, "limit", &v)) { if (parse_uint("limit", v, UINT64_MAX, &limit)) return -1; }
        UINT_OPT("ram", UINT64_MAX, ram_size)
        UINT_OPT("lowmem", UINT64_MAX, lowmem_size)
        UINT_OPT("levels", 5, cfg.paging_levels)
        UINT_OPT("maxphyaddr", 52, cfg.maxphyaddr)
        UINT_OPT("features", 0xffffffffu, cfg.features)
        UINT_OPT("compat", 255, cfg.compat)
        UINT_OPT("pkrs", 0xffffffffu, cfg.pkrs_init)
        UINT_OPT("api", 0xffff, cfg.api)
        UINT_OPT("ncpus", 255, ncpus)
        UINT_OPT("chunk", PKS_TW_MAX_CHUNK, cfg.chunk_records)
        UINT_OPT("bufsize", 1u << 24, bufcap)
        UINT_OPT("pool", 4096, pool_bufs)
        UINT_OPT("writer_nice", 19, writer_nice)
        else {
        bad:
            fprintf(stderr, "pks_capture: bad option '%s' (see the comment at the top of "
                            "pks_capture.c)\n", a);
            return -1;
        }
#undef UINT_OPT
    }
    if ((out_path == NULL) == (out_fd < 0)) {
        fprintf(stderr, "pks_capture: give exactly one of out=PATH and fd=N\n");
        return -1;
    }
    if (ncpus < 1 || ncpus > 255) {
        fprintf(stderr, "pks_capture: %llu vCPUs: the trace holds at most 255\n",
                (unsigned long long)ncpus);
        return -1;
    }
    if (bufcap < 1)
        bufcap = 1;
    if (ram_size && (lowmem_size == 0 || lowmem_size > ram_size))
        lowmem_size = ram_size;
    nvcpus = (unsigned)ncpus;
    cfg.ncpus = nvcpus;
    if (want_pa)
        cfg.trace_flags |= PKS_TF_HAS_PA;

    writer = out_path ? pks_tw_open_path(out_path, &cfg) : pks_tw_open_fd(out_fd, &cfg);
    if (!writer) {
        if (out_path)
            fprintf(stderr, "pks_capture: cannot open the trace %s: %s\n", out_path,
                    strerror(errno));
        else
            fprintf(stderr, "pks_capture: cannot write the trace to fd %d: %s\n", out_fd,
                    strerror(errno));
        return -1;
    }
    vs = aligned_alloc(64, sizeof(vstate) * nvcpus);
    if (!vs)
        return -1;
    memset(vs, 0, sizeof(vstate) * nvcpus);
    /* one buffer per vCPU in use, plus the pool the writer empties: deep
     * enough that the vCPU runs on while the writer shares a core with the
     * replay (with 8 buffers, 3 ms of boot, the vCPU waited and a core idled:
     * docs/capture.md, "Speed") */
    unsigned nbufs = nvcpus + (use_thread ? 3 * nvcpus + pool_bufs : 0);
    for (unsigned i = 0; i < nbufs; i++) {
        buf *b = calloc(1, sizeof(buf));
        if (!b || !(b->recs = malloc(sizeof(cap_rec) * bufcap))) {
            fprintf(stderr, "pks_capture: out of memory for %u buffers of %zu records\n",
                    nbufs, bufcap);
            return -1;
        }
        if (i < nvcpus) {
            vs[i].cur = b;
        } else {
            b->next = pool;
            pool = b;
        }
    }
    if (use_thread) {
        if (pthread_create(&writer_thread, NULL, writer_main, NULL) != 0) {
            fprintf(stderr, "pks_capture: cannot start the writer thread; writing on the vCPUs\n");
            use_thread = 0;
        } else {
            thread_started = 1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
