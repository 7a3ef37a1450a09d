"""The V6 key free/re-allocate flaw (why V6 was withdrawn, May 2021).

pks_key_free() resets only the *calling* task's rights. A worker that had
made the key read/write keeps that right after the key is handed to a new
owner, although the allocator promises access is disabled for a newly
allocated key. This is the series' design flaw, reproduced on purpose.

Run: python examples/kernel_v6_free_realloc.py
"""
from __future__ import annotations

import pks_emu
from pks_emu.kernel import Kernel, KernelOops


def main() -> None:
    k = Kernel(pks_emu.Machine(ncpus=2), api="v6")
    owner = k.create_task("driver-a", 0)
    worker = k.create_task("driver-a-worker", 1)
    k.schedule(0, owner)
    k.schedule(1, worker)

    with k.on_cpu(owner):
        key = k.alloc_key("driver A")
        k.pks_mk_readwrite(key)
    with k.on_cpu(worker):
        k.pks_mk_readwrite(key)              # the worker shares the domain
    print(f"driver A owns key {key}; owner and worker have RW")

    with k.on_cpu(owner):
        k.pks_key_free(key)                  # resets the owner's rights only
        new = k.alloc_key("driver B")
    print(f"key {key} freed and re-allocated to driver B as key {new}")
    secret = k.vmalloc(4096, new)
    b = k.create_task("driver-b", 0)
    k.schedule(0, b)
    with k.on_cpu(b):
        k.pks_mk_readwrite(new)              # driver B opens its window...
        k.write_bytes(b, secret, b"B's data")
        k.pks_mk_noaccess(new)               # ...and closes it
    k.schedule(0, owner)

    try:
        k.read_bytes(owner, secret, 8)
    except KernelOops as oops:
        print(f"driver A's owner task: oops on key {oops.pkey} (access disabled, as promised)")
    data = k.read_bytes(worker, secret, 8)
    print(f"driver A's worker still reads driver B's page: {data!r}")
    print(f"worker's saved_pkrs = {worker.thread.saved_pkrs:#010x} (key {new}: "
          f"{(worker.thread.saved_pkrs >> 2 * new) & 3} = RW)")


if __name__ == "__main__":
    main()
