"""Which behaviour belongs to which posting of the Linux PKS series.

The series changed its API three times (docs/rules.md §2.1, §2.2); the
emulated kernel models three of its shapes:

* ``v6`` (same code in V4, V5, V6; lore 20210401225833.566238-1): the dynamic
  key allocator, ``pks_mk_noaccess/readonly/readwrite``, ``thread.saved_pkrs``,
  ``extended_pt_regs``, exec resets the thread value, user-mode exception
  entry does not save.
* ``v7`` (lore 20210804043231.2655537-1): static consumer keys,
  ``pks_abandon_protections``, ``(address, write)`` fault callbacks, the
  allowed mask ANDed in wherever PKRS is set.
* ``v10`` (same API as V9; lore 20220419170649.1022246-1): ``pks_set_*``,
  ``pks_update_protection``, ``pks_update_exception``, ``(regs, address,
  write)`` fault callbacks, ``PKS_KEY_*`` assignment, ``thread.pkrs``, every
  exception entry saves, exec keeps the value.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiVersion:
    """Feature switches of one posting (read them, do not build your own)."""

    name: str
    #: V1-V6 dynamic allocator (pks_key_alloc/pks_key_free)
    dynamic_keys: bool
    #: V7 abandon mechanism (allowed mask, handle_abandoned_pks_value)
    abandon: bool
    #: pks_mk_readonly exists (dropped in V8)
    has_readonly: bool
    #: pks_mk_* (V1-V8) rather than pks_set_* (V9+)
    mk_names: bool
    #: pks_update_exception / (regs, address, write) callbacks (V8+)
    update_exception: bool
    #: exec resets the thread value through pks_init_task (V4-V7; V10 has no hook)
    exec_resets: bool
    #: exception entry from user mode saves and restores too (V8+, "Cover entry
    #: from user space as well")
    save_user_entry: bool
    #: pks_setup does an unconditional WRMSR before the cached write (V8+)
    unconditional_boot_wrmsr: bool
    #: the PKS test module has the V4-V7 pks_test_callback hook in the fault path
    test_callback_hook: bool
    #: name of the thread_struct field (V4-V7 saved_pkrs, V9/V10 pkrs)
    thread_field: str

    def __str__(self) -> str:
        return self.name


V6 = ApiVersion("v6", dynamic_keys=True, abandon=False, has_readonly=True, mk_names=True,
                update_exception=False, exec_resets=True, save_user_entry=False,
                unconditional_boot_wrmsr=False, test_callback_hook=True,
                thread_field="saved_pkrs")
V7 = ApiVersion("v7", dynamic_keys=False, abandon=True, has_readonly=True, mk_names=True,
                update_exception=False, exec_resets=True, save_user_entry=False,
                unconditional_boot_wrmsr=False, test_callback_hook=True,
                thread_field="saved_pkrs")
V10 = ApiVersion("v10", dynamic_keys=False, abandon=False, has_readonly=False, mk_names=False,
                 update_exception=True, exec_resets=False, save_user_entry=True,
                 unconditional_boot_wrmsr=True, test_callback_hook=False,
                 thread_field="pkrs")

#: accepted spellings: V4 and V5 carry the V6 code, V9 the V10 API
_ALIASES = {"v4": V6, "v5": V6, "v6": V6, "v7": V7, "v9": V10, "v10": V10}


def parse_api(api: str | ApiVersion) -> ApiVersion:
    """The ApiVersion for ``"v6"``, ``"v7"`` or ``"v10"`` (also ``"v4"``, ``"v5"``, ``"v9"``)."""
    if isinstance(api, ApiVersion):
        return api
    key = str(api).strip().lower()
    if not key.startswith("v"):
        key = "v" + key
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(f"api {api!r} not modelled: expected one of 'v6', 'v7', 'v10' "
                         f"(or 'v4'/'v5' for the V6 code, 'v9' for the V10 API)") from None
