/* A tight, hand-written C replay loop, for calibration only.
 *
 * It reads a pks_emu native trace (docs/trace-format.md) and does what the
 * compiled replay does for ACCESS and WRMSR(IA32_PKRS) records on one CPU:
 * canonical check, direct-mapped 4-KiB TLB, 4-level walk on a miss (P and
 * the U/S, R/W, XD combination; no reserved-bit checks, no A/D updates), the
 * rights check and the key check, counting faults. It is deliberately
 * simpler than pks_emu, so its speed is an upper bound for the same work.
 *
 *   cc -O3 -o /tmp/replay_hit benchmarks/calibration/replay_hit.c
 *   /tmp/replay_hit TRACE.pkt
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { uint8_t type, cpu, op, flags; uint16_t size; uint8_t cpl, pad; uint64_t addr, value; } rec_t;
typedef struct { uint64_t tag, leaf; } tlb_t;

static uint64_t *frame_pa; static uint8_t **frame_data; static size_t nframes;

static uint64_t rd(uint64_t pa) {            /* binary search in the sorted memory image */
    size_t lo = 0, hi = nframes; uint64_t f = pa & ~0xFFFULL, v = 0;
    while (lo < hi) { size_t m = (lo + hi) / 2; if (frame_pa[m] < f) lo = m + 1; else hi = m; }
    if (lo < nframes && frame_pa[lo] == f) memcpy(&v, frame_data[lo] + (pa & 0xFF8), 8);
    return v;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s TRACE\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb"); if (!f) { perror(argv[1]); return 2; }
    uint8_t h[128]; if (fread(h, 1, 128, f) != 128 || memcmp(h, "PKSEMUTR", 8)) { fprintf(stderr, "bad trace\n"); return 2; }
    uint64_t count, rec_off, mem_off, frames, cpu_off, st[8];
    memcpy(&count, h + 24, 8); memcpy(&rec_off, h + 32, 8); memcpy(&mem_off, h + 40, 8);
    memcpy(&frames, h + 48, 8); memcpy(&cpu_off, h + 56, 8);
    fseek(f, (long)cpu_off, SEEK_SET); if (fread(st, 8, 8, f) != 8) return 2;
    uint64_t cr0 = st[0], cr3 = st[1], cr4 = st[2], efer = st[3], pkrs = st[7];
    uint32_t cpl = (uint32_t)st[5];
    nframes = frames; frame_pa = malloc(frames * 8); frame_data = malloc(frames * sizeof(void *));
    fseek(f, (long)mem_off, SEEK_SET);
    for (size_t i = 0; i < frames; i++) {       /* pks_emu writes frames sorted by address */
        frame_data[i] = malloc(4096);
        if (fread(&frame_pa[i], 8, 1, f) != 1 || fread(frame_data[i], 1, 4096, f) != 4096) return 2;
    }
    rec_t *recs = malloc(count * sizeof(rec_t));
    fseek(f, (long)rec_off, SEEK_SET);
    if (fread(recs, sizeof(rec_t), count, f) != count) return 2;
    fclose(f);

    tlb_t *tlb = calloc(1024, sizeof(tlb_t));
    uint64_t faults = 0, accesses = 0, misses = 0, amask = 0x000FFFFFFFFFF000ULL;
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t i = 0; i < count; i++) {
        const rec_t *r = &recs[i];
        if (r->type == 1) { if (r->addr == 0x6E1) pkrs = r->value; continue; }
        if (r->type != 0) continue;
        accesses++;
        if (r->cpl != 0xFF) cpl = r->cpl;
        uint64_t va = r->addr;
        if ((uint64_t)(((int64_t)(va << 16)) >> 16) != va) { faults++; continue; }
        tlb_t *t = &tlb[(va >> 12) & 1023];
        uint64_t leaf;
        if (t->tag == ((va & ~0xFFFULL) | 1)) leaf = t->leaf;
        else {
            misses++;
            uint64_t table = cr3 & amask, e = 0, comb = 6, xd = 0; int lvl, ok = 1;
            for (lvl = 4; lvl >= 1; lvl--) {
                e = rd(table + (((va >> (12 + 9 * (lvl - 1))) & 511) << 3));
                if (!(e & 1)) { ok = 0; break; }
                comb &= e; xd |= e;
                if (lvl == 1 || (lvl <= 3 && (e & 0x80))) break;
                table = e & amask;
            }
            if (!ok) { faults++; continue; }
            leaf = (e & amask) | (comb & 6) | (xd & (1ULL << 63)) | (e & (0xFULL << 59)) | 1;
            t->tag = (va & ~0xFFFULL) | 1; t->leaf = leaf;
        }
        int user = cpl == 3 && !(r->flags & 1), up = (leaf >> 2) & 1, w = r->op == 1, fault = 0, pk = 0;
        int wp = (cr0 >> 16) & 1;
        if (r->op == 2) fault = ((leaf >> 63) && (efer & 0x800)) || (user && !up) || (!user && up && (cr4 >> 20 & 1));
        else {
            uint64_t pkr = up ? ((cr4 >> 22 & 1) ? 0 : 0) : ((cr4 >> 24 & 1) ? (pkrs & 0xFFFFFFFF) : 0);
            unsigned rights = (unsigned)(pkr >> (((leaf >> 59) & 0xF) * 2)) & 3;
            pk = (rights & 1) || (w && (rights & 2) && (user || wp));
            fault = (user && !up) || (w && !((leaf >> 1) & 1) && (user || wp));
        }
        faults += (fault | pk);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("records %llu accesses %llu misses %llu faults %llu  %.3f s  %.1f M accesses/s\n",
           (unsigned long long)count, (unsigned long long)accesses, (unsigned long long)misses,
           (unsigned long long)faults, s, accesses / s / 1e6);
    return 0;
}
