"""Instructions per record of the compiled replay loop, counted by callgrind
(exact, whatever the machine's load).

    python benchmarks/calibration/replay_ir.py hit          # make_hit_trace, 2.02 M records
    python benchmarks/calibration/replay_ir.py control      # ReplayControlRecords' shapes

``hit``: the whole replay of a TLB-resident trace with one WRMSR IA32_PKRS
per 100 accesses, divided by its records. ``control``: per record kind, the
difference between a 400 k and a 200 k record trace, over 200 k (what the
loop costs per record, start-up and chunking cancelled out).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ["wrmsr", "wrpkru", "switch_same_pkrs", "switch_different_pkrs", "exception_pairs"]


def _ir(args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="pks-emu-ir-") as d:
        out = os.path.join(d, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                        "--toggle-collect=*ReplayEngine__run*", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--child", *args],
                       check=True, capture_output=True)
        with open(out) as f:
            return int(re.search(r"^(?:summary|totals):\s+(\d+)", f.read(), re.M).group(1))


def _child(args: list[str]) -> None:
    from pks_emu.trace.replay import replay
    what, n, path = args[0], int(args[1]), args[2]
    if not os.path.exists(path):
        if what == "hit":
            from pks_emu.bench import make_hit_trace
            make_hit_trace(path, n)
        else:
            sys.path.insert(0, ROOT)
            from benchmarks.bench_replay import HIT_PAGES, _control_records, mapped_machine
            from pks_emu.trace.writer import TraceWriter
            m, _ = mapped_machine(4, HIT_PAGES)
            with TraceWriter(path, m, max_tasks=2) as w:
                w.extend(_control_records(what, n))
    replay(path)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        _child(argv[1:])
        return 0
    with tempfile.TemporaryDirectory(prefix="pks-emu-ir-") as d:
        if not argv or argv[0] == "hit":
            path = os.path.join(d, "hit.pkt")
            _child(["hit", "2000000", path])          # written outside callgrind
            print(f"replay_hit: {_ir(['hit', '2000000', path]) / 2_020_000:.1f} instructions/record")
        if not argv or argv[0] == "control":
            for kind in KINDS:
                ir = []
                for n in (200_000, 400_000):
                    path = os.path.join(d, f"{kind}-{n}.pkt")
                    _child([kind, str(n), path])
                    ir.append(_ir([kind, str(n), path]))
                print(f"{kind}: {(ir[1] - ir[0]) / 200_000:.1f} instructions/record")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
