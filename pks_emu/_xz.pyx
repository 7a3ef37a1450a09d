# cython: language_level=3
"""xz decompression into the caller's buffer, straight from liblzma.

Python's ``lzma.LZMAFile`` decompresses into a new ``bytes`` object per
call and copies it out again; measured on a 1.2 GB lackey trace it takes
1.5x the time of ``xz -dc``. This reader calls liblzma's stream decoder on
the caller's buffer without the GIL, at the speed of ``xz -dc`` itself.

No build-time dependency: liblzma 5 is the library Python's own ``lzma``
module is linked with, so it is already in the process once ``lzma`` is
imported; its three functions are found with ``dlsym``. The structure
below is liblzma 5's public, ABI-stable ``lzma_stream`` (declared in
``lzma/base.h``; the trailing reserved fields only need the right size,
and a zero-filled structure is the documented initial value). Without
liblzma (a Python built without ``lzma``), :func:`available` is false and
``pks_emu.lackey`` uses ``lzma.LZMAFile``.

Behaviour matches ``xz -dc``: concatenated streams and stream padding are
decoded, every integrity check liblzma supports is verified, and anything
after the last stream that is neither padding nor a stream is an error
(``lzma.LZMAFile`` silently ignores it). Errors are Python's own types with
Python's messages: ``EOFError`` for a truncated stream, ``lzma.LZMAError``
for damaged data, ``MemoryError``.
"""
from libc.stdint cimport uint64_t
from libc.string cimport memset
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlopen, dlsym

import lzma

cdef extern from *:
    """
    typedef struct {
        const unsigned char *next_in;
        size_t avail_in;
        unsigned long long total_in;
        unsigned char *next_out;
        size_t avail_out;
        unsigned long long total_out;
        const void *allocator;
        void *internal;
        void *reserved_ptr[4];
        unsigned long long reserved_u64[2];
        size_t reserved_size[2];
        int reserved_enum[2];
    } pks_lzma_stream;
    typedef int (*pks_lzma_decoder_fn)(pks_lzma_stream *, unsigned long long, unsigned int);
    typedef int (*pks_lzma_code_fn)(pks_lzma_stream *, int);
    typedef void (*pks_lzma_end_fn)(pks_lzma_stream *);
    """
    ctypedef struct pks_lzma_stream:
        const unsigned char *next_in
        size_t avail_in
        unsigned long long total_in
        unsigned char *next_out
        size_t avail_out
        unsigned long long total_out
    ctypedef int (*pks_lzma_decoder_fn)(pks_lzma_stream *, unsigned long long, unsigned int) nogil
    ctypedef int (*pks_lzma_code_fn)(pks_lzma_stream *, int) nogil
    ctypedef void (*pks_lzma_end_fn)(pks_lzma_stream *) nogil

# liblzma's values (lzma/base.h, lzma/container.h).
cdef enum:
    LZMA_OK = 0
    LZMA_STREAM_END = 1
    LZMA_MEM_ERROR = 5
    LZMA_MEMLIMIT_ERROR = 6
    LZMA_FORMAT_ERROR = 7
    LZMA_OPTIONS_ERROR = 8
    LZMA_DATA_ERROR = 9
    LZMA_BUF_ERROR = 10
    LZMA_RUN = 0
    LZMA_FINISH = 3
    LZMA_CONCATENATED = 0x08

#: compressed bytes read from the file at a time
IN_SIZE = 1 << 20

cdef pks_lzma_decoder_fn _decoder = NULL
cdef pks_lzma_code_fn _code = NULL
cdef pks_lzma_end_fn _end = NULL


cdef bint _load():
    global _decoder, _code, _end
    cdef void *h
    if _code != NULL:
        return True
    h = dlopen(b"liblzma.so.5", RTLD_NOW | RTLD_LOCAL)
    if h == NULL:
        return False
    d = <pks_lzma_decoder_fn>dlsym(h, b"lzma_stream_decoder")
    c = <pks_lzma_code_fn>dlsym(h, b"lzma_code")
    e = <pks_lzma_end_fn>dlsym(h, b"lzma_end")
    if d == NULL or c == NULL or e == NULL:
        return False
    _decoder, _end, _code = d, e, c
    return True


def available() -> bool:
    """Whether liblzma 5 could be found (then :class:`XzStream` works)."""
    return _load()


cdef object _error(int ret):
    # Python's _lzma module words these the same way.
    if ret == LZMA_MEM_ERROR:
        return MemoryError()
    if ret == LZMA_MEMLIMIT_ERROR:
        return lzma.LZMAError("Memory usage limit exceeded")
    if ret == LZMA_FORMAT_ERROR:
        return lzma.LZMAError("Input format not supported by decoder")
    if ret == LZMA_OPTIONS_ERROR:
        return lzma.LZMAError("Invalid or unsupported options")
    if ret == LZMA_DATA_ERROR:
        return lzma.LZMAError("Corrupt input data")
    return lzma.LZMAError(f"Unrecognized error from liblzma: {ret}")


cdef class XzStream:
    """A readable binary stream of the decompressed data of ``raw`` (an
    open binary file positioned at the first xz stream). Supports
    ``readinto``, ``read``, ``tell`` (decompressed bytes so far), ``close``
    and ``with``; closing does not close ``raw``."""

    cdef pks_lzma_stream strm
    cdef object raw
    cdef bytearray inbuf
    cdef bint started, eof_in, done, _closed

    def __cinit__(self):
        memset(&self.strm, 0, sizeof(self.strm))

    def __init__(self, raw):
        cdef int ret
        if self.started:
            raise ValueError("XzStream is already initialised")
        if not _load():
            raise OSError("liblzma.so.5 not found")
        ret = _decoder(&self.strm, <unsigned long long>-1, LZMA_CONCATENATED)
        if ret != LZMA_OK:
            raise _error(ret)
        self.started = True
        self.raw = raw
        self.inbuf = bytearray(IN_SIZE)

    def __dealloc__(self):
        if self.started:
            _end(&self.strm)

    def readinto(self, buf) -> int:
        """Decompress into ``buf`` (a writable buffer) until it is full or
        the data ends; return the byte count (0 at the end)."""
        cdef unsigned char[::1] out = buf
        cdef unsigned char *inp
        cdef size_t want = out.shape[0]
        cdef int ret, action
        cdef Py_ssize_t n
        if self._closed or not self.started:
            raise ValueError("I/O operation on closed file")
        if self.done or want == 0:
            return 0
        self.strm.next_out = &out[0]
        self.strm.avail_out = want
        while self.strm.avail_out:
            if self.strm.avail_in == 0 and not self.eof_in:
                n = self.raw.readinto(self.inbuf)
                if not n:
                    self.eof_in = True
                inp = self.inbuf
                self.strm.next_in = inp
                self.strm.avail_in = n
            action = LZMA_FINISH if self.eof_in else LZMA_RUN
            with nogil:
                ret = _code(&self.strm, action)
            if ret == LZMA_STREAM_END:
                self.done = True
                break
            if ret == LZMA_BUF_ERROR and self.eof_in:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            if ret != LZMA_OK:
                raise _error(ret)
        return want - self.strm.avail_out

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` < 0)."""
        if size >= 0:
            b = bytearray(size)
            return bytes(b[:self.readinto(b)])
        parts = []
        while True:
            b = bytearray(1 << 20)
            n = self.readinto(b)
            if not n:
                return b"".join(parts)
            parts.append(bytes(b[:n]))

    def tell(self) -> int:
        return self.strm.total_out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
