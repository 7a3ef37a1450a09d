"""Fuzz the lackey reader (plain, gzip, xz, bzip2 by content): the whole-file
and chunked parsers must agree, and a conversion of what parses must replay.

Run: python fuzz/fuzz_lackey.py [libFuzzer flags] CORPUS_DIR...
"""
from __future__ import annotations

import os
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["pks_emu"]):
    from pks_emu.lackey import _read, iter_lackey
    from pks_emu.trace.convert import convert_lackey
    from pks_emu.trace.replay import replay

sys.path.insert(0, os.path.dirname(__file__))
from _common import main, scratch, write  # noqa: E402


def check(data: bytes) -> None:
    skip_bad = bool(data[:1]) and data[0] & 1 == 1
    path = write("t.lackey", data)
    # The readers of parse_lackey/iter_lackey, with small blocks (the 16-MiB
    # default would cost more than the parse) so that lines straddle blocks.
    whole = next(iter(_read(path, chunk_records=None, skip_bad=skip_bad, block_size=64,
                            max_line=200)))
    chunks = list(_read(path, chunk_records=2, skip_bad=skip_bad, block_size=37, max_line=200))
    assert chunks == [] or chunks[0].compression == whole.compression
    if len(data) < 64:
        list(iter_lackey(path, skip_bad=skip_bad))        # the public entry point too
    va = np.concatenate([c.va for c in chunks]) if chunks else np.empty(0, np.uint64)
    assert np.array_equal(va, whole.va)
    assert sum(c.lines for c in chunks) == whole.lines
    assert sum(c.bad_lines for c in chunks) == whole.bad_lines
    if len(whole) and len(whole) <= 4096 and data[0] & 6 == 0:   # a quarter of the inputs
        out = scratch("t.pkt")
        stats = convert_lackey(path, out, skip_bad=skip_bad)   # sizes > 4096: TraceFormatError
        assert stats["records_written"] == len(whole)
        r = replay(out, max_faults=64)
        assert r.records == len(whole)


if __name__ == "__main__":
    main(check)
