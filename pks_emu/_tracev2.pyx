# cython: language_level=3
"""The record codec of trace format version 2 (docs/trace-format.md, "Version 2").

A chunk's records are coded as a *main stream* (one tag byte per record,
then varints) and, for traces with physical addresses, a *pa stream* (a mode
byte per group of 4 records, then varints). Predictors (the previous fetch
and data addresses and the IP of each CPU, the previous ``pa - va`` of each
CPU, a 4096-entry cache of ``pa - va`` by virtual page) start from zero in
every chunk, so chunks decode independently.

Both loops run without the GIL. The Python wrappers check the buffers once
(the boundary); the decoder itself never reads outside its input, whatever
the bytes say: the last 64 bytes of the main stream (16 of the pa stream) are
decoded from a zero-padded copy, and a record that ends past the real end is
reported as truncated.

The in-memory record is the v1 24-byte ``RECORD``; this code assumes a
little-endian host (x86, like the traces it models).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize

PA_NONE = 0xFFFF_FFFF_FFFF_FFFF
#: decoded ``ip``/``pa`` arrays and encoded chunks are bounded by this many records
MAX_CHUNK_RECORDS = 1 << 20

ERRORS = {
    TV2_E_TRUNCATED: "the record stream ends inside this record",
    TV2_E_VARINT: "a varint longer than 10 bytes",
    TV2_E_CPU: "CPU index out of range",
    TV2_E_OP: "reserved escape op (expected 0..3)",
    TV2_E_ADDR_MODE: "reserved address mode 3",
    TV2_E_SIZE: "explicit access size out of range (expected 1..4096)",
    TV2_E_TRAILING: "bytes left in the record stream after the last record",
    TV2_E_PA_TRUNCATED: "the physical-address stream ends inside this record",
    TV2_E_PA_TRAILING: "bytes left in the physical-address stream after the last record",
    TV2_E_CPL: "CPL out of range (expected 0..3 or 255)",
    TV2_E_ARG: "bad arguments",
    TV2_E_PA_RANGE: "physical address at or above 2**63 (only PA_NONE may be)",
}

cdef enum:
    FAST_MAIN = 64     # bytes a main-stream step may read (FULL: 39)
    FAST_PA = 16       # bytes a pa-stream step may read (mode byte + 10)
    KEEP_CPL = 0xFF
    OP_SET_CPU = 0
    OP_SET_CPL = 1
    OP_SET_FLAGS = 2
    OP_FULL = 3

cdef extern from *:
    """
    #define PKS_TV2_PA_NONE UINT64_C(0xFFFFFFFFFFFFFFFF)
    """
    uint64_t PA_NONE_C "PKS_TV2_PA_NONE"

cdef extern from *:
    """
    static inline int pks_tv2_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    """
    int _ctz64 "pks_tv2_ctz64"(uint64_t x) noexcept nogil

# Access size by (class, size code): data 1..64 in powers of two, fetch 1..7; code 7 explicit.
cdef uint64_t _SIZE[16]
_SIZE[:] = [1, 2, 4, 8, 16, 32, 64, 0, 1, 2, 3, 4, 5, 6, 7, 0]


cdef size_t tv2_main_bound(size_t n) noexcept nogil:
    # FULL record: 1 + 5 + 3 + 3 * 10 = 39; plus SET_CPU (2); plus padding
    return n * 48 + 64


cdef size_t tv2_pa_bound(size_t n) noexcept nogil:
    return n * 11 + (n + 3) // 4 + 16


cdef inline uint64_t _unzz(uint64_t v) noexcept nogil:
    return (v >> 1) ^ (<uint64_t>0 - (v & 1))


cdef inline uint64_t _zz(uint64_t d) noexcept nogil:
    return (d << 1) ^ (<uint64_t>0 - (d >> 63))


cdef inline const uint8_t* _rd(const uint8_t* p, uint64_t* v, bint* bad) noexcept nogil:
    """LEB128; at most 10 bytes are read (the caller guarantees they exist)."""
    cdef uint64_t b = p[0]
    cdef uint64_t r
    cdef int shift
    if b < 0x80:
        v[0] = b
        return p + 1
    r = b & 0x7F
    shift = 7
    while shift < 70:
        p += 1
        b = p[0]
        r |= (b & 0x7F) << shift
        if b < 0x80:
            v[0] = r
            return p + 1
        shift += 7
    bad[0] = True
    v[0] = r
    return p + 1


cdef inline const uint8_t* _rdf(const uint8_t* p, uint64_t* v, bint* bad) noexcept nogil:
    """LEB128 without a branch on its length up to 8 bytes (reads 8 bytes; the
    caller guarantees 10 exist)."""
    cdef uint64_t x, m
    memcpy(&x, p, 8)
    m = ~x & <uint64_t>0x8080808080808080
    if m == 0:
        return _rd(p, v, bad)
    x &= m ^ (m - 1)
    x = ((x & <uint64_t>0x7f007f007f007f00) >> 1) | (x & <uint64_t>0x007f007f007f007f)
    x = ((x & <uint64_t>0x3fff00003fff0000) >> 2) | (x & <uint64_t>0x00003fff00003fff)
    x = ((x & <uint64_t>0x0fffffff00000000) >> 4) | (x & <uint64_t>0x000000000fffffff)
    v[0] = x
    return p + (_ctz64(m) >> 3) + 1


cdef inline uint8_t* _wr(uint8_t* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>(v | 0x80)
        p += 1
        v >>= 7
    p[0] = <uint8_t>v
    return p + 1


cdef inline unsigned _pa_hash(uint64_t va) noexcept nogil:
    cdef uint64_t vpn = va >> 12
    return <unsigned>((vpn ^ (vpn >> 12) ^ (vpn >> 24)) & 0xFFF)


cdef inline void _reset(tv2_state* st, int ncpus, bint pa) noexcept nogil:
    cdef int c
    memset(st.cpu, 0, sizeof(tv2_cpu) * ncpus)
    for c in range(ncpus):
        st.cpu[c].cpl = KEEP_CPL
        st.cpu[c].word = <uint64_t>c << 8 | <uint64_t>KEEP_CPL << 48
    if pa:
        memset(st.pa_cache, 0, sizeof(st.pa_cache))


cdef inline void _save(tv2_cpu* c, uint64_t f0, uint64_t f1, uint64_t fadv, uint64_t d0,
                       uint64_t d1, uint64_t cip) noexcept nogil:
    c.h0[1] = f0
    c.h1[1] = f1
    c.adv[1] = fadv
    c.h0[0] = d0
    c.h1[0] = d1
    c.ip = cip


cdef int tv2_decode(const uint8_t* main, size_t main_len, const uint8_t* pa_stream,
                    size_t pa_len, uint32_t nrec, int ncpus, uint8_t* out, uint64_t* ip,
                    uint64_t* pa, tv2_state* st, tv2_err* err) noexcept nogil:
    cdef uint8_t tail[2 * FAST_MAIN]
    cdef const uint8_t* p = main
    cdef const uint8_t* end = main + main_len
    cdef const uint8_t* fast_end
    cdef bint in_tail = False
    cdef bint bad = False
    cdef uint32_t i = 0
    cdef unsigned cur = 0
    cdef unsigned t, kind, cls, code, mode
    cdef uint64_t v, a, size, base, ipv
    cdef uint64_t* o
    cdef size_t rem
    cdef int e = TV2_OK
    # The current CPU's predictors live in locals (registers) and go back to
    # st.cpu[cur] when the CPU changes: a loop-carried chain through memory
    # would cost a store-to-load forwarding per record.
    cdef uint64_t f0 = 0, f1 = 0, fadv = 0, d0 = 0, d1 = 0, cip = 0
    cdef uint64_t word
    cdef tv2_cpu* c
    err.record = 0
    err.code = TV2_OK
    if ncpus < 1 or ncpus > 255:
        err.code = TV2_E_ARG
        return TV2_E_ARG
    _reset(st, ncpus, pa_stream != NULL)
    fast_end = end - FAST_MAIN if main_len >= FAST_MAIN else main
    word = st.cpu[0].word
    while i < nrec:
        if p >= fast_end and not in_tail:
            # Finish from a zero-padded copy: every read below stays in bounds.
            rem = <size_t>(end - p)
            memset(tail, 0, sizeof(tail))
            memcpy(tail, p, rem)
            p = tail
            end = tail + rem
            fast_end = tail + sizeof(tail)
            in_tail = True
        t = p[0]
        p += 1
        if (t & 0xE3) == 0x02 and (t & 0x1C) != 0x1C:
            # The common case: a fetch right after the previous one, IP = address.
            size = ((t >> 2) & 7) + 1
            a = f0 + fadv
            o = <uint64_t*>(out + 24 * <size_t>i)
            o[0] = word | <uint64_t>2 << 16 | size << 32
            o[1] = a
            o[2] = 0
            ip[i] = a
            cip = a
            if (a >> 28) != (f0 >> 28):
                f1 = f0
            f0 = a
            fadv = size
            i += 1
            continue
        kind = t & 3
        if kind == 3:
            t >>= 2
            c = &st.cpu[cur]
            if t == OP_SET_CPU:
                if p[0] >= <unsigned>ncpus:
                    e = TV2_E_CPU
                    break
                _save(c, f0, f1, fadv, d0, d1, cip)
                cur = p[0]
                c = &st.cpu[cur]
                f0 = c.h0[1]
                f1 = c.h1[1]
                fadv = c.adv[1]
                d0 = c.h0[0]
                d1 = c.h1[0]
                cip = c.ip
                word = c.word
                p += 1
            elif t == OP_SET_CPL:
                if p[0] > 3 and p[0] != KEEP_CPL:
                    e = TV2_E_CPL
                    break
                c.cpl = p[0]
                c.word = <uint64_t>cur << 8 | <uint64_t>c.flags << 24 | <uint64_t>c.cpl << 48
                word = c.word
                p += 1
            elif t == OP_SET_FLAGS:
                c.flags = p[0]
                c.word = <uint64_t>cur << 8 | <uint64_t>c.flags << 24 | <uint64_t>c.cpl << 48
                word = c.word
                p += 1
            elif t == OP_FULL:
                o = <uint64_t*>(out + 24 * <size_t>i)
                # type, cpu, op, flags, size (below), cpl, pad
                a = (<uint64_t>p[0] | <uint64_t>cur << 8 | <uint64_t>p[1] << 16
                     | <uint64_t>p[2] << 24 | <uint64_t>p[3] << 48 | <uint64_t>p[4] << 56)
                p = _rd(p + 5, &size, &bad)
                if size > 0xFFFF:
                    e = TV2_E_SIZE
                    break
                o[0] = a | size << 32
                p = _rd(p, &v, &bad)
                o[1] = v
                p = _rd(p, &v, &bad)
                o[2] = v
                p = _rd(p, &v, &bad)
                ip[i] = v
                i += 1
            else:
                e = TV2_E_OP
                break
            if bad:
                e = TV2_E_VARINT
                break
            if in_tail and p > end:
                e = TV2_E_TRUNCATED
                break
            continue
        cls = kind >> 1
        code = (t >> 2) & 7
        mode = (t >> 5) & 3
        size = _SIZE[cls * 8 + code]
        if code == 7 or mode == 3:
            if mode == 3:
                e = TV2_E_ADDR_MODE
                break
            p = _rd(p, &size, &bad)
            if size == 0 or size > 4096:
                e = TV2_E_SIZE
                break
        if cls:
            base = f1 if mode == 2 else f0 + fadv
        else:
            base = d1 if mode == 2 else d0
        a = base
        if mode:
            v = p[0]
            if v < 0x80:
                p += 1
            else:
                p = _rdf(p, &v, &bad)
            a = base + _unzz(v)
        ipv = a if cls else cip
        if t & 0x80:
            p = _rd(p, &v, &bad)
            ipv = ipv + _unzz(v)
        # p > end only happens in the zero-padded tail
        if bad or p > end:
            e = TV2_E_VARINT if bad else TV2_E_TRUNCATED
            break
        o = <uint64_t*>(out + 24 * <size_t>i)
        o[0] = word | <uint64_t>kind << 16 | size << 32
        o[1] = a
        o[2] = 0
        ip[i] = ipv
        cip = ipv
        if cls:
            if (a >> 28) != (f0 >> 28):
                f1 = f0
            f0 = a
            fadv = size
        else:
            if (a >> 28) != (d0 >> 28):
                d1 = d0
            d0 = a
        i += 1
    _save(&st.cpu[cur], f0, f1, fadv, d0, d1, cip)
    if e == TV2_OK and p != end:
        e = TV2_E_TRAILING
    if e != TV2_OK:
        err.record = i
        err.code = e
        return e
    if pa_stream != NULL:
        e = _decode_pa(pa_stream, pa_len, nrec, out, pa, st, err)
    return e


cdef int _decode_pa(const uint8_t* src, size_t n, uint32_t nrec, const uint8_t* recs,
                    uint64_t* pa, tv2_state* st, tv2_err* err) noexcept nogil:
    cdef uint8_t tail[2 * FAST_PA]
    cdef const uint8_t* p = src
    cdef const uint8_t* end = src + n
    cdef const uint8_t* fast_end = end - FAST_PA if n >= FAST_PA else src
    cdef bint in_tail = False
    cdef bint bad = False
    cdef uint32_t i
    cdef unsigned modes = 0, mode, h
    cdef uint64_t va, v, d, x
    cdef const uint8_t* r
    cdef size_t rem
    # the current CPU's last delta in a register (see tv2_decode's predictors)
    cdef unsigned cur = 0
    cdef uint64_t last_d = st.cpu[0].last_d
    for i in range(nrec):
        if p >= fast_end and not in_tail:
            rem = <size_t>(end - p)
            memset(tail, 0, sizeof(tail))
            memcpy(tail, p, rem)
            p = tail
            end = tail + rem
            fast_end = tail + sizeof(tail)
            in_tail = True
        if (i & 3) == 0:
            modes = p[0]
            p += 1
        mode = (modes >> (2 * (i & 3))) & 3
        r = recs + 24 * <size_t>i
        va = (<const uint64_t*>(r + 8))[0]
        if r[1] != cur:
            st.cpu[cur].last_d = last_d
            cur = r[1]
            last_d = st.cpu[cur].last_d
        if mode == 0:
            pa[i] = PA_NONE_C
        else:
            h = _pa_hash(va)
            if mode == 1:
                d = last_d
            elif mode == 2:
                d = st.pa_cache[h]
            else:
                p = _rd(p, &v, &bad)
                if v & 1:
                    x = v >> 1
                else:
                    x = ((v >> 1) << 12) | (va & 0xFFF)
                d = x - va
            pa[i] = va + d
            last_d = d
            st.pa_cache[h] = d
        if bad:
            err.record = i
            err.code = TV2_E_VARINT
            return TV2_E_VARINT
        if in_tail and p > end:
            err.record = i
            err.code = TV2_E_PA_TRUNCATED
            return TV2_E_PA_TRUNCATED
    st.cpu[cur].last_d = last_d
    if p != end:
        err.record = nrec
        err.code = TV2_E_PA_TRAILING
        return TV2_E_PA_TRAILING
    return TV2_OK


cdef inline void _enc_pa(uint8_t** qq, uint8_t** gg, uint32_t i, uint64_t addr, uint64_t x,
                         tv2_cpu* c, tv2_state* st) noexcept nogil:
    """One record's entry in the pa stream (a mode byte opens every group of 4)."""
    cdef uint8_t* q = qq[0]
    cdef unsigned pm, h
    cdef uint64_t d
    if (i & 3) == 0:
        gg[0] = q
        q[0] = 0
        q += 1
    if x == PA_NONE_C:
        pm = 0
    else:
        h = _pa_hash(addr)
        d = x - addr
        if d == c.last_d:
            pm = 1
        elif d == st.pa_cache[h]:
            pm = 2
        else:
            pm = 3
            if (x & 0xFFF) == (addr & 0xFFF):
                q = _wr(q, (x >> 12) << 1)
            else:
                q = _wr(q, x << 1 | 1)
        c.last_d = d
        st.pa_cache[h] = d
    gg[0][0] |= <uint8_t>(pm << (2 * (i & 3)))
    qq[0] = q


cdef int tv2_encode(const uint8_t* recs, const uint64_t* ip, const uint64_t* pa, uint32_t n,
                    int ncpus, uint8_t* main_out, size_t* main_len, uint8_t* pa_out,
                    size_t* pa_len, tv2_state* st, tv2_err* err) noexcept nogil:
    cdef uint8_t* p = main_out
    cdef uint8_t* q = pa_out
    cdef uint8_t* tag
    cdef uint8_t* group = pa_out
    cdef const uint8_t* r
    cdef const uint64_t* w
    cdef uint32_t i
    cdef unsigned cur = 0, cpu, typ, kind, flags, cpl, code, mode, size, h, pm, cls
    cdef uint64_t addr, value, base0, v1, v2, pred, x, d, w0
    cdef bint fetch
    cdef tv2_cpu* c
    err.record = 0
    err.code = TV2_OK
    if ncpus < 1 or ncpus > 255:
        err.code = TV2_E_ARG
        return TV2_E_ARG
    _reset(st, ncpus, pa != NULL)
    c = &st.cpu[0]
    for i in range(n):
        r = recs + 24 * <size_t>i
        w = <const uint64_t*>r
        w0 = w[0]
        addr = w[1]
        # Fast path: a fetch of 1..7 bytes on the current CPU right after the
        # previous fetch, IP = address, CPL and flags unchanged: one byte.
        x = w0 ^ (c.word | <uint64_t>2 << 16)
        if ((x & <uint64_t>0xFFFFFFFF) == 0 and (x >> 32) - 1 < 7 and w[2] == 0
                and addr == c.h0[1] + c.adv[1] and ip[i] == addr
                and (pa == NULL or pa[i] >> 63 == 0 or pa[i] == PA_NONE_C)):
            size = <unsigned>(x >> 32)
            p[0] = <uint8_t>(2 | (size - 1) << 2)
            p += 1
            if (addr >> 28) != (c.h0[1] >> 28):
                c.h1[1] = c.h0[1]
            c.h0[1] = addr
            c.adv[1] = size
            c.ip = addr
            if pa != NULL:
                _enc_pa(&q, &group, i, addr, pa[i], c, st)
            continue
        typ = r[0]
        cpu = r[1]
        kind = r[2]
        flags = r[3]
        size = (<const uint16_t*>(r + 4))[0]
        cpl = r[6]
        value = w[2]
        if cpu >= <unsigned>ncpus:
            err.record = i
            err.code = TV2_E_CPU
            return TV2_E_CPU
        if pa != NULL and pa[i] >> 63 and pa[i] != PA_NONE_C:
            err.record = i
            err.code = TV2_E_PA_RANGE
            return TV2_E_PA_RANGE
        if cpu != cur:
            p[0] = 3 | (OP_SET_CPU << 2)
            p[1] = <uint8_t>cpu
            p += 2
            cur = cpu
        c = &st.cpu[cpu]
        if (typ != 0 or kind > 2 or value != 0 or size == 0 or size > 4096 or r[7] != 0
                or (cpl > 3 and cpl != KEEP_CPL)):
            p[0] = 3 | (OP_FULL << 2)
            p[1] = <uint8_t>typ
            p[2] = <uint8_t>kind
            p[3] = <uint8_t>flags
            p[4] = <uint8_t>cpl
            p[5] = r[7]
            p = _wr(p + 6, size)
            p = _wr(p, addr)
            p = _wr(p, value)
            p = _wr(p, ip[i])
        else:
            if cpl != c.cpl:
                p[0] = 3 | (OP_SET_CPL << 2)
                p[1] = <uint8_t>cpl
                p += 2
                c.cpl = <uint8_t>cpl
                c.word = <uint64_t>cpu << 8 | <uint64_t>c.flags << 24 | <uint64_t>c.cpl << 48
            if flags != c.flags:
                p[0] = 3 | (OP_SET_FLAGS << 2)
                p[1] = <uint8_t>flags
                p += 2
                c.flags = <uint8_t>flags
                c.word = <uint64_t>cpu << 8 | <uint64_t>c.flags << 24 | <uint64_t>c.cpl << 48
            tag = p
            p += 1
            fetch = kind == 2
            if fetch:
                code = size - 1 if size <= 7 else 7
            elif (size & (size - 1)) == 0 and size <= 64:
                code = <unsigned>_ctz64(size)
            else:
                code = 7
            if code == 7:
                p = _wr(p, size)
            cls = 1 if fetch else 0
            base0 = c.h0[cls] + c.adv[cls]
            if addr == base0:
                mode = 0
            else:
                v1 = _zz(addr - base0)
                v2 = _zz(addr - c.h1[cls])
                if v1 <= v2:
                    mode = 1
                    p = _wr(p, v1)
                else:
                    mode = 2
                    p = _wr(p, v2)
            pred = addr if fetch else c.ip
            if ip[i] != pred:
                tag[0] = <uint8_t>(kind | code << 2 | mode << 5 | 0x80)
                p = _wr(p, _zz(ip[i] - pred))
            else:
                tag[0] = <uint8_t>(kind | code << 2 | mode << 5)
            if (addr >> 28) != (c.h0[cls] >> 28):
                c.h1[cls] = c.h0[cls]
            c.h0[cls] = addr
            c.adv[cls] = size if fetch else 0
            c.ip = ip[i]
        if pa != NULL:
            _enc_pa(&q, &group, i, addr, pa[i], c, st)
    main_len[0] = <size_t>(p - main_out)
    pa_len[0] = <size_t>(q - pa_out)
    return TV2_OK



# --- CRC-32C (Castagnoli) of blocks -----------------------------------------------------
# With SSE4.2 (the crc32 instruction, 8 bytes a step) when the CPU has it, else
# slicing-by-8 tables. Same convention as zlib.crc32: initial value 0, the
# register inverted before and after, so crc32c(b, crc32c(a)) == crc32c(a + b).
cdef extern from *:
    """
    #include <string.h>
    static uint32_t pks_crc32c_t[8][256];
    static int pks_crc32c_hw_ok = 0;

    static void pks_crc32c_init(void) {
        uint32_t i, k, c;
        for (i = 0; i < 256; i++) {
            c = i;
            for (k = 0; k < 8; k++)
                c = (c & 1) ? 0x82F63B78u ^ (c >> 1) : c >> 1;
            pks_crc32c_t[0][i] = c;
        }
        for (i = 0; i < 256; i++)
            for (k = 1; k < 8; k++)
                pks_crc32c_t[k][i] = (pks_crc32c_t[k - 1][i] >> 8) ^ pks_crc32c_t[0][pks_crc32c_t[k - 1][i] & 0xFF];
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        pks_crc32c_hw_ok = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    #endif
    }

    static uint32_t pks_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) {
        uint64_t w;
        crc = ~crc;
        while (n >= 8) {
            memcpy(&w, p, 8);
            w ^= crc;
            crc = pks_crc32c_t[7][w & 0xFF] ^ pks_crc32c_t[6][(w >> 8) & 0xFF]
                ^ pks_crc32c_t[5][(w >> 16) & 0xFF] ^ pks_crc32c_t[4][(w >> 24) & 0xFF]
                ^ pks_crc32c_t[3][(w >> 32) & 0xFF] ^ pks_crc32c_t[2][(w >> 40) & 0xFF]
                ^ pks_crc32c_t[1][(w >> 48) & 0xFF] ^ pks_crc32c_t[0][w >> 56];
            p += 8;
            n -= 8;
        }
        while (n--)
            crc = pks_crc32c_t[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        return ~crc;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __attribute__((target("sse4.2")))
    static uint32_t pks_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
        uint64_t c = (uint32_t)~crc, w;
        while (n >= 8) {
            memcpy(&w, p, 8);
            c = __builtin_ia32_crc32di(c, w);
            p += 8;
            n -= 8;
        }
        while (n--)
            c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        return ~(uint32_t)c;
    }
    #define PKS_CRC32C_HW(crc, p, n) pks_crc32c_hw((crc), (p), (n))
    #else
    #define PKS_CRC32C_HW(crc, p, n) pks_crc32c_sw((crc), (p), (n))
    #endif

    static uint32_t pks_crc32c(uint32_t crc, const uint8_t *p, size_t n) {
        return pks_crc32c_hw_ok ? PKS_CRC32C_HW(crc, p, n) : pks_crc32c_sw(crc, p, n);
    }
    """
    void pks_crc32c_init() noexcept nogil
    uint32_t pks_crc32c(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil
    uint32_t pks_crc32c_sw(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil
    int pks_crc32c_hw_ok

pks_crc32c_init()
#: True when crc32c() uses the CPU's crc32 instruction (SSE4.2)
CRC32C_HARDWARE = bool(pks_crc32c_hw_ok)


cdef uint32_t tv2_crc32c(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil:
    return pks_crc32c(crc, p, n)


def crc32c(const uint8_t[::1] data, uint32_t crc=0, *, bint software=False):
    """CRC-32C (Castagnoli) of ``data``, continuing ``crc`` (chains like ``zlib.crc32``)."""
    cdef size_t n = data.shape[0]
    cdef const uint8_t* p
    cdef uint32_t r
    if n == 0:
        return crc
    p = &data[0]
    with nogil:
        r = pks_crc32c_sw(crc, p, n) if software else pks_crc32c(crc, p, n)
    return r


# --- Python boundary ----------------------------------------------------------------

cdef class Codec:
    """Reusable encoder/decoder state for a trace with ``ncpus`` CPUs.

    One object per thread: it holds the predictor state and scratch buffers.
    ``decode`` releases the GIL while it runs.
    """
    cdef tv2_state* st
    cdef int ncpus
    cdef bytearray _pa_scratch
    cdef bytearray _main_scratch

    def __cinit__(self):
        self.st = <tv2_state*>malloc(sizeof(tv2_state))
        if self.st == NULL:
            raise MemoryError()
        self._pa_scratch = bytearray()
        self._main_scratch = bytearray()
        self.ncpus = 1

    def __init__(self, int ncpus):
        if not 1 <= ncpus <= 255:
            raise ValueError(f"ncpus {ncpus}: expected 1..255")
        self.ncpus = ncpus

    def __dealloc__(self):
        free(self.st)

    def encode(self, const uint8_t[::1] records, const uint64_t[::1] ip, pa=None):
        """Encode records (the RECORD bytes, 24 per record) -> ``(payload, main_len)``.

        ``payload`` (bytes) is the main stream followed by the pa stream (when
        ``pa`` is given). Raises ``ValueError(message, record_index)`` for a
        record that cannot be coded (CPU out of range, pa >= 2**63).
        """
        cdef Py_ssize_t nb = records.shape[0]
        cdef Py_ssize_t n = nb // 24
        cdef const uint64_t[::1] pav
        cdef const uint64_t* ppa = NULL
        cdef size_t main_len = 0, pa_len = 0
        cdef tv2_err err
        cdef int rc
        cdef uint8_t* po
        cdef uint8_t* pq
        if nb % 24:
            raise ValueError(f"records: {nb} bytes is not a whole number of 24-byte records")
        if ip.shape[0] != n:
            raise ValueError(f"ip has {ip.shape[0]} entries for {n} records")
        if n > MAX_CHUNK_RECORDS:
            raise ValueError(f"{n} records: a chunk holds at most {MAX_CHUNK_RECORDS}")
        if pa is not None:
            pav = pa
            if pav.shape[0] != n:
                raise ValueError(f"pa has {pav.shape[0]} entries for {n} records")
            if n:
                ppa = &pav[0]
        if n == 0:
            return b"", 0
        # Scratch buffers, kept between calls: the bound is ~48 bytes a record,
        # the output ~2.
        if <size_t>len(self._main_scratch) < tv2_main_bound(n) + tv2_pa_bound(n):
            self._main_scratch = bytearray(tv2_main_bound(n) + tv2_pa_bound(n))
        if pa is not None and <size_t>len(self._pa_scratch) < tv2_pa_bound(n):
            self._pa_scratch = bytearray(tv2_pa_bound(n))
        po = <uint8_t*><char*>self._main_scratch
        pq = <uint8_t*><char*>self._pa_scratch if pa is not None else NULL
        with nogil:
            rc = tv2_encode(&records[0], &ip[0], ppa, <uint32_t>n, self.ncpus, po, &main_len,
                            pq, &pa_len, self.st, &err)
            if rc == TV2_OK and pa_len:
                memcpy(po + main_len, pq, pa_len)
        if rc != TV2_OK:
            raise ValueError(ERRORS.get(rc, "error"), err.record)
        return PyBytes_FromStringAndSize(<char*>po, main_len + pa_len), main_len

    def decode(self, const uint8_t[::1] payload, Py_ssize_t main_len, Py_ssize_t nrec,
               bint has_pa, uint8_t[::1] records_out, uint64_t[::1] ip_out, pa_out=None):
        """Decode one chunk's payload into the first ``nrec`` entries of the outputs.

        ``records_out`` is the byte view of a RECORD array (>= 24 * nrec
        bytes); ``pa_out`` (>= nrec entries) is required when ``has_pa``.
        Returns None, or ``(error_code, record_index, message)``.
        """
        cdef uint64_t[::1] pav
        cdef uint64_t* ppa = NULL
        cdef const uint8_t* src = NULL
        cdef const uint8_t* pas = NULL
        cdef Py_ssize_t nb = payload.shape[0]
        cdef tv2_err err
        cdef int rc
        cdef uint8_t* ro
        cdef uint64_t* io
        cdef uint8_t dummy[1]
        if not 0 <= nrec <= MAX_CHUNK_RECORDS:
            raise ValueError(f"nrec {nrec}: expected 0..{MAX_CHUNK_RECORDS}")
        if not 0 <= main_len <= nb:
            raise ValueError(f"main_len {main_len}: expected 0..{nb}")
        if records_out.shape[0] < 24 * nrec or ip_out.shape[0] < nrec:
            raise ValueError("output arrays too small")
        if has_pa:
            if pa_out is None:
                raise ValueError("pa_out is required when has_pa")
            pav = pa_out
            if pav.shape[0] < nrec:
                raise ValueError("output arrays too small")
            if nrec:
                ppa = &pav[0]
        if nrec == 0:
            if nb:
                return (TV2_E_TRAILING, 0, ERRORS[TV2_E_TRAILING])
            return None
        src = &payload[0] if nb else dummy
        pas = src + main_len if has_pa else NULL
        if has_pa and main_len == nb:
            pas = dummy
        ro = &records_out[0]
        io = &ip_out[0]
        with nogil:
            rc = tv2_decode(src, <size_t>main_len, pas, <size_t>(nb - main_len), <uint32_t>nrec,
                            self.ncpus, ro, io, ppa, self.st, &err)
        if rc == TV2_OK:
            return None
        return (rc, err.record, ERRORS.get(rc, "error"))
