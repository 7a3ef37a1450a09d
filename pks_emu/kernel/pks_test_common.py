"""What both generations of the ported ``lib/pks/pks_test.c`` share (V4-V7 in
``pks_test``, V9/V10 in ``pks_test_v10``): the debugfs file, the test
memory size, the access modes and the key check."""
from __future__ import annotations

from ..constants import PKEY_ACCESS_MASK

RUN_PKS = "/sys/kernel/debug/x86/run_pks"
PKS_TEST_MEM_SIZE = 4096

NO_ACCESS, RDWR, RDONLY = "No Access", "Read Write", "Read Only"

#: pkey_test_ary[]: (mode, write, exception expected)
PKEY_TEST_ARY = (
    (NO_ACCESS, True, True),
    (NO_ACCESS, False, True),
    (RDWR, True, False),
    (RDWR, False, False),
    (RDONLY, True, True),
    (RDONLY, False, False),
)


def check_pkey_val(pk_reg: int, pkey: int, expected: int) -> bool:
    return (pk_reg >> 2 * pkey) & PKEY_ACCESS_MASK == expected
