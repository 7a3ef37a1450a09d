"""Fuzz the address-space policy loader (TOML) and the machine it builds.

Run: python fuzz/fuzz_policy.py [libFuzzer flags] CORPUS_DIR...
"""
from __future__ import annotations

import os
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["pks_emu"]):
    from pks_emu.trace.policy import build_machine, load_policy

sys.path.insert(0, os.path.dirname(__file__))
from _common import main, write  # noqa: E402

#: pages the policy is applied to: low user space, the top of the lower half
#: (the canonical boundary), kernel space
PAGES = np.array([0x400, 0x401, 0x4a0c, 0x7ffffffff, 0x800000000, 0xffff800000000],
                 dtype=np.uint64)


def check(data: bytes) -> None:
    path = write("p.toml", data)
    policy = load_policy(path)
    machine, stats = build_machine(policy, PAGES)
    assert stats["pages_mapped"] + stats["pages_unmapped"] == len(PAGES)
    assert machine.cpus[0].cpl == policy.cpl


if __name__ == "__main__":
    main(check)
