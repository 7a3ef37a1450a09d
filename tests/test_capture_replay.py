"""``pks-emu capture --policy``: a real boot streamed into the kernel replay in
one run, printing the replay's JSON document with a ``capture`` section.
Skips (with the reason) only when QEMU, the kernel, busybox or a C compiler
is absent; CI installs them."""
from __future__ import annotations

import json

from capture_marks import needs_busybox, needs_cc, needs_kernel, needs_qemu
from pks_emu.cli import main

pytestmark = [needs_qemu, needs_kernel, needs_busybox, needs_cc]


def test_capture_with_a_policy_prints_the_replay_document(tmp_path, capsys):
    pol = tmp_path / "direct-map.toml"
    # A key on the whole direct map, access-disabled: the kernel's own data
    # accesses through it must fault, with kernel functions as their sites.
    pol.write_text('[kernel]\npkrs = { 2 = "no-access" }\n\n[[region]]\nname = "direct map"\n'
                   'area = "direct-map"\npkey = 2\n')
    ks = tmp_path / "guest.kallsyms"
    code = main(["capture", "--policy", str(pol), "--kallsyms", str(ks), "--start", "user",
                 "--limit", "2000000", "--coalesce", "--json", "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(out)
    assert d["schema"] == "pks-emu-replay/2" and d["input_format"] == "kernel capture"
    assert d["records"] == d["records_replayed"] > 0
    assert d["capture"]["counts"]["records"] == d["records"]
    assert d["input"]["mapper"]["pages_mapped"] > 0
    # Every fault is a PK fault of key 2 (nothing else is under a key) ...
    assert d["fault_count"] > 0 and set(d["faults_by_pkey"]) == {"2"}
    # ... at a kernel instruction, named from the kallsyms the capture saved.
    assert ks.is_file() and d["sites"] and all(int(s["ip"], 16) >> 63 for s in d["sites"])
    assert any(s["symbol"] for s in d["sites"])


def test_speed_measures_both_boots(tmp_path, capsys):
    # One round: a counting boot and a boot captured into the replay, with the
    # writer thread and the replay thread niced. Times are not judged here
    # (docs/benchmarks.md reports them); what each run saw must agree.
    from pks_emu.capture.speed import format_speed, measure_speed
    pol = tmp_path / "direct-map.toml"
    pol.write_text('[kernel]\npkrs = { 2 = "read-only" }\n\n[[region]]\nname = "direct map"\n'
                   'area = "direct-map"\npkey = 2\n')
    d = measure_speed(policy=str(pol), repeat=1, writer_nice=5, replay_nice=19, start="user", save_kallsyms=False,
                      timeout=300)
    (c,), (p,) = d["count"], d["pipeline"]
    # two boots of the same guest: QEMU runs are not bit-identical, but close
    assert abs(p["accesses"] - c["accesses"]) < 0.02 * c["accesses"]
    assert 0 < p["records"] <= p["accesses"]          # --coalesce merges runs
    assert p["faults"] > 0                            # the kernel writes its direct map
    assert p["qemu_cpu_s"] > 0 and p["replay_cpu_s"] > 0 and c["qemu_cpu_s"] > 0
    assert d["ratio"] == p["wall_s"] / c["wall_s"]
    # QEMU's own peak, from its plugin: a guest of 512 MiB touches tens of MiB at least
    assert 20 < p["qemu_peak_rss_mib"] < 4096 and d["peak_rss_qemu_mib"] == p["qemu_peak_rss_mib"]
    assert 0 < p["pipe_buffer_peak_mib"] <= 257
    assert "ratio of the median wall times" in format_speed(d)
    code = main(["capture", "--speed", "--repeat", "0"])
    assert code != 0 and "--repeat 0: expected at least 1" in capsys.readouterr().err
