# cython: language_level=3
"""C-level API of the trace format v2 record codec (``_tracev2.pyx``).

``tv2_decode`` runs without the GIL, so a replay can decode chunk k+1 on a
second thread while it replays chunk k. The caller owns every buffer; see
the docstrings in ``_tracev2.pyx`` and docs/trace-format.md ("Version 2").
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef enum:
    TV2_MAX_CPUS = 256
    TV2_PA_CACHE = 4096

# Per-CPU predictors; index [0] data accesses, [1] fetches.
ctypedef struct tv2_cpu:
    uint64_t h0[2]      # previous address of the class
    uint64_t h1[2]      # previous address of the class in another 256-MiB region
    uint64_t adv[2]     # size of the previous fetch ([0] stays 0)
    uint64_t ip         # IP of the previous access
    uint64_t last_d     # pa - va of the previous record with a pa
    uint64_t word       # bytes 0..7 of the next access record, but op and size
    uint8_t cpl
    uint8_t flags

# Predictor state of one chunk (about 50 KiB: allocate it once, e.g. with malloc,
# and pass it to every call; each call resets what it uses).
ctypedef struct tv2_state:
    tv2_cpu cpu[TV2_MAX_CPUS]
    uint64_t pa_cache[TV2_PA_CACHE]

# Where decoding stopped: the record index in the chunk and a TV2_E* code.
ctypedef struct tv2_err:
    int64_t record
    int code

cdef enum:
    TV2_OK = 0
    TV2_E_TRUNCATED = 1        # the main stream ends inside record `record`
    TV2_E_VARINT = 2           # a varint longer than 10 bytes
    TV2_E_CPU = 3              # a CPU index at or above ncpus
    TV2_E_OP = 4               # a reserved escape op
    TV2_E_ADDR_MODE = 5        # the reserved address mode 3
    TV2_E_SIZE = 6             # an explicit access size outside 1..4096 (65535 for a full record)
    TV2_E_TRAILING = 7         # bytes left in the main stream after the last record
    TV2_E_PA_TRUNCATED = 8     # the pa stream ends inside record `record`
    TV2_E_PA_TRAILING = 9      # bytes left in the pa stream after the last record
    TV2_E_CPL = 10             # a CPL other than 0..3 or 255
    TV2_E_ARG = 11             # bad arguments (ncpus)
    TV2_E_PA_RANGE = 12        # encoder: a pa at or above 2**63 other than PA_NONE

# Decode `nrec` records from `main` (main_len bytes) and, when `pa_stream` is
# not NULL, their physical addresses from `pa_stream` (pa_len bytes) into
# `out` (nrec * 24 bytes, the v1 RECORD layout), `ip` and `pa` (nrec u64
# each; `pa` is only written when `pa_stream` is not NULL). Never reads
# outside the given buffers, whatever their content. Returns TV2_OK or the
# error code (also in err.code; err.record is the record index).
cdef int tv2_decode(const uint8_t* main, size_t main_len, const uint8_t* pa_stream,
                    size_t pa_len, uint32_t nrec, int ncpus, uint8_t* out, uint64_t* ip,
                    uint64_t* pa, tv2_state* st, tv2_err* err) noexcept nogil

# Encode `n` records (`recs`: n * 24 bytes) with their `ip` and, when `pa` is
# not NULL, `pa`. `main_out` needs tv2_main_bound(n) bytes, `pa_out`
# tv2_pa_bound(n). Returns TV2_OK or an error code (err.record: which record).
cdef int tv2_encode(const uint8_t* recs, const uint64_t* ip, const uint64_t* pa, uint32_t n,
                    int ncpus, uint8_t* main_out, size_t* main_len, uint8_t* pa_out,
                    size_t* pa_len, tv2_state* st, tv2_err* err) noexcept nogil

cdef size_t tv2_main_bound(size_t n) noexcept nogil
cdef size_t tv2_pa_bound(size_t n) noexcept nogil

# CRC-32C (Castagnoli) of a block payload, continuing `crc` (0 to start).
cdef uint32_t tv2_crc32c(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil
