"""The V10 handler-recomputes-from-interrupted-value flaw (docs/rules.md §2.8, note 1).

On exception entry V10 loads PKS_INIT_VALUE into the MSR but leaves
current->thread.pkrs holding the interrupted context's value. A
pks_set_*() inside the handler computes from thread.pkrs, so after one such
call the handler runs with the interrupted context's rights on *every*
other key, not the defaults. On exit those changes are dropped (only
pks_update_exception() reaches the interrupted context). The V10 exception
test checks only the key it changes, so it does not see this.

Run: python examples/kernel_v10_handler_recompute.py
"""
from __future__ import annotations

import pks_emu
from pks_emu.kernel import Kernel


def rights(value: int, key: int) -> str:
    return {0: "RW", 1: "AD", 2: "WD", 3: "AD|WD"}[(value >> 2 * key) & 3]


def main() -> None:
    # three consumers, each with an access-disabled default (PKS_DECLARE_INIT_VALUE)
    ad = pks_emu.PKEY_DISABLE_ACCESS
    k = Kernel(pks_emu.Machine(), api="v10",
               consumers=[("SECRETS", ad), ("PGTABLES", ad), ("IRQ_BUF", ad)])
    t = k.create_task("kthread", 0)
    k.schedule(0, t)
    a, b, c = k.PKS_KEY_SECRETS, k.PKS_KEY_PGTABLES, k.PKS_KEY_IRQ_BUF
    with k.on_cpu(t):
        k.pks_set_readwrite(a)
        k.pks_set_readwrite(b)
        k.pks_set_noaccess(c)
    print(f"interrupted context: key {a} {rights(t.thread.pkrs, a)}, key {b} "
          f"{rights(t.thread.pkrs, b)}")
    with k.exception(0) as regs:
        msr = k.rdmsr_pkrs()
        print(f"handler entry, MSR {msr:#010x}: key {a} {rights(msr, a)}, key {b} "
              f"{rights(msr, b)} (PKS_INIT_VALUE = {k.PKS_INIT_VALUE:#x})")
        k.pks_set_readwrite(c)               # the handler opens one key...
        msr = k.rdmsr_pkrs()
        print(f"after pks_set_readwrite({c}), MSR {msr:#010x}: key {a} {rights(msr, a)}, "
              f"key {b} {rights(msr, b)}   <- the interrupted rights came back")
        print(f"aux slot (restored on exit): {regs.aux.pkrs:#010x}")
    print(f"after exit: key {c} {rights(k.rdmsr_pkrs(0), c)} (the handler's change is gone)")


if __name__ == "__main__":
    main()
