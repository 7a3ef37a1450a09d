# The fault-site aggregator (included by _core.pyx; docs/report.md).
#
# A replay that trips a protection key millions of times needs an answer to
# "which code, how often, where in the run", not millions of rows. FaultSites
# folds every fault, as the replay loop meets it, into three bounded tables:
#
# * sites: an open-addressing hash table keyed (ip, vector, kind, pkey,
#   error_code) holding the count, the first and last record index and up to
#   SITE_SAMPLES distinct sample addresses (the first ones seen);
# * a timeline: faults per bucket of record indices, one row per protection
#   key (rows 0-15: #PF with PK set, by key) plus a row TIMELINE_OTHER for
#   every other fault. The number of buckets is fixed; when a record index
#   falls past the last bucket, the bucket width doubles and neighbouring
#   buckets merge, so the timeline covers any trace length without knowing
#   it up front (the counts equal a direct binning at the final width);
# * pages: (4-KiB page, pkey) -> faults, for access faults (kind 0-2; an
#   instruction fault's "address" is an MSR number or a register value). The
#   table holds at most max_pages entries; a fault whose (page, key) finds no
#   room is counted in pages_dropped, never silently lost.
#
# add() is noexcept nogil and O(1) amortized: a hash probe per table (with a
# one-entry cache of the last hit, as consecutive faults tend to come from the
# same site and page) and one timeline increment. Before those, a small
# two-way cache of (page, ip, kind) -> (site slot, page slot) answers a
# fault like one seen recently with a multiply and three compares: a fault
# storm is the same few pages faulting from the same few instructions, in
# any order. Slots move only when a table grows, which empties the cache.

cimport cython

cdef extern from *:
    """
    #define PKS_SITE_SAMPLES 4
    typedef struct {
        uint64_t ip;
        uint64_t tag;       /* error_code (u32) | vector << 32 | kind << 40 | (u8)pkey << 48 */
        uint64_t count;     /* 0: free slot */
        uint64_t first, last;
        uint64_t samples[PKS_SITE_SAMPLES];
        uint64_t nsamples;
    } pks_site_t;
    typedef struct {
        uint64_t page_key;  /* the pages table's key: page << 5 | pkey + 1 */
        uint64_t ip, tag;
        uint32_t site;      /* slot + 1 in the sites table; 0: empty */
        uint32_t page;      /* slot in the pages table */
    } pks_site_memo_t;
    """
    enum: PKS_SITE_SAMPLES
    ctypedef struct pks_site_memo_t:
        uint64_t page_key, ip, tag
        uint32_t site, page
    ctypedef struct pks_site_t:
        uint64_t ip
        uint64_t tag
        uint64_t count
        uint64_t first, last
        uint64_t samples[PKS_SITE_SAMPLES]
        uint64_t nsamples

#: Sample addresses kept per site.
SITE_SAMPLES = PKS_SITE_SAMPLES
#: Timeline rows: one per protection key, then "other" (faults without PK).
TIMELINE_KEYS = 16
TIMELINE_OTHER = 16

SITE_DTYPE_FIELDS = [("ip", "<u8"), ("vector", "u1"), ("kind", "u1"), ("pkey", "i1"),
                     ("error_code", "<i4"), ("count", "<u8"), ("first_record", "<u8"),
                     ("last_record", "<u8"), ("n_samples", "u1"), ("samples", "<u8", (PKS_SITE_SAMPLES,))]
PAGE_DTYPE_FIELDS = [("page", "<u8"), ("pkey", "i1"), ("count", "<u8")]

cdef enum:
    _TL_ROWS = 17
    _TL_OTHER = 16

cdef uint64_t _PAGE_FREE = 0xFFFFFFFFFFFFFFFFULL

cdef enum:
    _MEMO_BITS = 10                 # the (page, ip, kind) cache: 1024 entries, 2 ways


cdef inline uint64_t _mix64(uint64_t h) noexcept nogil:
    # The splitmix64 finalizer: every input bit reaches every output bit.
    h ^= h >> 30
    h *= 0xBF58476D1CE4E5B9ULL
    h ^= h >> 27
    h *= 0x94D049BB133111EBULL
    h ^= h >> 31
    return h


cdef inline uint64_t _site_tag(int pkey, int32_t error_code, uint8_t vector, uint8_t kind) noexcept nogil:
    return (<uint64_t><uint32_t>error_code | (<uint64_t>vector << 32) | (<uint64_t>kind << 40)
            | (<uint64_t><uint8_t><signed char>pkey << 48))


cdef inline pks_site_memo_t *_memo_set(pks_site_memo_t *memo, uint64_t key, uint64_t ip,
                                      uint64_t tag) noexcept nogil:
    # The first of the two entries that may hold (key, ip, tag). Two ways,
    # because keys that differ in a few structured bits (a page and the next,
    # a read and a write) can share a set, and would evict each other.
    return &memo[(((key ^ ip ^ tag) * <uint64_t>0x9E3779B97F4A7C15ULL) >> (64 - _MEMO_BITS)) & ~<uint64_t>1]


cdef inline bint _memo_is(pks_site_memo_t *e, uint64_t key, uint64_t ip, uint64_t tag) noexcept nogil:
    return e.site != 0 and e.page_key == key and e.ip == ip and e.tag == tag


cdef inline bint _is_pk_fault(int pkey, int32_t error_code, uint8_t vector) noexcept nogil:
    # A protection-key fault: #PF with the PK bit (SDM Vol. 3A 4.7), key known.
    return vector == 14 and (error_code & 0x20) != 0 and 0 <= pkey < 16


def _pow2(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} {value}: expected a power of two")
    return value


@cython.final
cdef class FaultSites:
    """Faults folded by site, over time and by page (see docs/report.md).

    ``FaultSites(max_buckets=1024, bucket_records=1, max_pages=1 << 20)``:
    ``max_buckets`` timeline buckets (a power of two) that start
    ``bucket_records`` records wide (a power of two) and widen as needed;
    at most ``max_pages`` (page, key) entries.
    """
    cdef pks_site_t *table
    cdef uint64_t cap, n_sites, last_slot
    cdef uint64_t *tl                    # [_TL_ROWS][max_buckets]
    cdef readonly uint64_t max_buckets, bucket_records0
    cdef uint32_t shift0                 # bucket_records0 = 1 << shift0
    cdef uint32_t shift                  # bucket width = 1 << shift
    cdef uint64_t max_record
    cdef uint64_t *pt                    # pairs: key (page << 5 | pkey + 1, _PAGE_FREE when free), count
    cdef uint64_t pcap, n_pages, last_page_slot
    cdef readonly uint64_t max_pages
    cdef readonly uint64_t pages_dropped
    cdef readonly uint64_t faults
    cdef pks_site_memo_t *memo          # [1 << _MEMO_BITS]

    def __cinit__(self):
        self.table = NULL
        self.tl = NULL
        self.pt = NULL
        self.memo = NULL

    def __init__(self, uint64_t max_buckets=1024, uint64_t bucket_records=1,
                 uint64_t max_pages=1 << 20):
        cdef uint64_t i
        _pow2("max_buckets", max_buckets)
        _pow2("bucket_records", bucket_records)
        if max_buckets < 2 or max_buckets > (1 << 20):
            raise ValueError(f"max_buckets {max_buckets}: expected 2..{1 << 20}")
        if max_pages > (1 << 30):
            raise ValueError(f"max_pages {max_pages}: expected at most {1 << 30}")
        free(self.table)
        free(self.tl)
        free(self.pt)
        free(self.memo)
        self.memo = <pks_site_memo_t *>calloc(1 << _MEMO_BITS, sizeof(pks_site_memo_t))
        self.cap = 256
        self.table = <pks_site_t *>calloc(self.cap, sizeof(pks_site_t))
        self.max_buckets = max_buckets
        self.bucket_records0 = bucket_records
        self.shift0 = (bucket_records - 1).bit_length()
        self.tl = <uint64_t *>calloc(_TL_ROWS * max_buckets, sizeof(uint64_t))
        self.max_pages = max_pages
        self.pcap = 1024
        self.pt = <uint64_t *>malloc(2 * self.pcap * sizeof(uint64_t))
        if self.table == NULL or self.tl == NULL or self.pt == NULL or self.memo == NULL:
            raise MemoryError("cannot allocate the fault-site tables")
        for i in range(self.pcap):
            self.pt[2 * i] = _PAGE_FREE
            self.pt[2 * i + 1] = 0
        self.n_sites = 0
        self.last_slot = 0
        self.shift = self.shift0
        self.max_record = 0
        self.n_pages = 0
        self.last_page_slot = 0
        self.pages_dropped = 0
        self.faults = 0

    def __dealloc__(self):
        free(self.table)
        free(self.tl)
        free(self.pt)
        free(self.memo)

    # --- the hot path -----------------------------------------------------

    cdef int _grow_sites(self) noexcept nogil:
        cdef uint64_t ncap = self.cap * 2, i, j, mask = ncap - 1
        cdef pks_site_t *nt = <pks_site_t *>calloc(ncap, sizeof(pks_site_t))
        if nt == NULL:
            return -1
        for i in range(self.cap):
            if self.table[i].count:
                j = _mix64(self.table[i].ip ^ _mix64(self.table[i].tag)) & mask
                while nt[j].count:
                    j = (j + 1) & mask
                nt[j] = self.table[i]
        free(self.table)
        self.table = nt
        self.cap = ncap
        self.last_slot = 0
        memset(self.memo, 0, (1 << _MEMO_BITS) * sizeof(pks_site_memo_t))
        return 0

    cdef inline pks_site_t *_site(self, uint64_t ip, uint64_t tag, uint64_t record) noexcept nogil:
        # The slot of a site, claimed (count 0 -> 1 by the caller) when new;
        # _reserve() made room for one more.
        cdef pks_site_t *s = &self.table[self.last_slot]
        cdef uint64_t mask, j
        if s.count and s.ip == ip and s.tag == tag:
            return s
        mask = self.cap - 1
        j = _mix64(ip ^ _mix64(tag)) & mask
        while True:
            s = &self.table[j]
            if s.count == 0:
                s.ip = ip
                s.tag = tag
                s.first = record
                s.last = record
                s.nsamples = 0
                self.n_sites += 1
                break
            if s.ip == ip and s.tag == tag:
                break
            j = (j + 1) & mask
        self.last_slot = j
        return s

    cdef inline void _sample(self, pks_site_t *s, uint64_t address) noexcept nogil:
        cdef uint64_t k
        if s.nsamples >= PKS_SITE_SAMPLES:
            return
        for k in range(s.nsamples):
            if s.samples[k] == address:
                return
        s.samples[s.nsamples] = address
        s.nsamples += 1

    cdef void _widen(self, uint64_t record, uint32_t min_shift) noexcept nogil:
        # Double the bucket width until ``record`` fits and the width is at
        # least 1 << min_shift, summing neighbouring buckets.
        cdef uint64_t r, i, nb = self.max_buckets
        cdef uint64_t *row
        while (record >> self.shift) >= nb or self.shift < min_shift:
            for r in range(<uint64_t>_TL_ROWS):
                row = &self.tl[r * nb]
                for i in range(nb // 2):
                    row[i] = row[2 * i] + row[2 * i + 1]
                memset(&row[nb // 2], 0, (nb // 2) * sizeof(uint64_t))
            self.shift += 1

    cdef inline void _tick(self, uint64_t record, int row, uint64_t n) noexcept nogil:
        cdef uint64_t b = record >> self.shift
        if b >= self.max_buckets:
            self._widen(record, 0)
            b = record >> self.shift
        self.tl[row * self.max_buckets + b] += n
        if record > self.max_record:
            self.max_record = record

    cdef int _grow_pages(self) noexcept nogil:
        cdef uint64_t ncap = self.pcap * 2, i, j, mask = ncap - 1
        cdef uint64_t *nt = <uint64_t *>malloc(2 * ncap * sizeof(uint64_t))
        if nt == NULL:
            return -1
        for i in range(ncap):
            nt[2 * i] = _PAGE_FREE
            nt[2 * i + 1] = 0
        for i in range(self.pcap):
            if self.pt[2 * i] != _PAGE_FREE:
                j = _mix64(self.pt[2 * i]) & mask
                while nt[2 * j] != _PAGE_FREE:
                    j = (j + 1) & mask
                nt[2 * j] = self.pt[2 * i]
                nt[2 * j + 1] = self.pt[2 * i + 1]
        free(self.pt)
        self.pt = nt
        self.pcap = ncap
        self.last_page_slot = 0
        memset(self.memo, 0, (1 << _MEMO_BITS) * sizeof(pks_site_memo_t))
        return 0

    cdef inline int _reserve(self) noexcept nogil:
        # Room for one more site and one more page entry, so that a fault is
        # either counted everywhere or (out of memory) nowhere.
        if 2 * (self.n_sites + 1) > self.cap:
            if self._grow_sites() != 0:
                return -1
        if 2 * (self.n_pages + 1) > self.pcap and self.n_pages < self.max_pages:
            if self._grow_pages() != 0:
                return -1
        return 0

    cdef inline bint _page(self, uint64_t key, uint64_t n) noexcept nogil:
        # _reserve() made room for one more entry. False: no room (dropped);
        # else the entry is in last_page_slot.
        cdef uint64_t mask, j
        if self.pt[2 * self.last_page_slot] == key:
            self.pt[2 * self.last_page_slot + 1] += n
            return True
        mask = self.pcap - 1
        j = _mix64(key) & mask
        while True:
            if self.pt[2 * j] == key:
                break
            if self.pt[2 * j] == _PAGE_FREE:
                if self.n_pages >= self.max_pages:
                    self.pages_dropped += n
                    return False
                self.pt[2 * j] = key
                self.n_pages += 1
                break
            j = (j + 1) & mask
        self.pt[2 * j + 1] += n
        self.last_page_slot = j
        return True

    cdef inline int add(self, uint64_t record, uint8_t cpu, uint64_t ip, uint64_t address,
                        int pkey, int32_t error_code, uint8_t vector, uint8_t kind) noexcept nogil:
        """Count one fault; 0, or -1 when out of memory (nothing counted).
        In line: a fault the (page, ip, kind) cache knows."""
        cdef uint64_t tag, key
        cdef pks_site_memo_t *e
        if kind <= 2 and -1 <= pkey <= 15:
            tag = _site_tag(pkey, error_code, vector, kind)
            key = ((address >> 12) << 5) | <uint64_t>(pkey + 1)
            e = _memo_set(self.memo, key, ip, tag)
            if _memo_is(e, key, ip, tag) or _memo_is(e := e + 1, key, ip, tag):
                self.pt[2 * e.page + 1] += 1
                self._count(&self.table[e.site - 1], record, address,
                            pkey if _is_pk_fault(pkey, error_code, vector) else _TL_OTHER)
                return 0
        return self._add(record, ip, address, pkey, error_code, vector, kind)

    cdef int _add(self, uint64_t record, uint64_t ip, uint64_t address, int pkey,
                  int32_t error_code, uint8_t vector, uint8_t kind) noexcept nogil:
        cdef pks_site_t *s
        cdef bint pk = _is_pk_fault(pkey, error_code, vector)
        cdef uint64_t tag, key = 0
        cdef pks_site_memo_t *e = NULL
        if pkey < -1 or pkey > 15:
            pkey = -1
        tag = _site_tag(pkey, error_code, vector, kind)
        if self._reserve() != 0:
            return -1
        s = self._site(ip, tag, record)
        if kind <= 2:
            key = ((address >> 12) << 5) | <uint64_t>(pkey + 1)
            if self._page(key, 1):
                e = _memo_set(self.memo, key, ip, tag)
                e[1] = e[0]                 # the newest first
                e.page_key = key
                e.ip = ip
                e.tag = tag
                e.site = <uint32_t>(s - self.table) + 1
                e.page = <uint32_t>self.last_page_slot
        self._count(s, record, address, pkey if pk else _TL_OTHER)
        return 0

    cdef inline void _count(self, pks_site_t *s, uint64_t record, uint64_t address,
                            int row) noexcept nogil:
        s.count += 1
        if record < s.first:
            s.first = record
        if record > s.last:
            s.last = record
        self._sample(s, address)
        self._tick(record, row, 1)
        self.faults += 1

    # --- Python side ------------------------------------------------------

    def add_many(self, records, cpu, ip, address, pkey, error_code, vector, kind):
        """Count the faults given as parallel arrays (numpy or sequences of
        the same length): record index, CPU, instruction pointer, address,
        pkey (-1: none), error code, vector (6, 13, 14), access kind (0-2,
        255 for an instruction fault)."""
        cols = [np.ascontiguousarray(records, dtype=np.uint64), np.ascontiguousarray(cpu, dtype=np.uint8),
                np.ascontiguousarray(ip, dtype=np.uint64), np.ascontiguousarray(address, dtype=np.uint64),
                np.ascontiguousarray(pkey, dtype=np.int32), np.ascontiguousarray(error_code, dtype=np.int32),
                np.ascontiguousarray(vector, dtype=np.uint8), np.ascontiguousarray(kind, dtype=np.uint8)]
        n = len(cols[0])
        if any(c.ndim != 1 or len(c) != n for c in cols):
            raise ValueError("add_many: every column must be a one-dimensional array of the same length")
        cdef const uint64_t[::1] rec = cols[0]
        cdef const uint8_t[::1] cp = cols[1]
        cdef const uint64_t[::1] ipv = cols[2]
        cdef const uint64_t[::1] addr = cols[3]
        cdef const int32_t[::1] key = cols[4]
        cdef const int32_t[::1] code = cols[5]
        cdef const uint8_t[::1] vec = cols[6]
        cdef const uint8_t[::1] knd = cols[7]
        cdef Py_ssize_t i, m = n
        cdef int rc = 0
        with nogil:
            for i in range(m):
                if self.add(rec[i], cp[i], ipv[i], addr[i], key[i], code[i], vec[i], knd[i]) != 0:
                    rc = -1
                    break
        if rc != 0:
            raise MemoryError("out of memory in the fault-site tables")

    def add_faults(self, faults, ip=None):
        """Count a fault log (the ``FAULT_DTYPE_FIELDS`` array of the replay)
        with the instruction pointers ``ip`` of its faults (0 when None)."""
        n = len(faults)
        self.add_many(faults["record"], faults["cpu"], np.zeros(n, np.uint64) if ip is None else ip,
                      faults["address"], faults["pkey"], faults["error_code"], faults["vector"],
                      faults["kind"])

    @property
    def sites_total(self):
        """Distinct sites."""
        return self.n_sites

    @property
    def pages_total(self):
        """Distinct (page, key) entries held (at most ``max_pages``)."""
        return self.n_pages

    @property
    def bucket_records(self):
        """The timeline's current bucket width in records."""
        return <uint64_t>1 << self.shift

    def sites(self, limit=None):
        """The sites as a numpy array of ``SITE_DTYPE_FIELDS``, ranked: count
        descending, then first record, then IP."""
        raw = np.empty(self.cap, dtype=np.dtype([("ip", "<u8"), ("tag", "<u8"), ("count", "<u8"),
                                                 ("first", "<u8"), ("last", "<u8"),
                                                 ("samples", "<u8", (PKS_SITE_SAMPLES,)), ("nsamples", "<u8")]))
        assert raw.itemsize == sizeof(pks_site_t)
        cdef uint8_t[::1] rv = raw.view(np.uint8)
        memcpy(&rv[0], self.table, self.cap * sizeof(pks_site_t))
        raw = raw[raw["count"] != 0]
        tag = raw["tag"]
        out = np.zeros(len(raw), dtype=np.dtype(SITE_DTYPE_FIELDS))
        out["ip"] = raw["ip"]
        out["error_code"] = (tag & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
        out["vector"] = (tag >> np.uint64(32)) & np.uint64(0xFF)
        out["kind"] = (tag >> np.uint64(40)) & np.uint64(0xFF)
        out["pkey"] = ((tag >> np.uint64(48)) & np.uint64(0xFF)).astype(np.uint8).view(np.int8)
        out["count"] = raw["count"]
        out["first_record"] = raw["first"]
        out["last_record"] = raw["last"]
        out["n_samples"] = raw["nsamples"]
        out["samples"] = raw["samples"]
        order = np.lexsort((out["error_code"], out["kind"], out["vector"], out["pkey"], out["ip"],
                            out["first_record"], ~out["count"]))
        out = out[order]
        return out if limit is None else out[:limit]

    def timeline_array(self, uint64_t records=0):
        """``(bucket_records, counts)``: counts is a (17, buckets) uint64 array,
        rows 0-15 the PK faults of each key, row 16 the other faults. With
        ``records`` (the run's length) the buckets cover all of it, widening
        (on a copy) when needed; otherwise up to the last fault."""
        nb = self.max_buckets
        arr = np.zeros((_TL_ROWS, nb), dtype=np.uint64)
        cdef uint64_t[:, ::1] view = arr
        memcpy(&view[0, 0], self.tl, _TL_ROWS * nb * sizeof(uint64_t))
        shift = self.shift
        last = self.max_record if self.faults else 0
        if records:
            last = max(last, records - 1)
        while (last >> shift) >= nb:
            arr = np.concatenate([arr[:, 0::2] + arr[:, 1::2], np.zeros((_TL_ROWS, nb // 2), np.uint64)], axis=1)
            shift += 1
        width = 1 << shift
        used = (last // width + 1) if (self.faults or records) else 0
        return width, arr[:, :used]

    def timeline(self, uint64_t records=0):
        """The timeline as in the replay JSON (schema 2): bucket width,
        number of buckets, and per key ("0".."15", "other") the faults of
        each bucket, for the rows that have any."""
        width, arr = self.timeline_array(records)
        by = {}
        for r in range(_TL_ROWS):
            if arr[r].any():
                by["other" if r == TIMELINE_OTHER else str(r)] = [int(x) for x in arr[r]]
        return {"bucket_records": int(width), "buckets": int(arr.shape[1]), "by_pkey": by}

    def pages(self, limit=None):
        """(page address, pkey, count) as a numpy array of
        ``PAGE_DTYPE_FIELDS``, ranked by count descending, then page, key."""
        out = np.zeros(self.n_pages, dtype=np.dtype(PAGE_DTYPE_FIELDS))
        both = np.empty(2 * self.pcap, dtype=np.uint64)
        cdef uint64_t[::1] bv = both
        memcpy(&bv[0], self.pt, 2 * self.pcap * sizeof(uint64_t))
        keys = both[0::2]
        counts = both[1::2]
        used = keys != _PAGE_FREE
        keys = keys[used]
        out["page"] = (keys >> np.uint64(5)) << np.uint64(12)
        out["pkey"] = (keys & np.uint64(31)).astype(np.int16) - 1
        out["count"] = counts[used]
        out = out[np.lexsort((out["pkey"], out["page"], ~out["count"]))]
        return out if limit is None else out[:limit]

    def merge(self, FaultSites other):
        """Add ``other``'s faults to these (as if they had been added here;
        the timelines must have the same bucket_records start and
        max_buckets)."""
        if other is self:
            raise ValueError("merge: cannot merge a FaultSites into itself")
        if other.bucket_records0 != self.bucket_records0 or other.max_buckets != self.max_buckets:
            raise ValueError("merge: the timelines differ in bucket_records or max_buckets")
        cdef uint64_t i, j, k, nb = self.max_buckets, b
        cdef pks_site_t *o
        cdef pks_site_t *s
        cdef int rc = 0
        with nogil:
            for i in range(other.cap):
                o = &other.table[i]
                if o.count == 0:
                    continue
                if self._reserve() != 0:
                    rc = -1
                    break
                s = self._site(o.ip, o.tag, o.first)
                s.count += o.count
                if o.first < s.first:
                    s.first = o.first
                if o.last > s.last:
                    s.last = o.last
                for k in range(o.nsamples):
                    self._sample(s, o.samples[k])
            if rc == 0:
                for i in range(other.pcap):
                    if other.pt[2 * i] != _PAGE_FREE:
                        if self._reserve() != 0:
                            rc = -1
                            break
                        self._page(other.pt[2 * i], other.pt[2 * i + 1])
        if rc != 0:
            raise MemoryError("out of memory in the fault-site tables")
        self.pages_dropped += other.pages_dropped
        if other.faults:
            # Widen to the coarser of the two timelines, then add the other's
            # buckets (one of its buckets falls in exactly one of ours).
            self._widen(other.max_record, other.shift)
            for r in range(_TL_ROWS):
                for j in range(nb):
                    if other.tl[r * nb + j]:
                        b = j >> (self.shift - other.shift)
                        self.tl[r * nb + b] += other.tl[r * nb + j]
            if other.max_record > self.max_record or not self.faults:
                self.max_record = other.max_record
        self.faults += other.faults

    def to_dict(self, symbolizer=None, *, records=0, max_sites=1000, max_pages=4096):
        """The schema-2 sections of the replay JSON: ``sites``, ``sites_total``,
        ``timeline``, ``pages``, ``pages_total``, ``pages_dropped``.
        ``symbolizer``: a ``pks_emu.symbols.Symbolizer`` (or None) naming the
        IPs; ``records``: the run's length, for the timeline."""
        from .constants import pf_error_code_str
        names = {6: "#UD", 13: "#GP", 14: "#PF"}
        kinds = {0: "read", 1: "write", 2: "fetch", 255: "insn"}
        sites = self.sites(max_sites)
        ips = sites["ip"]
        if symbolizer is not None and len(ips):
            syms, srcs = symbolizer.lookup_many(ips)
        else:
            syms = srcs = [None] * len(ips)
        out = []
        for s, sym, src in zip(sites, syms, srcs):
            vec = int(s["vector"])
            code = int(s["error_code"])
            out.append({
                "ip": f"{int(s['ip']):#x}", "symbol": sym, "source": src,
                "vector": names.get(vec, str(vec)), "kind": kinds.get(int(s["kind"]), str(int(s["kind"]))),
                "pkey": int(s["pkey"]) if int(s["pkey"]) >= 0 else None,
                "error_code": code,
                "error_code_bits": pf_error_code_str(code) if vec == 14 else "",
                "count": int(s["count"]), "first_record": int(s["first_record"]),
                "last_record": int(s["last_record"]),
                "sample_addresses": [f"{int(a):#x}" for a in s["samples"][:int(s["n_samples"])]],
            })
        pages = self.pages(max_pages)
        return {
            "sites": out,
            "sites_total": int(self.n_sites),
            "timeline": self.timeline(records),
            "pages": [{"page": f"{int(p['page']):#x}", "pkey": int(p["pkey"]) if int(p["pkey"]) >= 0 else None,
                       "count": int(p["count"])} for p in pages],
            "pages_total": int(self.n_pages),
            "pages_dropped": int(self.pages_dropped),
        }


# --- the per-fault log formatter (pks_emu/trace/faultlog.py) ---------------
#
# Formats a block of the replay's fault log (FAULT_DTYPE_FIELDS records) as
# CSV or JSON Lines in C: the names of vectors, kinds and #PF error-code bits
# come from Python as tables of 256 entries (TABLE_SLOT bytes each: a length
# byte, then the text), so this code only copies and prints numbers.

cdef extern from *:
    """
    typedef struct {
        uint64_t record, address;
        int32_t error_code;
        uint8_t cpu, vector;
        int8_t pkey;
        uint8_t kind;
    } pks_fault_rec_t;
    """
    ctypedef struct pks_fault_rec_t:
        uint64_t record, address
        int32_t error_code
        uint8_t cpu, vector
        signed char pkey
        uint8_t kind

from cpython.bytes cimport PyBytes_FromStringAndSize

#: Bytes per entry of the name tables given to format_fault_block.
FAULT_TABLE_SLOT = 32
cdef enum:
    _SLOT = 32
    _ROW_MAX = 448          # a row never exceeds this (JSON, every field at its widest)


cdef inline char *_put_dec(char *p, uint64_t v) noexcept nogil:
    cdef char tmp[20]
    cdef int n = 0
    if v == 0:
        p[0] = 48
        return p + 1
    while v:
        tmp[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    while n:
        n -= 1
        p[0] = tmp[n]
        p += 1
    return p


cdef inline char *_put_sdec(char *p, int64_t v) noexcept nogil:
    if v < 0:
        p[0] = 45
        return _put_dec(p + 1, <uint64_t>(-v))
    return _put_dec(p, <uint64_t>v)


cdef inline char *_put_hex(char *p, uint64_t v) noexcept nogil:
    # Python's f"{v:#x}".
    cdef const char *digits = b"0123456789abcdef"
    cdef int shift = 60
    p[0] = 48
    p[1] = 120
    p += 2
    if v == 0:
        p[0] = 48
        return p + 1
    while (v >> shift) == 0:
        shift -= 4
    while shift >= 0:
        p[0] = digits[(v >> shift) & 15]
        p += 1
        shift -= 4
    return p


cdef inline char *_put_shex(char *p, int64_t v) noexcept nogil:
    if v < 0:
        p[0] = 45
        return _put_hex(p + 1, <uint64_t>(-v))
    return _put_hex(p, <uint64_t>v)


cdef inline char *_put_lit(char *p, const char *s) noexcept nogil:
    while s[0]:
        p[0] = s[0]
        p += 1
        s += 1
    return p


cdef inline char *_put_slot(char *p, const char *table, unsigned int i) noexcept nogil:
    cdef const char *e = table + i * _SLOT
    cdef unsigned int n = <uint8_t>e[0]
    memcpy(p, e + 1, n)
    return p + n


def format_fault_block(const uint8_t[::1] faults, const uint64_t[::1] ip, bint json,
                       const uint8_t[::1] vectors, const uint8_t[::1] kinds, const uint8_t[::1] bits):
    """CSV rows (``json`` False: record,cpu,vector,kind,address,error_code,
    error_code_bits,pkey,ip) or JSON Lines of the faults in ``faults`` (the
    raw bytes of a FAULT_DTYPE_FIELDS array), ``ip`` the instruction pointer
    of each (empty: none known; 0 is unknown). ``vectors``/``kinds``/``bits``:
    256 entries of FAULT_TABLE_SLOT bytes each, naming a vector, a kind, the
    bits of ``error_code & 0x7f | (error_code >> 8 & 0x80)`` (bit 15, SGX)."""
    if faults.shape[0] % sizeof(pks_fault_rec_t):
        raise ValueError("faults: not a whole number of fault records")
    cdef Py_ssize_t n = faults.shape[0] // sizeof(pks_fault_rec_t), i
    if ip.shape[0] and ip.shape[0] != n:
        raise ValueError("ip: one per fault")
    if vectors.shape[0] != 256 * _SLOT or kinds.shape[0] != 256 * _SLOT or bits.shape[0] != 256 * _SLOT:
        raise ValueError("name tables: 256 entries of FAULT_TABLE_SLOT bytes")
    if n == 0:
        return b""
    cdef char *buf = <char *>malloc(n * _ROW_MAX)
    if buf == NULL:
        raise MemoryError("cannot allocate the fault-log buffer")
    cdef const pks_fault_rec_t *f = <const pks_fault_rec_t *>&faults[0]
    cdef const char *vt = <const char *>&vectors[0]
    cdef const char *kt = <const char *>&kinds[0]
    cdef const char *bt = <const char *>&bits[0]
    cdef bint has_ip = ip.shape[0] != 0
    cdef const uint64_t *ipp = &ip[0] if has_ip else NULL
    cdef char *p = buf
    cdef uint64_t x
    cdef unsigned int code_bits
    try:
        with nogil:
            for i in range(n):
                x = ipp[i] if has_ip else 0
                code_bits = (<uint32_t>f[i].error_code & 0x7F) | ((<uint32_t>f[i].error_code >> 8) & 0x80)
                if not json:
                    p = _put_dec(p, f[i].record)
                    p[0] = 44
                    p = _put_dec(p + 1, f[i].cpu)
                    p[0] = 44
                    p = _put_slot(p + 1, vt, f[i].vector)
                    p[0] = 44
                    p = _put_slot(p + 1, kt, f[i].kind)
                    p[0] = 44
                    p = _put_hex(p + 1, f[i].address)
                    p[0] = 44
                    p = _put_shex(p + 1, f[i].error_code)
                    p[0] = 44
                    p += 1
                    if f[i].vector == 14:
                        p = _put_slot(p, bt, code_bits)
                    p[0] = 44
                    p += 1
                    if f[i].pkey >= 0:
                        p = _put_dec(p, <uint64_t>f[i].pkey)
                    p[0] = 44
                    p += 1
                    if x:
                        p = _put_hex(p, x)
                    p[0] = 10
                    p += 1
                else:
                    p = _put_lit(p, b'{"record": ')
                    p = _put_dec(p, f[i].record)
                    p = _put_lit(p, b', "cpu": ')
                    p = _put_dec(p, f[i].cpu)
                    p = _put_lit(p, b', "vector": ')
                    p = _put_slot(p, vt, f[i].vector)
                    p = _put_lit(p, b', "kind": ')
                    p = _put_slot(p, kt, f[i].kind)
                    p = _put_lit(p, b', "address": "')
                    p = _put_hex(p, f[i].address)
                    p = _put_lit(p, b'", "error_code": ')
                    p = _put_sdec(p, f[i].error_code)
                    if f[i].vector == 14:
                        p = _put_lit(p, b', "error_code_bits": "')
                        p = _put_slot(p, bt, code_bits)
                        p = _put_lit(p, b'", "pkey": ')
                        if f[i].pkey >= 0:
                            p = _put_dec(p, <uint64_t>f[i].pkey)
                        else:
                            p = _put_lit(p, b"null")
                    p = _put_lit(p, b', "ip": ')
                    if x:
                        p[0] = 34
                        p = _put_hex(p + 1, x)
                        p[0] = 34
                        p += 1
                    else:
                        p = _put_lit(p, b"null")
                    p = _put_lit(p, b"}\n")
        return PyBytes_FromStringAndSize(buf, p - buf)
    finally:
        free(buf)
