"""``pks-emu selftest``: the PKS series' own test suite on the emulated kernel."""
from __future__ import annotations

import argparse
import errno

from ..errors import PksEmuError
from ..kernel.boot import Kernel
from ..kernel.selftest import Runner, parse_features, test_table
from ..machine import Machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tests", nargs="*", metavar="TEST",
                        help="tests to run (default: all but the crash test)")
    parser.add_argument("--api", default="v6", choices=("v6", "v7", "v10"),
                        help="series version of the emulated kernel (default v6)")
    parser.add_argument("--features", default=None, metavar="LIST",
                        help="CPU features: a comma list (exact set), or changes to the "
                             "full set such as --features=-pks")
    parser.add_argument("--ncpus", type=int, default=2, help="CPUs of the machine (default 2)")
    parser.add_argument("-c", "--cpu", type=int, default=0,
                        help="CPU the test processes run on (clamped to the last CPU)")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="print the kernel log of each test (dmesg | grep pks_test)")
    parser.add_argument("--all-keys", action="store_true",
                        help="V10: build with CONFIG_PKS_TEST_ALL_KEYS (enables run_all)")
    parser.add_argument("-l", "--list", action="store_true", help="list the tests and exit")


def run(args: argparse.Namespace) -> int:
    features = parse_features(args.features)
    if not 1 <= args.ncpus <= 256:
        raise PksEmuError(f"--ncpus {args.ncpus}: expected 1..256")
    if args.all_keys and args.api != "v10":
        raise PksEmuError("--all-keys (CONFIG_PKS_TEST_ALL_KEYS) exists only with --api v10")
    machine = Machine(ncpus=args.ncpus, features=features)
    kernel = Kernel(machine, api=args.api, pks_test_all_keys=args.all_keys)
    default, special = test_table(args.api)
    known = dict(default + special)
    if args.list:
        for name, _ in default:
            print(name)
        for name, _ in special:
            print(f"{name}\t(only when named)")
        return 0
    runner = Runner(kernel, args.cpu, args.debug)
    names = args.tests or [n for n, _ in default]
    failed = False
    for name in names:
        if name not in known:
            print(f"[RUN]\t'{name}'")
            print("[SKIP]\tInvalid test")
            return 1
        print(f"[RUN]\t{name}")
        start = len(kernel.dmesg)
        how = known[name]
        if how == "ctx10":
            r = runner.context_switch_v10()
        elif how == "ctx6":
            r = runner.context_switch_v6()
        elif how == "all6":
            r = runner.run_all_v6()
        elif how == "crash":
            r = runner.crash()
        else:
            r = runner.do_simple_test(how)
        if args.debug:
            for lvl, msg in kernel.dmesg[start:]:
                print(f"  [{lvl}] {msg}")
        if r == 0:
            print("[OK]")
        elif r == -errno.ENOENT:
            print("[SKIP] Test not supported")
        else:
            print("[FAIL]")
            failed = True
    return 1 if failed else 0
