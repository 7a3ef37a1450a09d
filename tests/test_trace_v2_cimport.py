"""The C-level decoder of trace format v2 (``pks_emu/_tracev2.pxd``): another
extension cimports ``tv2_decode`` and runs it without the GIL, on two threads
at once, and gets what ``Codec.decode`` gets."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pks_emu._tracev2 import Codec
from pks_emu.embed import get_cython_include
from pks_emu.trace.format import RECORD

from test_cimport import build_extension
from test_trace_v2 import random_records

pytest.importorskip("Cython")

DECODER_PYX = '''
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from pks_emu._tracev2 cimport tv2_decode, tv2_state, tv2_err, TV2_OK


def decode(const uint8_t[::1] raw, size_t main_len, uint32_t nrec, int ncpus,
           uint8_t[::1] out, uint64_t[::1] ip, uint64_t[::1] pa):
    cdef tv2_state* st = <tv2_state*>malloc(sizeof(tv2_state))
    cdef tv2_err err
    cdef int rc
    if out.shape[0] < 24 * nrec or ip.shape[0] < nrec or pa.shape[0] < nrec or main_len > <size_t>raw.shape[0]:
        raise ValueError("buffers")
    with nogil:
        rc = tv2_decode(&raw[0], main_len, &raw[0] + main_len, raw.shape[0] - main_len, nrec, ncpus,
                        &out[0], &ip[0], &pa[0], st, &err)
    free(st)
    return rc, err.record
'''

SETUP_PY = '''
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="tv2_consumer",
    ext_modules=cythonize([Extension("tv2_consumer", ["tv2_consumer.pyx"])],
                          include_path=[{include!r}], language_level=3, quiet=True),
)
'''


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tv2cimport")
    (tmp / "tv2_consumer.pyx").write_text(DECODER_PYX)
    return build_extension(tmp, "tv2_consumer", SETUP_PY.format(include=get_cython_include()))


def test_tv2_decode_from_another_extension_on_two_threads(consumer):
    rng = np.random.default_rng(11)
    chunks = []
    for _ in range(8):
        recs, ip, pa = random_records(rng, 20_000, 3)
        raw, ml = Codec(3).encode(recs.view(np.uint8), ip, pa)
        chunks.append((recs, ip, pa, raw, ml))
    results = {}

    def work(k):
        recs, ip, pa, raw, ml = chunks[k]
        out, ip2, pa2 = np.zeros(len(recs), RECORD), np.zeros(len(recs), np.uint64), np.zeros(len(recs), np.uint64)
        results[k] = (consumer.decode(raw, ml, len(recs), 3, out.view(np.uint8), ip2, pa2), out, ip2, pa2)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (recs, ip, pa, raw, ml) in enumerate(chunks):
        (rc, rec), out, ip2, pa2 = results[k]
        assert rc == 0
        assert out.tobytes() == recs.tobytes() and (ip2 == ip).all() and (pa2 == pa).all()
    # a chunk that says one record more than it holds: an error code and the record
    recs, ip, pa, raw, ml = chunks[0]
    n = len(recs) + 1
    out = np.zeros(n, RECORD)
    rc, rec = consumer.decode(raw, ml, n, 3, out.view(np.uint8), np.zeros(n, np.uint64),
                              np.zeros(n, np.uint64))
    assert rc == 1 and rec == len(recs)     # TV2_E_TRUNCATED at the missing record
