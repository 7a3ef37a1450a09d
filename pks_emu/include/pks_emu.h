/*
 * pks_emu.h - C ABI of pks_emu, for C and C++ simulators.
 *
 * The compiled module pks_emu._capi exports a PyCapsule named
 * "pks_emu._capi.PKS_EMU_C_API" that holds a pointer to a pks_emu_c_api
 * table. Call pks_emu_import() once (with the GIL held, e.g. in your
 * module's init function, as numpy's import_array), then call through
 * PKS_EMU_API:
 *
 *     #include "pks_emu.h"        (include dir: pks_emu.get_include())
 *
 *     if (pks_emu_import() < 0) return NULL;          (ImportError is set)
 *     pks_emu_cpu cpu = PKS_EMU_API->cpu_handle(py_cpu_object);
 *     if (cpu == NULL) return NULL;                   (TypeError is set)
 *     uint64_t pa;
 *     int32_t r = PKS_EMU_API->access(cpu, va, PKS_EMU_WRITE, 8, 0, &pa);
 *     if (r == PKS_EMU_OK) ... else if (r >= 0) ... r is the #PF error code
 *
 * Everything in the table except cpu_handle may be called without the GIL,
 * but a CPU is not thread-safe: use one CPU from one thread at a time, and
 * keep a reference to the Python CPU object while you use its handle.
 *
 * Versioning (as numpy's C API): abi_version changes only when existing
 * entries change meaning or position; api_version grows when entries are
 * appended at the end of the table. pks_emu_import() fails with ImportError
 * if the ABI differs or the installed pks_emu is older than this header.
 */
#ifndef PKS_EMU_H
#define PKS_EMU_H

#include <Python.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PKS_EMU_C_ABI_VERSION 1u
#define PKS_EMU_C_API_VERSION 1u
#define PKS_EMU_CAPSULE_NAME "pks_emu._capi.PKS_EMU_C_API"

/* Access kinds (pks_emu.AccessKind). */
#define PKS_EMU_READ  0
#define PKS_EMU_WRITE 1
#define PKS_EMU_FETCH 2

/* Results. A value >= 0 returned by access/translate is a #PF error code. */
#define PKS_EMU_OK     (-1)   /* success (*pa is set)                       */
#define PKS_EMU_GP     (-2)   /* #GP(0): non-canonical address, bad MSR...  */
#define PKS_EMU_UD     (-3)   /* #UD: WRPKRU/RDPKRU with CR4.PKE=0          */
#define PKS_EMU_EINVAL (-4)   /* bad argument (kind, size, register id)     */

/* #PF error-code bits (SDM Vol. 3A §4.7). */
#define PKS_EMU_PF_P    (1u << 0)
#define PKS_EMU_PF_W    (1u << 1)
#define PKS_EMU_PF_U    (1u << 2)
#define PKS_EMU_PF_RSVD (1u << 3)
#define PKS_EMU_PF_I    (1u << 4)
#define PKS_EMU_PF_PK   (1u << 5)

#define PKS_EMU_MSR_IA32_EFER 0xC0000080u
#define PKS_EMU_MSR_IA32_PKRS 0x6E1u

/* Register ids for get_reg / set_reg. set_reg accepts only CPL and RFLAGS;
 * the others change through their architectural writers (write_cr*, wrmsr,
 * wrpkru), which apply the #GP checks and TLB flushes. */
#define PKS_EMU_REG_CPL           0
#define PKS_EMU_REG_RFLAGS        1
#define PKS_EMU_REG_CR0           2
#define PKS_EMU_REG_CR3           3
#define PKS_EMU_REG_CR4           4
#define PKS_EMU_REG_EFER          5
#define PKS_EMU_REG_PKRS          6
#define PKS_EMU_REG_PKRU          7
#define PKS_EMU_REG_LAST_FAULT_VA 8   /* CR2 of the last #PF                */
#define PKS_EMU_REG_LAST_PKEY     9   /* key of the last leaf, or -1 (as u64) */

typedef void *pks_emu_cpu;   /* opaque handle of a pks_emu.CPU */

typedef struct pks_emu_c_api {
    uint32_t abi_version;    /* PKS_EMU_C_ABI_VERSION of the installed pks_emu */
    uint32_t api_version;    /* PKS_EMU_C_API_VERSION of the installed pks_emu */
    uint64_t size;           /* sizeof(pks_emu_c_api) in the installed pks_emu */

    /* Needs the GIL. The handle of a pks_emu.CPU; NULL with TypeError set
     * if obj is not one. Valid while the CPU object is alive. */
    pks_emu_cpu (*cpu_handle)(PyObject *obj);

    /* A data access or fetch of size bytes (1..4096) at va, through the TLB,
     * with A/D updates: PKS_EMU_OK and *pa, PKS_EMU_GP, PKS_EMU_EINVAL, or the
     * #PF error code (CR2 via get_reg(PKS_EMU_REG_LAST_FAULT_VA)). */
    int32_t (*access)(pks_emu_cpu cpu, uint64_t va, int kind, uint32_t size,
                      int implicit, uint64_t *pa);
    /* One access within one 4-KiB page at a canonical va (no canonical
     * check, no counters of accesses): the inner step of access. */
    int32_t (*translate)(pks_emu_cpu cpu, uint64_t va, int kind, int implicit,
                         uint64_t *pa);

    int32_t (*wrmsr)(pks_emu_cpu cpu, uint32_t msr, uint64_t value);
    int32_t (*rdmsr)(pks_emu_cpu cpu, uint32_t msr, uint64_t *value);
    int32_t (*wrpkru)(pks_emu_cpu cpu, uint32_t eax, uint32_t ecx, uint32_t edx);
    int32_t (*rdpkru)(pks_emu_cpu cpu, uint32_t ecx, uint32_t *eax);
    int32_t (*write_cr0)(pks_emu_cpu cpu, uint64_t value);
    int32_t (*write_cr3)(pks_emu_cpu cpu, uint64_t value);
    int32_t (*write_cr4)(pks_emu_cpu cpu, uint64_t value);
    void (*invlpg)(pks_emu_cpu cpu, uint64_t va);
    void (*flush_tlb)(pks_emu_cpu cpu, int keep_global);

    int32_t (*get_reg)(pks_emu_cpu cpu, int reg, uint64_t *value);
    int32_t (*set_reg)(pks_emu_cpu cpu, int reg, uint64_t value);

    /* Host pointer of the 4-KiB physical frame holding pa, or NULL if it
     * was never written and create is 0. create=1 allocates a zeroed frame;
     * it returns NULL while a GIL-free batch uses the memory (busy) or when
     * out of memory. Frames never move while the machine is alive. */
    uint8_t *(*frame)(pks_emu_cpu cpu, uint64_t pa, int create);

    /* Needs the GIL. Bracket a GIL-free loop: while entered, Python-side
     * writes to the machine's memory raise MachineBusyError. */
    void (*enter_nogil)(pks_emu_cpu cpu);
    void (*leave_nogil)(pks_emu_cpu cpu);
} pks_emu_c_api;

#ifndef PKS_EMU_NO_IMPORT_HELPER  /* defined by pks_emu._capi itself */
/* One table pointer per translation unit, as numpy's PyArray_API. */
static const pks_emu_c_api *PKS_EMU_API = NULL;

/* Import pks_emu._capi and fetch its table. Returns 0, or -1 with
 * ImportError (or the error of the import) set. Needs the GIL. */
static inline int pks_emu_import(void)
{
    /* PyCapsule_Import imports only the top package and then looks up
     * attributes, so the submodule must be imported first. */
    PyObject *mod = PyImport_ImportModule("pks_emu._capi");
    if (mod == NULL)
        return -1;
    Py_DECREF(mod);
    const pks_emu_c_api *api =
        (const pks_emu_c_api *)PyCapsule_Import(PKS_EMU_CAPSULE_NAME, 0);
    if (api == NULL)
        return -1;
    if (api->abi_version != PKS_EMU_C_ABI_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "pks_emu C ABI version %u does not match the %u of the "
                     "pks_emu.h this module was built with; rebuild it",
                     (unsigned)api->abi_version, (unsigned)PKS_EMU_C_ABI_VERSION);
        return -1;
    }
    if (api->api_version < PKS_EMU_C_API_VERSION || api->size < sizeof(pks_emu_c_api)) {
        PyErr_Format(PyExc_ImportError,
                     "the installed pks_emu has C API version %u (table of %llu "
                     "bytes); this module needs version %u (%llu bytes): "
                     "upgrade pks_emu",
                     (unsigned)api->api_version, (unsigned long long)api->size,
                     (unsigned)PKS_EMU_C_API_VERSION,
                     (unsigned long long)sizeof(pks_emu_c_api));
        return -1;
    }
    PKS_EMU_API = api;
    return 0;
}
#endif /* PKS_EMU_NO_IMPORT_HELPER */

#ifdef __cplusplus
}
#endif

#endif /* PKS_EMU_H */
