# cython: language_level=3
"""The compiled scanner behind ``pks_emu.lackey``: Valgrind lackey text to arrays.

One call scans a block of complete lines (the block must end with a newline)
without the GIL and stops when the block is done, when the output arrays are
full, or, on request, right after a malformed line, so that Python can build
the error message or keep an example. Python owns the file, the buffers and
the arrays; see ``pks_emu/lackey.py`` for the rules of the format.

Line syntax (lackey's ``lk_main.c`` prints ``"%s %08lx,%lu\\n"`` with the
prefixes ``"I "``, ``" L"``, ``" S"``, ``" M"``)::

    I  0401ab70,3        instruction fetch
     L 04a1ade0,8        load
     S 1fff000778,8      store
     M 04033e06,1        modify: a load then a store, two records
    SB 04a1ade0          superblock (--trace-superblocks=yes): skipped
    ==7525== ...         valgrind's own messages: skipped
"""
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memchr

import numpy as np

# Status of a scan call.
ST_DONE = 0   # every line of the block was consumed
ST_FULL = 1   # stopped before a record that does not fit the output arrays
ST_BAD = 2    # stopped right after a malformed line (only when asked to)
ST_NOMEM = 3  # the page set could not grow

# Why a line is malformed (index into WHY in lackey.py).
WHY_PREFIX = 1      # not 'I  ', ' L ', ' S ', ' M ', 'SB ', '==' or empty
WHY_ADDR = 2        # no hex digits, or more than 16
WHY_COMMA = 3       # the hex digits are not followed by ','
WHY_SIZE = 4        # no decimal digits after ','
WHY_SIZE_RANGE = 5  # size 0 or > 65535
WHY_TRAILING = 6    # something other than the end of the line after the size
WHY_SB = 7          # 'SB ' not followed by 1-16 hex digits and the end of the line

cdef enum:
    _ST_DONE = 0
    _ST_FULL = 1
    _ST_BAD = 2
    _ST_NOMEM = 3

cdef enum:
    _WHY_PREFIX = 1
    _WHY_ADDR = 2
    _WHY_COMMA = 3
    _WHY_SIZE = 4
    _WHY_SIZE_RANGE = 5
    _WHY_TRAILING = 6
    _WHY_SB = 7

# ASCII codes of the characters the syntax uses.
cdef enum:
    C_NL = 10
    C_CR = 13
    C_SP = 32
    C_COMMA = 44
    C_0 = 48
    C_EQ = 61
    C_B = 66
    C_I = 73
    C_L = 76
    C_M = 77
    C_S = 83

# Record kinds: the values of pks_emu.constants.AccessKind (READ, WRITE, FETCH).
cdef enum:
    K_READ = 0
    K_WRITE = 1
    K_FETCH = 2
    K_MODIFY = 3   # scanner-internal: emitted as READ then WRITE

# Hex digit value, 0xFF for anything else; lackey prints lowercase, uppercase
# costs nothing to accept.
cdef uint8_t _HEX[256]
cdef int _c
for _c in range(256):
    _HEX[_c] = 0xFF
for _c in range(10):
    _HEX[C_0 + _c] = _c
for _c in range(6):
    _HEX[ord('a') + _c] = 10 + _c
    _HEX[ord('A') + _c] = 10 + _c


cdef struct scan_out:
    Py_ssize_t pos
    Py_ssize_t n
    int64_t lines
    int64_t skipped
    int64_t bad
    Py_ssize_t bad_start
    Py_ssize_t bad_end
    int why
    uint64_t last_ip
    Py_ssize_t big       # first record (index in the output) larger than 4096 bytes, or -1


# The replay needs every page a record touches mapped before the record runs;
# finding the new ones here, during the scan, costs a hash probe per page
# change instead of sorting every chunk's addresses.
cdef struct page_set:
    uint64_t* slots      # page + 1; 0 is a free slot
    Py_ssize_t cap       # a power of two
    Py_ssize_t used
    uint64_t* fresh      # pages seen for the first time since the last take()
    Py_ssize_t nfresh
    Py_ssize_t fresh_cap
    uint64_t recent0     # the last two pages looked up (code and data alternate)
    uint64_t recent1


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= <uint64_t>0xff51afd7ed558ccd
    x ^= x >> 33
    return x


cdef int _ps_grow(page_set* s) noexcept nogil:
    cdef Py_ssize_t ncap = s.cap * 2
    cdef uint64_t* ns = <uint64_t*>calloc(ncap, sizeof(uint64_t))
    cdef Py_ssize_t i, j
    cdef uint64_t k
    if ns == NULL:
        return -1
    for i in range(s.cap):
        k = s.slots[i]
        if k:
            j = <Py_ssize_t>(_mix(k) & <uint64_t>(ncap - 1))
            while ns[j]:
                j = (j + 1) & (ncap - 1)
            ns[j] = k
    free(s.slots)
    s.slots = ns
    s.cap = ncap
    return 0


cdef inline int _ps_add(page_set* s, uint64_t page) noexcept nogil:
    """Remember ``page``; 0, or -1 when out of memory."""
    cdef uint64_t k
    cdef Py_ssize_t j
    cdef uint64_t* nf
    if page == s.recent0 or page == s.recent1:
        return 0
    s.recent1 = s.recent0
    s.recent0 = page
    k = page + 1
    j = <Py_ssize_t>(_mix(k) & <uint64_t>(s.cap - 1))
    while s.slots[j]:
        if s.slots[j] == k:
            return 0
        j = (j + 1) & (s.cap - 1)
    s.slots[j] = k
    s.used += 1
    if s.nfresh == s.fresh_cap:
        nf = <uint64_t*>realloc(s.fresh, 2 * s.fresh_cap * sizeof(uint64_t))
        if nf == NULL:
            return -1
        s.fresh = nf
        s.fresh_cap *= 2
    s.fresh[s.nfresh] = page
    s.nfresh += 1
    if 2 * s.used > s.cap:
        return _ps_grow(s)
    return 0


cdef class PageSet:
    """The pages (va >> 12) that records have touched so far, for the
    replay's map-on-first-touch; :meth:`take` returns those first touched
    since the previous call."""
    cdef page_set s

    def __cinit__(self):
        self.s.cap = 1024
        self.s.slots = <uint64_t*>calloc(self.s.cap, sizeof(uint64_t))
        self.s.fresh_cap = 1024
        self.s.fresh = <uint64_t*>calloc(self.s.fresh_cap, sizeof(uint64_t))
        # No page number reaches 2**52, so these match nothing at first.
        self.s.recent0 = <uint64_t>-1
        self.s.recent1 = <uint64_t>-1
        if self.s.slots == NULL or self.s.fresh == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.s.slots)
        free(self.s.fresh)

    def __len__(self):
        return self.s.used

    def take(self):
        """Sorted page numbers first touched since the last call."""
        out = np.empty(self.s.nfresh, dtype=np.uint64)
        cdef uint64_t[::1] o = out
        cdef Py_ssize_t i
        for i in range(self.s.nfresh):
            o[i] = self.s.fresh[i]
        self.s.nfresh = 0
        out.sort()
        return out


cdef inline const uint8_t* _eol(const uint8_t* q) noexcept nogil:
    """The start of the next line if ``q`` is at the end of this one (LF or CRLF), else NULL."""
    if q[0] == C_NL:
        return q + 1
    if q[0] == C_CR and q[1] == C_NL:
        return q + 2
    return NULL


cdef inline int _record(const uint8_t* q, const uint8_t* end, uint64_t* addr, uint64_t* size,
                        const uint8_t** nxt) noexcept nogil:
    """Parse ``ADDR,SIZE`` and the line end at ``q``; 0 or a WHY code.

    Safe without bounds: every line of the block ends with '\\n', which
    stops each loop and fails each character test; the eight bytes read at
    once stay before ``end``, the end of the block.
    """
    cdef const uint8_t* q0 = q
    cdef uint64_t a = 0
    cdef uint64_t s = 0
    cdef uint8_t h
    cdef uint8_t h0, h1, h2, h3, h4, h5, h6, h7
    cdef unsigned int d
    # Lackey zero-pads addresses to eight digits: take those without a
    # branch per digit, then any further digits one at a time.
    if q + 8 <= end:
        h0 = _HEX[q[0]]
        h1 = _HEX[q[1]]
        h2 = _HEX[q[2]]
        h3 = _HEX[q[3]]
        h4 = _HEX[q[4]]
        h5 = _HEX[q[5]]
        h6 = _HEX[q[6]]
        h7 = _HEX[q[7]]
        if (h0 | h1 | h2 | h3 | h4 | h5 | h6 | h7) < 16:
            a = ((<uint64_t>h0 << 28) | (<uint64_t>h1 << 24) | (<uint64_t>h2 << 20)
                 | (<uint64_t>h3 << 16) | (<uint64_t>h4 << 12) | (<uint64_t>h5 << 8)
                 | (<uint64_t>h6 << 4) | <uint64_t>h7)
            q += 8
    h = _HEX[q[0]]
    while h < 16:
        a = (a << 4) | h
        q += 1
        h = _HEX[q[0]]
    # More than 16 digits would not fit a 64-bit address (and has wrapped).
    if q == q0 or q - q0 > 16:
        return _WHY_ADDR
    if q[0] != C_COMMA:
        return _WHY_COMMA
    q += 1
    q0 = q
    d = <unsigned int>q[0] - C_0
    while d < 10:
        s = s * 10 + d
        q += 1
        d = <unsigned int>q[0] - C_0
    if q == q0:
        return _WHY_SIZE
    # lackey never prints size 0 (MAX_DSIZE is 512): a 0 means a damaged line.
    # Ten digits at most, so that s cannot have wrapped before the test.
    if q - q0 > 10 or s == 0 or s > 65535:
        return _WHY_SIZE_RANGE
    nxt[0] = _eol(q)
    if nxt[0] == NULL:
        return _WHY_TRAILING
    addr[0] = a
    size[0] = s
    return 0


cdef inline void _put_rec(uint8_t* rec, Py_ssize_t i, uint8_t rtype, uint8_t cpl, uint8_t k,
                          uint64_t addr, uint64_t size) noexcept nogil:
    """Record ``i`` of a native RECORD array (pks_emu.trace.format): an access on CPU 0."""
    cdef uint8_t* r = rec + 24 * i
    r[0] = rtype
    r[1] = 0
    r[2] = k
    r[3] = 0
    (<uint16_t*>(r + 4))[0] = <uint16_t>size
    r[6] = cpl
    r[7] = 0
    (<uint64_t*>(r + 8))[0] = addr
    (<uint64_t*>(r + 16))[0] = 0


cdef int _scan(const uint8_t* buf, Py_ssize_t pos, Py_ssize_t limit,
               uint64_t* va, uint16_t* sz, uint8_t* kd, uint64_t* ipo, Py_ssize_t n,
               Py_ssize_t cap, bint stop_on_bad, scan_out* o,
               uint8_t* rec=NULL, uint8_t rtype=0, uint8_t cpl=0,
               page_set* pages=NULL) noexcept nogil:
    cdef const uint8_t* p = buf + pos
    cdef const uint8_t* end = buf + limit
    cdef const uint8_t* q
    cdef const uint8_t* nxt
    cdef uint64_t addr = 0
    cdef uint64_t size = 0
    cdef uint8_t c, c1
    cdef int k, why
    cdef int status = _ST_DONE
    cdef int64_t lines = 0
    cdef int64_t skipped = 0
    cdef int64_t bad = 0
    # The instruction pointer: the address of the latest 'I' line.
    cdef uint64_t cur_ip = o.last_ip
    while p < end:
        c = p[0]
        why = 0
        k = -1
        # Each test reads p[i + 1] only after p[i] proved not to be '\n'.
        if c == C_I:
            if p[1] == C_SP and p[2] == C_SP:
                k = K_FETCH
            else:
                why = _WHY_PREFIX
        elif c == C_SP:
            c1 = p[1]
            if c1 == C_L:
                k = K_READ
            elif c1 == C_S:
                k = K_WRITE
            elif c1 == C_M:
                k = K_MODIFY
            if k < 0 or p[2] != C_SP:
                k = -1
                why = _WHY_PREFIX
        elif c == C_EQ and p[1] == C_EQ:
            q = <const uint8_t*>memchr(p, C_NL, end - p)
            p = q + 1
            lines += 1
            skipped += 1
            continue
        elif c == C_NL:
            p += 1
            lines += 1
            skipped += 1
            continue
        elif c == C_CR and p[1] == C_NL:
            p += 2
            lines += 1
            skipped += 1
            continue
        elif c == C_S and p[1] == C_B and p[2] == C_SP:
            q = p + 3
            while _HEX[q[0]] < 16:
                q += 1
            nxt = _eol(q)
            if q == p + 3 or q - (p + 3) > 16 or nxt == NULL:
                why = _WHY_SB
            else:
                p = nxt
                lines += 1
                skipped += 1
                continue
        else:
            why = _WHY_PREFIX

        if k >= 0:
            why = _record(p + 3, end, &addr, &size, &nxt)
            if why == 0:
                if n + (2 if k == K_MODIFY else 1) > cap:
                    status = _ST_FULL
                    break
                if k == K_FETCH:
                    cur_ip = addr
                if ipo != NULL:
                    ipo[n] = cur_ip
                    if k == K_MODIFY:
                        ipo[n + 1] = cur_ip
                if pages != NULL:
                    if _ps_add(pages, addr >> 12) or _ps_add(pages, (addr + size - 1) >> 12):
                        status = _ST_NOMEM
                        break
                if size > 4096 and o.big < 0:
                    o.big = n
                if rec != NULL:
                    if k == K_MODIFY:
                        _put_rec(rec, n, rtype, cpl, K_READ, addr, size)
                        _put_rec(rec, n + 1, rtype, cpl, K_WRITE, addr, size)
                        n += 2
                    else:
                        _put_rec(rec, n, rtype, cpl, <uint8_t>k, addr, size)
                        n += 1
                elif k == K_MODIFY:
                    # lackey merges a load and a store to the same location
                    # into one M line; the access order is load, then store.
                    va[n] = addr
                    sz[n] = <uint16_t>size
                    kd[n] = K_READ
                    n += 1
                    va[n] = addr
                    sz[n] = <uint16_t>size
                    kd[n] = K_WRITE
                    n += 1
                else:
                    va[n] = addr
                    sz[n] = <uint16_t>size
                    kd[n] = <uint8_t>k
                    n += 1
                p = nxt
                lines += 1
                continue

        # A malformed line: find its end (the block ends with '\n', so memchr finds one).
        q = <const uint8_t*>memchr(p, C_NL, end - p)
        lines += 1
        bad += 1
        if stop_on_bad:
            o.bad_start = p - buf
            o.bad_end = q - buf
            o.why = why
            p = q + 1
            status = _ST_BAD
            break
        p = q + 1

    o.pos = p - buf
    o.last_ip = cur_ip
    o.n = n
    o.lines = lines
    o.skipped = skipped
    o.bad = bad
    return status


cdef int _block_ok(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t limit, Py_ssize_t n,
                   Py_ssize_t cap) except -1:
    """The checks of every scan call before its nogil scan; 0 for an empty
    block (nothing to scan), 1 to scan."""
    if not 0 <= n <= cap:
        raise ValueError(f"n = {n}: expected 0..{cap}")
    if not 0 <= pos <= limit <= buf.shape[0]:
        raise ValueError(f"pos = {pos}, limit = {limit}: expected 0 <= pos <= limit <= {buf.shape[0]}")
    if pos == limit:
        return 0
    # The scanner runs unbounded inside a line; this newline is its guard.
    if buf[limit - 1] != C_NL:
        raise ValueError("the block must end with a newline")
    return 1


cdef inline void _out_init(scan_out *o, uint64_t last_ip) noexcept:
    o.bad_start = 0
    o.bad_end = 0
    o.why = 0
    o.big = -1
    o.last_ip = last_ip


def scan_block(const uint8_t[::1] buf not None, Py_ssize_t pos, Py_ssize_t limit,
               uint64_t[::1] va not None, uint16_t[::1] size not None, uint8_t[::1] kind not None,
               Py_ssize_t n, bint stop_on_bad):
    """Scan the complete lines of ``buf[pos:limit]`` into ``va/size/kind[n:]``.

    ``buf[limit - 1]`` must be ``'\\n'`` (unless ``pos == limit``). Returns
    ``(status, pos, n, lines, skipped, bad, bad_start, bad_end, why)``:
    ``pos`` is where scanning stopped, ``n`` the new record count, then the
    line counters of this call; for ``ST_BAD``, ``buf[bad_start:bad_end]`` is
    the malformed line (without its '\\n') and ``why`` the reason code.
    """
    return _scan_block(buf, pos, limit, va, size, kind, None, n, stop_on_bad, 0)[:9]


def scan_block_ip(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t limit,
                  uint64_t[::1] va, uint16_t[::1] size, uint8_t[::1] kind, uint64_t[::1] ip,
                  Py_ssize_t n, bint stop_on_bad, uint64_t last_ip):
    """:func:`scan_block` that also fills ``ip[n:]``: the address of the latest
    ``I`` line (an ``I`` record's own address; ``last_ip`` before the first
    ``I`` of this call). Returns the 9 values of :func:`scan_block` and the
    latest ``I`` address, to pass as ``last_ip`` to the next call.
    """
    if ip.shape[0] != va.shape[0]:
        raise ValueError(f"ip must have the length of va, got {ip.shape[0]} and {va.shape[0]}")
    return _scan_block(buf, pos, limit, va, size, kind, ip, n, stop_on_bad, last_ip)


cdef tuple _scan_block(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t limit,
                       uint64_t[::1] va, uint16_t[::1] size, uint8_t[::1] kind,
                       uint64_t[::1] ip, Py_ssize_t n, bint stop_on_bad, uint64_t last_ip):
    cdef Py_ssize_t cap = va.shape[0]
    cdef scan_out o
    cdef int status
    cdef uint64_t* pva = NULL
    cdef uint16_t* psz = NULL
    cdef uint8_t* pkd = NULL
    cdef uint64_t* pip = NULL
    if size.shape[0] != cap or kind.shape[0] != cap:
        raise ValueError(f"va, size and kind must have one length, got {cap}, "
                         f"{size.shape[0]}, {kind.shape[0]}")
    if not _block_ok(buf, pos, limit, n, cap):
        return (_ST_DONE, pos, n, 0, 0, 0, 0, 0, 0, last_ip)
    if cap > 0:
        pva = &va[0]
        psz = &size[0]
        pkd = &kind[0]
        if ip is not None:
            pip = &ip[0]
    _out_init(&o, last_ip)
    with nogil:
        status = _scan(&buf[0], pos, limit, pva, psz, pkd, pip, n, cap, stop_on_bad, &o)
    return (status, o.pos, o.n, o.lines, o.skipped, o.bad, o.bad_start, o.bad_end, o.why, o.last_ip)


def scan_block_records(const uint8_t[::1] buf not None, Py_ssize_t pos, Py_ssize_t limit,
                       uint8_t[::1] rec not None, uint64_t[::1] ip not None, Py_ssize_t n,
                       bint stop_on_bad, uint64_t last_ip, uint8_t rtype, uint8_t cpl,
                       PageSet pages not None):
    """:func:`scan_block_ip` writing native records (24 bytes each, type
    ``rtype``, CPU 0, CPL ``cpl``) into ``rec`` instead of three arrays, and
    adding the pages the records touch to ``pages``. Returns the 10 values
    of :func:`scan_block_ip` and the index of the first record of this call
    larger than 4096 bytes (-1 if none). Status ``ST_NOMEM``: the page set
    could not grow.
    """
    cdef Py_ssize_t cap = rec.shape[0] // 24
    cdef scan_out o
    cdef int status
    if rec.shape[0] % 24:
        raise ValueError(f"rec has {rec.shape[0]} bytes: expected a multiple of 24")
    if ip.shape[0] != cap:
        raise ValueError(f"ip must have one entry a record, got {ip.shape[0]} for {cap}")
    if not _block_ok(buf, pos, limit, n, cap):
        return (_ST_DONE, pos, n, 0, 0, 0, 0, 0, 0, last_ip, -1)
    if cap == 0:
        raise ValueError("rec must hold at least one record")
    _out_init(&o, last_ip)
    with nogil:
        status = _scan(&buf[0], pos, limit, NULL, NULL, NULL, &ip[0], n, cap, stop_on_bad, &o,
                       &rec[0], rtype, cpl, &pages.s)
    return (status, o.pos, o.n, o.lines, o.skipped, o.bad, o.bad_start, o.bad_end, o.why,
            o.last_ip, o.big)
