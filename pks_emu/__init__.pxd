# cython: language_level=3
"""Cython API of pks_emu.

With this file, ``cimport pks_emu`` gives the public C-level names below and
``from pks_emu cimport _core`` gives the whole core declaration file. The
interface (``noexcept nogil`` functions on a ``pks_cpu_t*``, return
conventions, constants) is documented in ``_core.pxd`` and
docs/embedding.md. Callers must pass a kind of 0..2 and a size of 1..4096:
the core does not check them again inside its GIL-free loops.
"""
from pks_emu._core cimport (CPU, PKS_FETCH, PKS_GP, PKS_OK, PKS_READ, PKS_UD, PKS_WRITE,
                            PhysicalMemory, cpu_state_of, pks_access, pks_cpu_t, pks_flush_tlb,
                            pks_invlpg, pks_rdmsr, pks_rdpkru, pks_translate, pks_write_cr0,
                            pks_write_cr3, pks_write_cr4, pks_wrmsr, pks_wrpkru)
