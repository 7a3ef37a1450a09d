/* Hand-written C loops for calibration of access_batch (issue 11).
 *
 * Each mode runs one tight loop over arrays of linear addresses and kinds,
 * as access_batch does (pa and error-code arrays out), with fewer checks than
 * pks_emu: a direct-mapped 1024-entry 4-KiB TLB, the canonical check, a walk
 * on a miss that checks P and combines U/S, R/W and XD over the levels (no
 * reserved bits, no A/D updates, no paging-structure caches), then the rights
 * and key checks of docs/semantics.md for supervisor pages at CPL 0 with
 * CR0.WP, CR4.SMEP/SMAP/PKE/PKS and EFER.NXE on. Physical memory is one flat
 * array (the fastest representation a C program can choose). The machine
 * state matches pks_emu.bench: supervisor pages under one key at
 * 0xFFFF_C900_0000_0000, PKRS = the Linux default with that key opened.
 *
 *   hit      64 pages, reads and writes at random offsets; every access hits
 *   miss4    256 Ki pages in one fixed random order, 4-level walks; every access misses
 *   miss5    the same with 5-level walks
 *   faults   64 pages, page i under key i % 16, PKRS access-disables 13 of
 *            the 16 keys: about 13/16 of the accesses fault; the loop only
 *            counts them (a faulting translation stays in its TLB)
 *
 *   cc -O3 -o /tmp/batch_loops benchmarks/calibration/batch_loops.c
 *   /tmp/batch_loops MODE [ACCESSES] [REPEAT]
 *
 * It prints "MODE accesses N best S s R M accesses/s faults F misses M".
 * The timed loop is run_loop(): `valgrind --tool=callgrind
 * --collect-atstart=no --toggle-collect=run_loop` counts its instructions
 * alone (pks-emu bench --instructions does this).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { uint64_t tag, leaf; } tlb_t;

static uint64_t *mem;                   /* flat physical memory, 8-byte words */
static uint64_t mem_frames;
static uint64_t next_frame = 1;         /* frame 0 unused */

static uint64_t alloc_table(void) { return (next_frame++) << 12; }
static uint64_t rd(uint64_t pa) { return mem[pa >> 3]; }

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) {              /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define P 1ULL
#define RW 2ULL
#define US 4ULL
#define XD (1ULL << 63)
#define AMASK 0x000FFFFFFFFFF000ULL

static uint64_t cr3;
static int levels;

/* Map one 4-KiB supervisor page va -> pa with key, NX. */
static void map_page(uint64_t va, uint64_t pa, unsigned key) {
    uint64_t table = cr3;
    for (int lvl = levels; lvl > 1; lvl--) {
        uint64_t *e = &mem[(table + (((va >> (12 + 9 * (lvl - 1))) & 511) << 3)) >> 3];
        if (!(*e & P)) *e = alloc_table() | P | RW;
        table = *e & AMASK;
    }
    mem[(table + (((va >> 12) & 511) << 3)) >> 3] = pa | P | RW | XD | ((uint64_t)key << 59);
}

static uint64_t cr0 = 0x80010011ULL, cr4, efer = 0xD00ULL, pkrs;
static unsigned cpl = 0;

static uint64_t misses, faults;

__attribute__((noinline))
void run_loop(const uint64_t *va_arr, const uint8_t *kind_arr, size_t n,
              uint64_t *pa_out, int32_t *err_out, tlb_t *tlb) {
    const int shift = levels == 5 ? 7 : 16;
    for (size_t i = 0; i < n; i++) {
        uint64_t va = va_arr[i];
        unsigned kind = kind_arr[i];
        if ((uint64_t)(((int64_t)(va << shift)) >> shift) != va) { err_out[i] = -2; pa_out[i] = 0; faults++; continue; }
        tlb_t *t = &tlb[(va >> 12) & 1023];
        uint64_t leaf;
        if (t->tag == ((va & ~0xFFFULL) | 1)) leaf = t->leaf;
        else {
            misses++;
            uint64_t table = cr3 & AMASK, e = 0, comb = RW | US, xd = 0; int lvl, ok = 1;
            for (lvl = levels; lvl >= 1; lvl--) {
                e = rd(table + (((va >> (12 + 9 * (lvl - 1))) & 511) << 3));
                if (!(e & P)) { ok = 0; break; }
                comb &= e; xd |= e;
                if (lvl == 1 || (lvl <= 3 && (e & 0x80))) break;
                table = e & AMASK;
            }
            if (!ok) { err_out[i] = (kind == 1) << 1; pa_out[i] = 0; faults++; continue; }
            leaf = (e & AMASK) | (comb & (RW | US)) | (xd & XD) | (e & (0xFULL << 59)) | 1;
            t->tag = (va & ~0xFFFULL) | 1; t->leaf = leaf;
        }
        int user = cpl == 3, up = (leaf >> 2) & 1, w = kind == 1, fault = 0, pk = 0;
        int wp = (cr0 >> 16) & 1;
        if (kind == 2) fault = ((leaf >> 63) && (efer & 0x800)) || (user && !up) || (!user && up && (cr4 >> 20 & 1));
        else {
            uint64_t pkr = up ? 0 : ((cr4 >> 24 & 1) ? (pkrs & 0xFFFFFFFF) : 0);
            unsigned rights = (unsigned)(pkr >> (((leaf >> 59) & 0xF) * 2)) & 3;
            pk = (rights & 1) || (w && (rights & 2) && (user || wp));
            fault = (user && !up) || (w && !((leaf >> 1) & 1) && (user || wp))
                    || (!user && up && (cr4 >> 21 & 1));
        }
        if (fault | pk) {
            faults++;
            err_out[i] = 1 | (w << 1) | (user << 2) | (pk << 5);
            pa_out[i] = 0;
        } else {
            err_out[i] = -1;
            pa_out[i] = (leaf & AMASK) | (va & 0xFFF);
        }
    }
}

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s hit|miss4|miss5|faults [ACCESSES] [REPEAT]\n", argv[0]); return 2; }
    const char *mode = argv[1];
    int miss = !strncmp(mode, "miss", 4), storm = !strcmp(mode, "faults");
    if (!miss && !storm && strcmp(mode, "hit")) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    levels = !strcmp(mode, "miss5") ? 5 : 4;
    size_t pages = miss ? (256u << 10) : 64;
    size_t n = argc > 2 ? strtoull(argv[2], 0, 0) : (miss ? 2 * pages : 4000000);
    int repeat = argc > 3 ? atoi(argv[3]) : 5;
    const uint64_t base = 0xFFFFC90000000000ULL, key = 1;
    if (levels == 5) {} /* the same base: canonical in both */
    cr4 = 0x20 | (1ULL << 7) | (1ULL << 20) | (1ULL << 21) | (1ULL << 22) | (1ULL << 24) | (levels == 5 ? 1ULL << 12 : 0);
    /* PKS_INIT_VALUE 0x55555554 (AD for keys 1..15), key opened */
    pkrs = 0x55555554ULL & ~(3ULL << (2 * key));
    mem_frames = pages / 512 + 64;
    mem = calloc(mem_frames * 512, 8);
    cr3 = alloc_table();
    for (size_t p = 0; p < pages; p++)
        map_page(base + p * 4096, (1ULL << 32) + p * 4096, storm ? (unsigned)(p % 16) : key);
    if (storm) {
        /* 13 of 16 keys access-disabled: keys 3..15 */
        pkrs = 0;
        for (unsigned k = 3; k < 16; k++) pkrs |= 1ULL << (2 * k);
    }
    uint64_t *va = malloc(n * 8); uint8_t *kind = malloc(n);
    uint64_t *perm = malloc(pages * 8);
    for (size_t p = 0; p < pages; p++) perm[p] = p;
    for (size_t p = pages - 1; p > 0; p--) { size_t j = rnd() % (p + 1); uint64_t x = perm[p]; perm[p] = perm[j]; perm[j] = x; }
    for (size_t i = 0; i < n; i++) {
        uint64_t page = miss ? perm[i % pages] : rnd() % pages;
        va[i] = base + page * 4096 + (rnd() % 512) * 8;
        kind[i] = rnd() & 1;
    }
    uint64_t *pa = malloc(n * 8); int32_t *err = malloc(n * 4);
    memset(pa, 0, n * 8); memset(err, 0, n * 4);
    tlb_t *tlb = calloc(1024, sizeof(tlb_t));
    double best = 1e30;
    uint64_t m0 = 0, f0 = 0;
    for (int r = 0; r < repeat; r++) {
        memset(tlb, 0, 1024 * sizeof(tlb_t));
        if (!miss) run_loop(va, kind, n < 4096 ? n : 4096, pa, err, tlb);   /* warm the TLB */
        misses = faults = 0;
        double t0 = now();
        run_loop(va, kind, n, pa, err, tlb);
        double s = now() - t0;
        if (s < best) best = s;
        m0 = misses; f0 = faults;
    }
    printf("%s accesses %zu best %.6f s %.2f M accesses/s faults %llu misses %llu\n", mode, n, best,
           n / best / 1e6, (unsigned long long)f0, (unsigned long long)m0);
    return 0;
}
