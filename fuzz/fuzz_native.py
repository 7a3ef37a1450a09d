"""Fuzz the native trace reader (v1): header, CPU states, memory image,
record validation, and a replay of what passes (tiny traces only).

Two modes, chosen by the first byte: below 0x80 the input is the whole file
(the header parser); otherwise the rest of the input is records appended to
a valid header and memory image (one of the seed traces', with the record
count fixed up), so that the mutations reach record validation and the
compiled replay loop instead of dying at the header checks.

Run: python fuzz/fuzz_native.py [libFuzzer flags] CORPUS_DIR...
"""
from __future__ import annotations

import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["pks_emu"]):
    from pks_emu.cli.info import describe
    from pks_emu.trace.format import HEADER, RECORD_SIZE, read_header
    from pks_emu.trace.replay import replay

sys.path.insert(0, os.path.dirname(__file__))
from _common import main, write  # noqa: E402

#: replays stop after this many faults (a trace of faults is still replayed whole)
MAX_FAULTS = 64


_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "native")
#: (header and sections up to the records) of each seed trace
TEMPLATES = []
for _name in sorted(os.listdir(_CORPUS)) if os.path.isdir(_CORPUS) else []:
    with open(os.path.join(_CORPUS, _name), "rb") as _f:
        _raw = _f.read()
    try:
        _fields = list(HEADER.unpack_from(_raw))
    except struct.error:
        continue
    _rec_off = _fields[11]
    if _raw[:8] == b"PKSEMUTR" and _rec_off <= len(_raw):
        TEMPLATES.append((_fields, _raw[HEADER.size:_rec_off]))


def build(data: bytes) -> bytes:
    """A trace of the template's header and memory with ``data`` as records."""
    fields, body = TEMPLATES[data[0] % len(TEMPLATES)]
    recs = data[1:]
    n = len(recs) // RECORD_SIZE
    fields = list(fields)
    fields[10] = n                                        # record_count
    return HEADER.pack(*fields) + body + recs[:n * RECORD_SIZE]


def check(data: bytes) -> None:
    if data and data[0] >= 0x80 and TEMPLATES:
        data = build(data)
    path = write("t.pkt", data)
    header = read_header(path)              # TraceFormatError or a valid header
    d = describe(path, chunk_records=7)     # validates every record, in odd-sized chunks
    assert d["records"] == header.record_count
    r = replay(path, max_faults=MAX_FAULTS, chunk_records=5)
    assert r.records_replayed <= header.record_count
    assert len(r.faults) <= MAX_FAULTS
    if not r.stopped_early:
        assert r.records_replayed == header.record_count


if __name__ == "__main__":
    main(check)
