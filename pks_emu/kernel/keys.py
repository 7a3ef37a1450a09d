"""Protection-key ownership: the V4-V6 allocator and the V7/V10 static keys.

* V4-V6 (``arch/x86/mm/pkeys.c``, docs/rules.md §2.3): a 16-bit bitmap with key 0
  (``PKS_KERN_DEFAULT_KEY``) pre-set and named "kernel"; ``pks_key_alloc``
  hands out the lowest free key, ``-EOPNOTSUPP`` without PKS, ``-ENOSPC``
  when full; the name is kept for debugging exhaustion.
* V7 (05/18): ``enum pks_pkey_consumers`` — ``PKS_KEY_DEFAULT`` = 0, then one
  key per enabled consumer, ``PKS_KEY_NR_CONSUMERS``; ``pkrs_init_value`` is
  built at boot from each consumer's default (docs/rules.md §2.5).
* V9/V10 (09/44, 37/44, 44/44): ``PKS_NEW_KEY`` chains keys densely in the
  order PGMAP_PROTECTION, TEST; ``PKS_KEY_MAX`` = last + 1 (16 with
  ``PKS_TEST_ALL_KEYS``); ``PKS_INIT_VALUE`` = the all-AD pattern masked to
  the keys at or above ``PKS_KEY_MAX``, ORed with each consumer's default.
"""
from __future__ import annotations

import errno
from collections.abc import Sequence

from ..constants import NR_PKEYS, PKEY_DISABLE_ACCESS, PKS_ALL_AD, PKS_INIT_VALUE, PKR_AD_KEY

#: name of key 0 in the V4-V6 allocator (PKS_KERN_DEFAULT_KEY)
KERNEL_KEY_NAME = "kernel"

#: V4-V6 INIT_PKRS_VALUE (pkeys_common.h): key 0 RW, keys 1..15 AD
INIT_PKRS_VALUE = PKS_INIT_VALUE

#: V7 PKRS_ALLOWED_MASK_DEFAULT
PKRS_ALLOWED_MASK_DEFAULT = 0xFFFFFFFF


class KeyAllocator:
    """The V4-V6 dynamic allocator (one per kernel)."""

    def __init__(self) -> None:
        self._names: list[str | None] = [None] * NR_PKEYS
        self._names[0] = KERNEL_KEY_NAME

    def alloc(self, name: str, pks_supported: bool, log) -> int:
        if not pks_supported:
            return -errno.EOPNOTSUPP
        if not isinstance(name, str):
            raise TypeError(f"pks_key_alloc name must be a str, got {type(name).__name__}")
        for key in range(1, NR_PKEYS):
            if self._names[key] is None:
                self._names[key] = name
                return key
        log("err", f"Cannot allocate supervisor key for {name}")
        return -errno.ENOSPC

    def free(self, key: int) -> bool:
        """Release ``key``; False (and nothing done) for key 0 or out of range."""
        if not isinstance(key, int) or key <= 0 or key >= NR_PKEYS:
            return False
        self._names[key] = None
        return True

    def owner(self, key: int) -> str | None:
        return self._names[key] if 0 <= key < NR_PKEYS else None

    def allocated(self) -> dict[int, str]:
        """Key -> name of every key in use, key 0 included (for debugging exhaustion)."""
        return {k: n for k, n in enumerate(self._names) if n is not None}


class StaticKeys:
    """The V7 enum or the V10 ``pks-keys.h`` chain, computed from the config.

    ``consumers`` is the ordered list of ``(NAME, default_rights)`` after key
    0; ``default_rights`` is 0 (RW) or ``PKEY_DISABLE_ACCESS``. Attributes
    ``PKS_KEY_<NAME>`` are set for each, plus ``PKS_KEY_DEFAULT`` and
    ``PKS_KEY_MAX`` (V10) / ``PKS_KEY_NR_CONSUMERS`` (V7).
    """

    def __init__(self, version: str, consumers: Sequence[tuple[str, int]],
                 all_keys: bool = False, *, pks_test: bool | None = None) -> None:
        self.version = version
        self.consumers = tuple(consumers)
        self.all_keys = all_keys
        self.names: dict[int, str] = {0: "PKS_KEY_DEFAULT"}
        self.PKS_KEY_DEFAULT = 0
        seen = set()
        for i, (name, rights) in enumerate(self.consumers, start=1):
            if not isinstance(name, str) or not name.isidentifier() or name.upper() != name:
                raise ValueError(f"consumer name {name!r} must be an upper-case identifier "
                                 f"such as 'PGMAP_PROTECTION'")
            if name in seen or name == "DEFAULT":
                raise ValueError(f"consumer name {name!r} given twice or reserved")
            if rights not in (0, PKEY_DISABLE_ACCESS):
                raise ValueError(f"consumer {name} default {rights!r}: expected 0 (RW) or "
                                 f"PKEY_DISABLE_ACCESS (AD), as PKS_DECLARE_INIT_VALUE allows")
            seen.add(name)
            if i >= NR_PKEYS:
                raise ValueError(f"{len(self.consumers)} consumers do not fit in 15 keys "
                                 "(V7 BUILD_BUG_ON(PKS_KEY_NR_CONSUMERS > PKS_NUM_PKEYS))")
            setattr(self, f"PKS_KEY_{name}", i)
            self.names[i] = f"PKS_KEY_{name}"
        last = len(self.consumers)
        self.nr_keys = NR_PKEYS if all_keys else last + 1
        if pks_test is None:
            pks_test = any(name in ("PKS_TEST", "TEST") for name, _ in self.consumers)
        self.pks_test = pks_test
        if version == "v7":
            self.PKS_KEY_NR_CONSUMERS = last + 1
            # create_initial_pkrs_value() (V7 05/18, lore
            # 20210804043231.2655537-6): consumer_defaults[] start AD, key 0
            # RW, then each consumer's default; with CONFIG_PKS_TEST the test
            # patch (V7 11/18, lore 20210804043231.2655537-12) then forces keys
            # 1..15 to AD whatever the other consumers declared: the test
            # configuration needs every key but the default one disabled.
            value = PKS_ALL_AD & ~0x3
            for i, (_name, rights) in enumerate(self.consumers, start=1):
                value = (value & ~(0x3 << 2 * i)) | (rights << 2 * i)
            if pks_test:
                value = (value & 0x3) | (PKS_ALL_AD & ~0x3)
            self.init_value = value
        else:
            self.PKS_KEY_MAX = self.nr_keys
            # GENMASK(32, 2*PKS_KEY_MAX) keeps the AD bits of unused keys;
            # with PKS_TEST_ALL_KEYS it keeps none (docs/rules.md §2.5).
            mask = ((1 << 33) - 1) & ~((1 << (2 * self.nr_keys)) - 1)
            value = PKS_ALL_AD & mask & 0xFFFFFFFF
            for i, (_name, rights) in enumerate(self.consumers, start=1):
                value |= rights << 2 * i
            self.init_value = value

    def owner(self, key: int) -> str | None:
        if self.all_keys and 1 <= key < NR_PKEYS and key not in self.names:
            return "PKS_KEY_TEST (PKS_TEST_ALL_KEYS)"
        return self.names.get(key)

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={k}" for k, n in sorted(self.names.items()))
        end = (f"PKS_KEY_NR_CONSUMERS={self.nr_keys}" if self.version == "v7"
               else f"PKS_KEY_MAX={self.nr_keys}")
        return f"<StaticKeys {self.version}: {body}, {end}, init {self.init_value:#010x}>"


def consumers_for(version: str, *, pks_test: bool, pmem: bool, all_keys: bool,
                  extra: Sequence[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    """The consumer list of a config, in the order the version assigns keys.

    V7 (11/18): the test key is ``PKS_KEY_PKS_TEST`` = 1; the place of the PMEM
    key in the V7 enum is not confirmed (docs/rules.md §3), it is put after the test
    key here. V10 (docs/rules.md §2.4): PGMAP_PROTECTION first, then TEST.
    """
    out: list[tuple[str, int]] = []
    if version == "v7":
        if pks_test and pmem:
            # V7 Kconfig (lib/Kconfig.debug): PKS_TEST "depends on ... &&
            # !GENERAL_PKS_USER", and DEVMAP_ACCESS_PROTECTION (the PMEM user)
            # selects GENERAL_PKS_USER: the test and PMEM cannot both be built.
            raise ValueError("V7: PKS_TEST depends on !GENERAL_PKS_USER, which the PMEM consumer "
                             "(DEVMAP_ACCESS_PROTECTION) selects: use pks_test=False with pmem=True")
        if pks_test:
            out.append(("PKS_TEST", PKEY_DISABLE_ACCESS))
        if pmem:
            out.append(("PGMAP_PROTECTION", PKEY_DISABLE_ACCESS))
    else:
        if all_keys and (pmem or extra):
            raise ValueError("PKS_TEST_ALL_KEYS depends on !ARCH_ENABLE_PKS_CONSUMER: "
                             "it cannot be combined with pmem or other consumers")
        if all_keys and not pks_test:
            raise ValueError("PKS_TEST_ALL_KEYS depends on PKS_TEST")
        if pmem:
            out.append(("PGMAP_PROTECTION", PKEY_DISABLE_ACCESS))
        if pks_test:
            out.append(("TEST", PKEY_DISABLE_ACCESS))
    out.extend(extra)
    return out


def pkr_ad_all(first: int = 1) -> int:
    """AD for keys ``first``..15 (helper for docs and tests)."""
    v = 0
    for k in range(first, NR_PKEYS):
        v |= PKR_AD_KEY(k)
    return v
