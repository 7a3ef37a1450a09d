/* pks_trace.h - header-only C99 writer of pks_emu traces, format version 2.
 *
 * The format is specified byte by byte in docs/trace-format.md ("Version 2");
 * pks_emu.trace.v2 reads what this writes. No dependency beyond libc and
 * POSIX write(2)/open(2). Chunks are always written with codec 0 ("none"):
 * readers accept every codec.
 *
 *   pks_tw_config cfg = {0};
 *   cfg.ncpus = 1; cfg.paging_levels = 4; cfg.maxphyaddr = 52;
 *   cfg.features = 0x7f; cfg.max_tasks = 65536; cfg.tlb_entries = 1024;
 *   cfg.pkrs_init = 0x55555554; cfg.api = 10;
 *   cfg.trace_flags = PKS_TF_KERNEL_CAPTURE | PKS_TF_HAS_PA;
 *   pks_tw *w = pks_tw_open_path("boot.pkt2", &cfg);
 *   pks_tw_access(w, cpu, PKS_TW_WRITE, 8, 0, 0, va, rip, pa);
 *   ...
 *   if (pks_tw_close(w) != 0) ...;
 *
 * Not thread-safe (the CRC table is built on first use, too): callers serialize. Every function returns 0 or -errno
 * (-EINVAL for a bad argument); after an error the writer stays failed and
 * pks_tw_close() still frees it (and returns the first error).
 */
#ifndef PKS_TRACE_H
#define PKS_TRACE_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PKS_TW_VERSION 2
#define PKS_TW_HEADER_SIZE 128
#define PKS_TW_FRAME_SIZE 4096
#define PKS_TW_DEFAULT_CHUNK 32768u
#define PKS_TW_MAX_CHUNK (1u << 20)
#define PKS_TW_PA_NONE UINT64_C(0xFFFFFFFFFFFFFFFF)
#define PKS_TW_KEEP_CPL 0xFFu

/* trace_flags */
#define PKS_TF_KERNEL_CAPTURE 0x1u
#define PKS_TF_HAS_PA 0x2u

/* access kinds, record types, access flags (as in format v1) */
#define PKS_TW_READ 0u
#define PKS_TW_WRITE 1u
#define PKS_TW_FETCH 2u
#define PKS_TW_ACCESS 0u
#define PKS_TW_FLAG_IMPLICIT 0x1u
#define PKS_TW_FLAG_AC 0x2u

typedef struct pks_tw_config {
    unsigned ncpus, paging_levels, features, compat, maxphyaddr,
        max_tasks, tlb_entries, pkrs_init, api, trace_flags;
    /* optional: NULL, or ncpus * 8 values cr0, cr3, cr4, efer, rflags, cpl, pkru, pkrs */
    const uint64_t *cpu_states;
    /* records per chunk, 0 = PKS_TW_DEFAULT_CHUNK; at most PKS_TW_MAX_CHUNK */
    unsigned chunk_records;
} pks_tw_config;

typedef struct pks_tw_rec {
    uint8_t type, cpu, op, flags;
    uint16_t size;
    uint8_t cpl;
    uint64_t addr, value, ip, pa;
} pks_tw_rec;

/* per-CPU predictor state of the record encoding */
typedef struct pks_tw_cpu_ {
    uint64_t f0, f1, d0, d1, ip, last_d;
    uint64_t fadv;
    uint8_t cpl, flags;
} pks_tw_cpu_;

typedef struct pks_tw {
    int fd, own_fd, err;
    unsigned ncpus, has_pa, chunk_records;
    uint64_t total, chunks, frames, first_index;
    int records_started;
    unsigned nrec;          /* records in the current chunk */
    unsigned cur_cpu;
    unsigned pa_group;      /* index of the mode byte of the current pa group */
    uint8_t *main, *pa;     /* encoded streams of the current chunk */
    size_t main_len, pa_len, main_cap, pa_cap;
    pks_tw_cpu_ cpu[256];
    uint64_t pa_cache[4096];
} pks_tw;

/* ---- helpers ------------------------------------------------------------- */

static inline uint32_t pks_tw_crc32_sw_(const uint8_t *p, size_t n, uint32_t crc)
{
    static uint32_t table[256];
    static int ready = 0;
    size_t i;
    if (!ready) {
        uint32_t c, k;
        unsigned j;
        for (k = 0; k < 256; k++) {
            c = k;
            for (j = 0; j < 8; j++)
                c = (c & 1) ? 0x82F63B78u ^ (c >> 1) : c >> 1;
            table[k] = c;
        }
        ready = 1;
    }
    for (i = 0; i < n; i++)
        crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PKS_TW_PORTABLE_CRC)
/* The SSE4.2 crc32 instruction computes this very CRC (Castagnoli), 8 bytes a
 * step: a busy writer spends most of its CRC time in the table loop above. */
__attribute__((target("sse4.2"))) static inline uint32_t pks_tw_crc32_hw_(const uint8_t *p,
                                                                          size_t n, uint32_t crc)
{
    uint64_t c = crc, w;
    while (n >= 8) {
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

static inline uint32_t pks_tw_crc32_(const void *data, size_t n, uint32_t crc)
{
    /* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78; the iSCSI/ext4 CRC),
     * register inverted before and after: crc(b, crc(a, 0)) == crc(a + b, 0) */
    const uint8_t *p = (const uint8_t *)data;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PKS_TW_PORTABLE_CRC)
    static int hw = -1;
    if (hw < 0) {
        __builtin_cpu_init();
        hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (hw)
        return ~pks_tw_crc32_hw_(p, n, ~crc);
#endif
    return ~pks_tw_crc32_sw_(p, n, ~crc);
}

static inline void pks_tw_le16_(uint8_t *p, uint64_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void pks_tw_le32_(uint8_t *p, uint64_t v) { pks_tw_le16_(p, v); pks_tw_le16_(p + 2, v >> 16); }
static inline void pks_tw_le64_(uint8_t *p, uint64_t v) { pks_tw_le32_(p, v); pks_tw_le32_(p + 4, v >> 32); }

static inline int pks_tw_write_all_(pks_tw *w, const void *buf, size_t n)
{
    const uint8_t *p = (const uint8_t *)buf;
    if (w->err)
        return w->err;
    while (n) {
        ssize_t k = write(w->fd, p, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            w->err = errno ? -errno : -EIO;
            return w->err;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* one block: tag, payload length, CRC-32C of the payload, reserved 0; then the payload
 * given as two pieces (the second may be empty) */
static inline int pks_tw_block_(pks_tw *w, const char tag[4], const void *a, size_t na,
                         const void *b, size_t nb)
{
    uint8_t h[16];
    uint32_t crc = pks_tw_crc32_(a, na, 0);
    int r;
    if (nb)
        crc = pks_tw_crc32_(b, nb, crc);
    memcpy(h, tag, 4);
    pks_tw_le32_(h + 4, na + nb);
    pks_tw_le32_(h + 8, crc);
    pks_tw_le32_(h + 12, 0);
    if ((r = pks_tw_write_all_(w, h, 16)) != 0)
        return r;
    if ((r = pks_tw_write_all_(w, a, na)) != 0)
        return r;
    return nb ? pks_tw_write_all_(w, b, nb) : 0;
}

static inline uint8_t *pks_tw_varint_(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static inline uint64_t pks_tw_zz_(uint64_t d) { return (d << 1) ^ (uint64_t)(-(int64_t)(d >> 63)); }

static inline unsigned pks_tw_pa_hash_(uint64_t va)
{
    uint64_t vpn = va >> 12;
    return (unsigned)((vpn ^ (vpn >> 12) ^ (vpn >> 24)) & 0xFFF);
}

static inline void pks_tw_reset_(pks_tw *w)
{
    unsigned c;
    memset(w->cpu, 0, sizeof(w->cpu[0]) * w->ncpus);
    for (c = 0; c < w->ncpus; c++)
        w->cpu[c].cpl = PKS_TW_KEEP_CPL;
    memset(w->pa_cache, 0, sizeof(w->pa_cache));
    w->cur_cpu = 0;
    w->nrec = 0;
    w->main_len = w->pa_len = 0;
}

/* ---- API --------------------------------------------------------------------- */

static inline pks_tw *pks_tw_open_fd(int fd, const pks_tw_config *cfg)
{
    pks_tw *w;
    uint8_t h[PKS_TW_HEADER_SIZE];
    unsigned chunk;
    if (!cfg || cfg->ncpus < 1 || cfg->ncpus > 255 || fd < 0) {
        errno = EINVAL;
        return NULL;
    }
    chunk = cfg->chunk_records ? cfg->chunk_records : PKS_TW_DEFAULT_CHUNK;
    if (chunk > PKS_TW_MAX_CHUNK) {
        errno = EINVAL;
        return NULL;
    }
    w = (pks_tw *)calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->fd = fd;
    w->ncpus = cfg->ncpus;
    w->has_pa = (cfg->trace_flags & PKS_TF_HAS_PA) != 0;
    w->chunk_records = chunk;
    /* worst case: 39 bytes a record plus 3 bytes of CPU/CPL/flags changes (main),
     * one mode byte per 4 records plus 10 bytes a record (pa) */
    w->main_cap = (size_t)chunk * 48 + 64;
    w->pa_cap = (size_t)chunk * 11 + 64;
    w->main = (uint8_t *)malloc(w->main_cap);
    w->pa = (uint8_t *)malloc(w->pa_cap);
    if (!w->main || !w->pa) {
        free(w->main);
        free(w->pa);
        free(w);
        errno = ENOMEM;
        return NULL;
    }
    pks_tw_reset_(w);

    memset(h, 0, sizeof(h));
    memcpy(h, "PKSEMUTR", 8);
    pks_tw_le16_(h + 8, PKS_TW_VERSION);
    pks_tw_le16_(h + 10, PKS_TW_HEADER_SIZE);
    pks_tw_le16_(h + 12, 24);
    h[16] = (uint8_t)cfg->paging_levels;
    h[17] = (uint8_t)cfg->ncpus;
    h[18] = (uint8_t)cfg->compat;
    h[19] = (uint8_t)cfg->maxphyaddr;
    pks_tw_le32_(h + 20, cfg->features);
    pks_tw_le32_(h + 24, cfg->max_tasks);
    pks_tw_le32_(h + 28, cfg->tlb_entries);
    pks_tw_le32_(h + 32, cfg->pkrs_init);
    pks_tw_le16_(h + 36, cfg->api);
    pks_tw_le32_(h + 40, cfg->trace_flags);
    pks_tw_le32_(h + 44, cfg->cpu_states ? 1 : 0);
    pks_tw_le32_(h + 48, pks_tw_crc32_(h, 48, 0));
    pks_tw_write_all_(w, h, sizeof(h));
    if (cfg->cpu_states) {
        uint8_t s[255 * 64];
        unsigned i;
        for (i = 0; i < cfg->ncpus * 8; i++)
            pks_tw_le64_(s + 8 * i, cfg->cpu_states[i]);
        pks_tw_block_(w, "PKSS", s, (size_t)cfg->ncpus * 64, NULL, 0);
    }
    return w;
}

static inline pks_tw *pks_tw_open_path(const char *path, const pks_tw_config *cfg)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pks_tw *w;
    int e;
    if (fd < 0)
        return NULL;
    w = pks_tw_open_fd(fd, cfg);
    if (!w) {
        e = errno;
        close(fd);
        errno = e;
        return NULL;
    }
    w->own_fd = 1;
    return w;
}

/* one 4-KiB frame of the initial physical memory; only before the first record */
static inline int pks_tw_memory(pks_tw *w, uint64_t pa, const void *frame)
{
    uint8_t a[8];
    int r;
    if (w->err)
        return w->err;
    if (w->records_started || (pa & 0xFFF) || pa >= (UINT64_C(1) << 52))
        return -EINVAL;
    pks_tw_le64_(a, pa);
    r = pks_tw_block_(w, "PKSM", a, 8, frame, PKS_TW_FRAME_SIZE);
    if (r == 0)
        w->frames++;
    return r;
}

/* ends the current chunk (no-op when it holds no record) */
static inline int pks_tw_flush(pks_tw *w)
{
    uint8_t h[24];
    int r;
    if (w->err)
        return w->err;
    if (w->nrec == 0)
        return 0;
    if (w->has_pa) {
        /* the pa stream follows the main stream in the same buffer space */
        if (w->main_len + w->pa_len > w->main_cap) {
            uint8_t *m = (uint8_t *)realloc(w->main, w->main_len + w->pa_len);
            if (!m)
                return w->err = -ENOMEM;
            w->main = m;
            w->main_cap = w->main_len + w->pa_len;
        }
        memcpy(w->main + w->main_len, w->pa, w->pa_len);
    }
    pks_tw_le64_(h, w->first_index);
    pks_tw_le32_(h + 8, w->nrec);
    pks_tw_le32_(h + 12, w->main_len + w->pa_len);
    pks_tw_le32_(h + 16, w->main_len);
    h[20] = 0;                      /* codec none */
    h[21] = w->has_pa ? 1 : 0;      /* chunk flags: bit 0 pa stream present */
    h[22] = h[23] = 0;
    r = pks_tw_block_(w, "PKSC", h, 24, w->main, w->main_len + w->pa_len);
    w->chunks++;
    w->first_index += w->nrec;
    pks_tw_reset_(w);
    return r;
}

static inline int pks_tw_one_(pks_tw *w, const pks_tw_rec *r)
{
    uint8_t *p;
    pks_tw_cpu_ *c;
    if (r->cpu >= w->ncpus)
        return -EINVAL;
    if (w->has_pa && r->pa != PKS_TW_PA_NONE && r->pa >> 63)
        return -EINVAL;
    p = w->main + w->main_len;
    if (r->cpu != w->cur_cpu) {
        *p++ = 3 | (0 << 2);
        *p++ = r->cpu;
        w->cur_cpu = r->cpu;
    }
    c = &w->cpu[r->cpu];
    if (r->type != PKS_TW_ACCESS || r->op > 2 || r->value != 0 || r->size == 0 || r->size > 4096) {
        *p++ = 3 | (3 << 2);        /* FULL record */
        *p++ = r->type;
        *p++ = r->op;
        *p++ = r->flags;
        *p++ = r->cpl;
        *p++ = 0;                   /* pad */
        p = pks_tw_varint_(p, r->size);
        p = pks_tw_varint_(p, r->addr);
        p = pks_tw_varint_(p, r->value);
        p = pks_tw_varint_(p, r->ip);
    } else {
        unsigned kind = r->op, code, mode;
        uint64_t base0, pred_ip, v1, v2;
        uint8_t *tag;
        int fetch = kind == PKS_TW_FETCH;
        if (r->cpl != c->cpl) {
            *p++ = 3 | (1 << 2);
            *p++ = r->cpl;
            c->cpl = r->cpl;
        }
        if (r->flags != c->flags) {
            *p++ = 3 | (2 << 2);
            *p++ = r->flags;
            c->flags = r->flags;
        }
        tag = p++;
        if (fetch) {
            code = (r->size >= 1 && r->size <= 7) ? r->size - 1u : 7u;
        } else {
            switch (r->size) {
            case 1: code = 0; break;
            case 2: code = 1; break;
            case 4: code = 2; break;
            case 8: code = 3; break;
            case 16: code = 4; break;
            case 32: code = 5; break;
            case 64: code = 6; break;
            default: code = 7;
            }
        }
        if (code == 7)
            p = pks_tw_varint_(p, r->size);
        base0 = fetch ? c->f0 + c->fadv : c->d0;
        if (r->addr == base0) {
            mode = 0;
        } else {
            v1 = pks_tw_zz_(r->addr - base0);
            v2 = pks_tw_zz_(r->addr - (fetch ? c->f1 : c->d1));
            if (v1 <= v2) {
                mode = 1;
                p = pks_tw_varint_(p, v1);
            } else {
                mode = 2;
                p = pks_tw_varint_(p, v2);
            }
        }
        pred_ip = fetch ? r->addr : c->ip;
        *tag = (uint8_t)(kind | code << 2 | mode << 5 | (r->ip != pred_ip ? 0x80 : 0));
        if (r->ip != pred_ip)
            p = pks_tw_varint_(p, pks_tw_zz_(r->ip - pred_ip));
        /* predictor updates */
        if (fetch) {
            if ((r->addr >> 28) != (c->f0 >> 28))
                c->f1 = c->f0;
            c->f0 = r->addr;
            c->fadv = r->size;
        } else {
            if ((r->addr >> 28) != (c->d0 >> 28))
                c->d1 = c->d0;
            c->d0 = r->addr;
        }
        c->ip = r->ip;
    }
    w->main_len = (size_t)(p - w->main);

    if (w->has_pa) {
        unsigned mode;
        unsigned h = pks_tw_pa_hash_(r->addr);
        uint8_t *q;
        if ((w->nrec & 3) == 0) {
            w->pa_group = (unsigned)w->pa_len;
            w->pa[w->pa_len++] = 0;
        }
        q = w->pa + w->pa_len;
        if (r->pa == PKS_TW_PA_NONE) {
            mode = 0;
        } else {
            uint64_t d = r->pa - r->addr;
            if (d == c->last_d) {
                mode = 1;
            } else if (d == w->pa_cache[h]) {
                mode = 2;
            } else {
                mode = 3;
                if ((r->pa & 0xFFF) == (r->addr & 0xFFF))
                    q = pks_tw_varint_(q, (r->pa >> 12) << 1);
                else
                    q = pks_tw_varint_(q, r->pa << 1 | 1);
            }
            c->last_d = d;
            w->pa_cache[h] = d;
        }
        w->pa[w->pa_group] |= (uint8_t)(mode << (2 * (w->nrec & 3)));
        w->pa_len = (size_t)(q - w->pa);
    }
    w->nrec++;
    w->total++;
    return 0;
}

static inline int pks_tw_records(pks_tw *w, const pks_tw_rec *recs, size_t n)
{
    size_t i;
    int r;
    if (w->err)
        return w->err;
    w->records_started = 1;
    for (i = 0; i < n; i++) {
        if ((r = pks_tw_one_(w, &recs[i])) != 0)
            return r;
        if (w->nrec >= w->chunk_records && (r = pks_tw_flush(w)) != 0)
            return r;
    }
    return 0;
}

static inline int pks_tw_access(pks_tw *w, unsigned cpu, unsigned kind, unsigned size, unsigned cpl,
                         unsigned flags, uint64_t va, uint64_t ip, uint64_t pa)
{
    pks_tw_rec r;
    if (kind > 2 || size < 1 || size > 4096 || (cpl > 3 && cpl != PKS_TW_KEEP_CPL) || flags > 255
        || cpu > 255)
        return -EINVAL;
    r.type = PKS_TW_ACCESS;
    r.cpu = (uint8_t)cpu;
    r.op = (uint8_t)kind;
    r.flags = (uint8_t)flags;
    r.size = (uint16_t)size;
    r.cpl = (uint8_t)cpl;
    r.addr = va;
    r.value = 0;
    r.ip = ip;
    r.pa = pa;
    return pks_tw_records(w, &r, 1);
}

/* end marker, flush, close the file if pks_tw_open_path opened it, free */
static inline int pks_tw_close(pks_tw *w)
{
    uint8_t e[24];
    int r;
    if (!w)
        return -EINVAL;
    pks_tw_flush(w);
    pks_tw_le64_(e, w->total);
    pks_tw_le64_(e + 8, w->chunks);
    pks_tw_le64_(e + 16, w->frames);
    pks_tw_block_(w, "PKSE", e, 24, NULL, 0);
    r = w->err;
    if (w->own_fd && close(w->fd) != 0 && r == 0)
        r = -errno;
    free(w->main);
    free(w->pa);
    free(w);
    return r;
}

#endif /* PKS_TRACE_H */
