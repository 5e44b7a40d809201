"""``fieldnode power``: the governor for technicians and operators, offline.

* ``fieldnode power status`` reads this board (or ``--root DIR``, or a fresh virtual board with ``--sim
  PROFILE``) through the same drivers the agent uses, and prints the snapshot, the cpufreq policies, the
  throttle flags and which level the configured policy calls for, with its reason.
* ``fieldnode power simulate`` runs the configured policy in closed loop on a virtual board profile
  (hours of board time in seconds) in one of the scenarios of :mod:`power.scenarios`, against every static
  plan and the kernel's own cpufreq governors, so a policy can be tried before it is flashed onto a fleet.
"""

from __future__ import annotations

import json
import os
import tempfile

from device.errors import Exit, UsageError
from drivers.sim.profiles import PROFILES

SCENARIOS = ("hot", "rate", "rate-light", "target", "solar", "plug")  # power.scenarios.SCENARIOS, without its import


def add_arguments(p) -> None:
    from device.cliargs import sim_argument, subcommand_parents

    sub = p.add_subparsers(dest="power_command", metavar="{status,simulate}")
    sub.required = True
    st = sub.add_parser("status", help="read the board's power and thermal state and the level it calls for",
                        parents=subcommand_parents())
    where = st.add_mutually_exclusive_group()
    where.add_argument("--root", help="sysfs root to read (default: drivers.sysfs_root, else /)")
    sim_argument(where, "read a fresh simulated board of this profile instead (default rpi4)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    sim = sub.add_parser("simulate", help="run the configured policy on a virtual board, against every static plan "
                                          "and the kernel's own governors", parents=subcommand_parents())
    sim.add_argument("--sim", "--profile", dest="profile", choices=sorted(PROFILES), default="rpi4", metavar="PROFILE",
                     help=f"the virtual board profile (as --sim in run and demo; default rpi4): "
                          f"{', '.join(sorted(PROFILES))}")
    sim.add_argument("--scenario", choices=SCENARIOS, default="hot",
                     help="hot (40 C, mains), rate (windows at a fixed rate, on battery), rate-light, target (a "
                          "12-hour runtime target), solar (3 days of sun and night) or plug (default hot)")
    sim.add_argument("--quick", action="store_true", help="fewer simulated hours: a smoke run, not the figures")
    sim.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from device.cliargs import load_config
    from power.policy import Policy

    cfg = load_config(args)
    policy = Policy.from_config(cfg.power)
    if args.power_command == "status":
        return _status(args, cfg, policy)
    return _simulate(args, policy)


def _status(args, cfg, policy) -> int:
    from drivers import thermal, throttle
    from drivers.cpufreq import CpuFreq
    from drivers.sysfs import Sysfs, resolve_root
    from power.governor import Governor
    from power.snapshot import BoardReader

    tmp = None
    if args.sim:
        from drivers.sim.board import VirtualBoard

        tmp = tempfile.TemporaryDirectory(prefix="fieldnode-board-")
        fs = VirtualBoard(tmp.name, args.sim).fs
    else:
        fs = Sysfs(args.root or resolve_root(cfg.drivers.sysfs_root))
        if not os.path.isdir(fs.root):
            raise UsageError(f"status: sysfs root {fs.root} is not a directory")
    try:
        policies = CpuFreq(fs).policies()
        snap = BoardReader(fs).read()
        freqs = policies[0].frequencies_khz if policies else ()
        gov = Governor(policy, lambda: snap, frequencies_khz=freqs)
        plan = gov.step()
        out = {
            "root": fs.root, "simulated": bool(args.sim), "virtual_board": args.sim, "snapshot": snap.to_dict(),
            "thermal_zones": [{"zone": z.name, "type": z.type, "temp_c": z.temp_c} for z in thermal.read_zones(fs)],
            "throttle": None if snap.throttle is None else snap.throttle.describe(),
            "cpufreq": [{"policy": p.name, "cpus": list(p.cpus), "min_khz": p.min_khz, "max_khz": p.max_khz,
                         "scaling_max_khz": p.scaling_max_khz, "cur_khz": p.cur_khz, "governor": p.governor}
                        for p in policies],
            "level": plan.level.label, "reason": plan.reason, "plan": plan.to_dict(),
        }
        if fs.root == "/":
            mode = throttle.read_nvpmodel()
            out["nvpmodel"] = None if mode is None else {"id": mode.id, "name": mode.name}
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(out))
        return Exit.OK
    s = out["snapshot"]
    if args.sim:
        print(f"SIMULATED board {args.sim} (a fresh virtual board, not this machine): sysfs root {out['root']}")
    else:
        print(f"sysfs root: {out['root']}")
    print(f"temperature: {_v(s['temp_c'], ' C')} ({s['temp_source'] or 'no thermal zone'})")
    print(f"battery: {_v(s['battery_pct'], ' %')}, charging: {_v(s['charging'])}, external power: "
          f"{_v(s['on_external_power'])}")
    print(f"firmware throttle: {out['throttle'] or 'not reported on this board'}")
    for p in out["cpufreq"]:
        print(f"cpufreq {p['policy']} (cpus {_v(p['cpus'])}): {p['min_khz'] // 1000}-{p['max_khz'] // 1000} MHz, cap "
              f"{_v(p['scaling_max_khz'])} kHz, now {_v(p['cur_khz'])} kHz, governor {p['governor']}")
    if not out["cpufreq"]:
        print("cpufreq: no policies (the governor will not cap the CPU)")
    if out.get("nvpmodel"):
        print(f"nvpmodel: {out['nvpmodel']['name']} ({out['nvpmodel']['id']})")
    print(f"policy calls for: {out['level']} ({out['reason']})")
    return Exit.OK


def _v(value, unit: str = "") -> str:
    from device.cliargs import for_people

    return for_people(value, unit)


def _simulate(args, policy) -> int:
    from power import scenarios

    line, _traces = scenarios.run(args.scenario, policy, args.profile, quick=args.quick)
    if args.json:
        print(json.dumps(line))
        return Exit.OK
    print(f"SIMULATED {args.profile}, scenario {args.scenario}{' (quick)' if args.quick else ''}: the configured "
          f"policy against every static plan and the kernel's own governors on the same virtual board")
    if "error" in line:
        print(f"  could not run: {line['error']}")
        return Exit.FAILED
    if args.scenario == "plug":
        print(f"  critical at {line['critical_at_s']} s, mains plugged at {line['plugged_at_s']} s, back to performance "
              f"after {_v(line['return_s'], ' s')} (target {line['target_return_s']} s: {'met' if line['met'] else 'not met'})")
        return Exit.OK
    unit = line["figure"]
    print(f"  governed:    {line['governed']:,.2f} {unit}")
    for who in ("static", "kernel"):
        print(f"  best {who + ':':<8} {_v(line[f'best_{who}_value'])} {unit} ({_v(line[f'best_{who}'])}); governed is "
              f"{_v(line[f'ratio_vs_best_{who}'])}x")
    extra = {k: v for k, v in line.items() if k not in _LINE_KEYS}
    print("  " + ", ".join(f"{k} {_v(v)}" for k, v in extra.items()))
    print(f"  target met: {_v(line['met'])}")
    return Exit.OK


_LINE_KEYS = {"scenario", "profile", "ratio_vs_best_static", "ratio_vs_best_kernel", "best_static", "best_kernel",
              "figure", "governed", "best_static_value", "best_kernel_value", "met"}
