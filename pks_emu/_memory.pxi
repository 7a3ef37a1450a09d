# Sparse physical memory (included by _core.pyx).
#
# Frames are 4 KiB, allocated on first write, zero until then. Physical
# addresses are 52 bits wide (the architectural maximum, SDM §4.1.4), so the
# frame number is at most 40 bits; frames live in an open-addressing hash table
# with linear probing. Reads of untouched frames never allocate, so a page walk
# (which only reads, and writes A/D bits into frames it has just read from)
# never resizes the table: that is what makes GIL-free walks safe.

from .errors import MachineBusyError

cdef extern from *:
    """
    #define PKS_MEM_EMPTY (~0ULL)
    #define PKS_PHYS_LIMIT (1ULL << 52)
    """
    const uint64_t PKS_MEM_EMPTY
    const uint64_t PKS_PHYS_LIMIT


cdef inline uint64_t _mem_hash(uint64_t pfn, uint64_t mask) noexcept nogil:
    # Fibonacci hashing spreads the dense runs of frame numbers that page
    # tables and mappings produce.
    return ((pfn * <uint64_t>0x9E3779B97F4A7C15ULL) >> 20) & mask


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE

cdef enum:
    SLAB_BYTES = 2 * 1024 * 1024
    SLAB_FRAMES = SLAB_BYTES // 4096


cdef uint8_t *_new_frame(pks_mem_t *m) noexcept nogil:
    """A zeroed 4-KiB frame. Frames come from 2-MiB slabs backed by huge pages
    where the host allows: walks over many page-table frames then cost far
    fewer host TLB misses than with one allocation per frame."""
    cdef void *slab = NULL
    cdef uint8_t **grown
    if m.nslabs == 0 or m.slab_used == SLAB_FRAMES:
        if m.nslabs == m.cap_slabs:
            grown = <uint8_t **>realloc(m.slabs, (m.cap_slabs * 2 + 8) * sizeof(uint8_t *))
            if grown == NULL:
                return NULL
            m.slabs = grown
            m.cap_slabs = m.cap_slabs * 2 + 8
        if posix_memalign(&slab, SLAB_BYTES, SLAB_BYTES) != 0:
            return NULL
        madvise(slab, SLAB_BYTES, MADV_HUGEPAGE)   # a hint; failure is harmless
        memset(slab, 0, SLAB_BYTES)
        m.slabs[m.nslabs] = <uint8_t *>slab
        m.nslabs += 1
        m.slab_used = 0
    m.slab_used += 1
    return m.slabs[m.nslabs - 1] + <size_t>(m.slab_used - 1) * 4096


cdef int _mem_init(pks_mem_t *m, uint64_t capacity) noexcept nogil:
    cdef uint64_t i
    m.keys = <uint64_t *>malloc(capacity * sizeof(uint64_t))
    m.pages = <uint8_t **>calloc(capacity, sizeof(uint8_t *))
    if m.keys == NULL or m.pages == NULL:
        free(m.keys)
        free(m.pages)
        m.keys = NULL
        m.pages = NULL
        return -1
    for i in range(capacity):
        m.keys[i] = PKS_MEM_EMPTY
    m.capacity = capacity
    m.count = 0
    m.busy = 0
    m.slabs = NULL
    m.nslabs = 0
    m.cap_slabs = 0
    m.slab_used = 0
    m.replay_epoch = 0
    return 0


cdef void _mem_free(pks_mem_t *m) noexcept nogil:
    cdef uint64_t i
    for i in range(m.nslabs):
        free(m.slabs[i])
    free(m.slabs)
    m.slabs = NULL
    m.nslabs = 0
    free(m.keys)
    free(m.pages)
    m.keys = NULL
    m.pages = NULL
    m.capacity = 0
    m.count = 0


cdef int _mem_grow(pks_mem_t *m) noexcept nogil:
    cdef pks_mem_t bigger
    cdef uint64_t i, j, mask
    if _mem_init(&bigger, m.capacity * 2) != 0:
        return -1
    mask = bigger.capacity - 1
    for i in range(m.capacity):
        if m.keys[i] != PKS_MEM_EMPTY:
            j = _mem_hash(m.keys[i], mask)
            while bigger.keys[j] != PKS_MEM_EMPTY:
                j = (j + 1) & mask
            bigger.keys[j] = m.keys[i]
            bigger.pages[j] = m.pages[i]
    bigger.count = m.count
    bigger.busy = m.busy
    bigger.slabs = m.slabs
    bigger.nslabs = m.nslabs
    bigger.cap_slabs = m.cap_slabs
    bigger.slab_used = m.slab_used
    bigger.replay_epoch = m.replay_epoch
    free(m.keys)
    free(m.pages)
    m[0] = bigger
    return 0


cdef uint8_t *pks_mem_frame(pks_mem_t *m, uint64_t pfn, bint create) noexcept nogil:
    """The 4-KiB frame ``pfn``; NULL if absent and not ``create`` (or out of memory)."""
    cdef uint64_t mask = m.capacity - 1
    cdef uint64_t j = _mem_hash(pfn, mask)
    cdef uint64_t k
    cdef uint8_t *page
    while True:
        k = m.keys[j]
        if k == pfn:
            return m.pages[j]
        if k == PKS_MEM_EMPTY:
            break
        j = (j + 1) & mask
    if not create:
        return NULL
    if (m.count + 1) * 2 > m.capacity:
        if _mem_grow(m) != 0:
            return NULL
        return pks_mem_frame(m, pfn, True)
    page = _new_frame(m)
    if page == NULL:
        return NULL
    m.keys[j] = pfn
    m.pages[j] = page
    m.count += 1
    return page


cdef uint64_t pks_mem_read_u64(pks_mem_t *m, uint64_t pa) noexcept nogil:
    """Aligned 8-byte read (page-table entries); absent frames read as zero."""
    cdef uint8_t *page = pks_mem_frame(m, pa >> 12, False)
    cdef uint64_t v = 0
    if page != NULL:
        memcpy(&v, page + (pa & 0xFF8), 8)
    return v


cdef int pks_mem_write_u64(pks_mem_t *m, uint64_t pa, uint64_t value) noexcept nogil:
    """Aligned 8-byte write; allocates the frame. Returns -1 when out of memory."""
    cdef uint8_t *page = pks_mem_frame(m, pa >> 12, True)
    if page == NULL:
        return -1
    memcpy(page + (pa & 0xFF8), &value, 8)
    return 0


cdef int _check_range(uint64_t pa, uint64_t n) except -1:
    if n > PKS_PHYS_LIMIT or pa > PKS_PHYS_LIMIT - n:
        raise ValueError(
            f"physical range {pa:#x}+{n:#x} exceeds the 52-bit physical address space")
    return 0


cdef int _no_memory() except -1:
    raise TypeError("this CPU was made without __init__: create it as CPU(memory, ...)")


cdef int _check_writable(pks_mem_t *m) except -1:
    # A GIL-free loop may allocate frames (PTE-write records), which can move
    # the frame table: no other thread may touch the memory meanwhile.
    if m == NULL:
        return _no_memory()
    if m.busy:
        raise MachineBusyError(
            "physical memory is in use by a GIL-free batch call on another thread")
    return 0


cdef class PhysicalMemory:
    """Sparse physical memory with 52-bit physical addresses.

    Frames are allocated on first write; untouched memory reads as zero.
    Multi-byte values are little-endian, as on x86.
    """

    def __cinit__(self):
        if _mem_init(&self.m, 1024) != 0:
            raise MemoryError("cannot allocate the physical-memory frame table")

    def __dealloc__(self):
        _mem_free(&self.m)

    @property
    def frames(self):
        """Number of 4-KiB frames allocated so far."""
        return self.m.count

    def read_u64(self, pa):
        """Read a little-endian 64-bit value at ``pa`` (any alignment)."""
        pa = _u64(pa, "pa")
        _check_range(pa, 8)
        _check_writable(&self.m)
        if (pa & 7) == 0:
            return pks_mem_read_u64(&self.m, pa)
        return int.from_bytes(self.read(pa, 8), "little")

    def write_u64(self, pa, value):
        """Write a little-endian 64-bit value at ``pa`` (any alignment)."""
        pa, value = _u64(pa, "pa"), _int(value, "value")
        if not 0 <= value < (1 << 64):
            raise ValueError(f"value {value!r} does not fit in 64 bits")
        _check_range(pa, 8)
        _check_writable(&self.m)
        if (pa & 7) == 0:
            if pks_mem_write_u64(&self.m, pa, <uint64_t>value) != 0:
                raise MemoryError("out of memory allocating a physical frame")
            return
        self.write(pa, int(value).to_bytes(8, "little"))

    def read(self, pa, Py_ssize_t n):
        """Read ``n`` bytes starting at ``pa``."""
        pa = _u64(pa, "pa")
        if n < 0:
            raise ValueError(f"length {n} is negative")
        _check_range(pa, <uint64_t>n)
        _check_writable(&self.m)
        cdef bytearray out = bytearray(n)
        cdef uint8_t *dst = out
        cdef uint8_t *page
        cdef Py_ssize_t done = 0, chunk
        cdef uint64_t off
        while done < n:
            off = (pa + done) & 0xFFF
            chunk = min(<Py_ssize_t>(4096 - off), n - done)
            page = pks_mem_frame(&self.m, (pa + done) >> 12, False)
            if page != NULL:
                memcpy(dst + done, page + off, chunk)
            done += chunk
        return bytes(out)

    def write(self, pa, data):
        """Write the bytes-like ``data`` starting at ``pa``."""
        pa = _u64(pa, "pa")
        cdef const uint8_t[::1] src = memoryview(data).cast("B")
        cdef Py_ssize_t n = src.shape[0]
        _check_range(pa, <uint64_t>n)
        _check_writable(&self.m)
        cdef uint8_t *page
        cdef Py_ssize_t done = 0, chunk
        cdef uint64_t off
        while done < n:
            off = (pa + done) & 0xFFF
            chunk = min(<Py_ssize_t>(4096 - off), n - done)
            page = pks_mem_frame(&self.m, (pa + done) >> 12, True)
            if page == NULL:
                raise MemoryError("out of memory allocating a physical frame")
            memcpy(page + off, &src[done], chunk)
            done += chunk

    def frame_addresses(self):
        """Physical addresses of all allocated frames, sorted (a list of ints)."""
        cdef uint64_t i
        out = [self.m.keys[i] << 12 for i in range(self.m.capacity)
               if self.m.keys[i] != PKS_MEM_EMPTY]
        out.sort()
        return out

    def is_allocated(self, pa):
        """Whether the frame holding ``pa`` has been written."""
        pa = _u64(pa, "pa")
        return pks_mem_frame(&self.m, pa >> 12, False) != NULL
