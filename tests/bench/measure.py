#!/usr/bin/env python3
"""Runs one command and reports its wall time and its own peak RSS (stdlib only).

    python3 -I -S tests/bench/measure.py [--stdout FILE] [--stderr FILE] -- CMD [ARG...]

prints one JSON line: exit (the child's exit code, or -SIGNAL), wall_s, user_s,
sys_s, maxrss_kib (the child's peak resident set, from os.wait4's rusage of that one
child) and floor_kib (see below). The exit code of this script is 0 when the child
was run and measured, whatever the child's own exit code; 2 on a usage error.

Why a fresh interpreter, and what `floor_kib` is: on Linux a child's ru_maxrss
starts at the peak RSS of the memory image that exec replaced, i.e. the parent's
image it was forked (or vforked) from. Measured from a big harness, even `true`
"peaks" at the harness's size. Run from this small fresh interpreter (-I -S: no
site packages), the reported peak is max(child's own peak, floor_kib), where
floor_kib is this interpreter's own peak (VmHWM, about 9 MiB), read just before the
spawn. A reported maxrss_kib close to floor_kib means "at most this much".
"""

import os
import sys
import time


def vm_hwm_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main(argv):
    out_path = err_path = os.devnull
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] in ("--stdout", "--stderr") and i + 1 < len(argv):
            if argv[i] == "--stdout":
                out_path = argv[i + 1]
            else:
                err_path = argv[i + 1]
            i += 2
        else:
            print(f"measure.py: unknown argument '{argv[i]}'", file=sys.stderr)
            return 2
    cmd = argv[i + 1 :]
    if not cmd:
        print("usage: measure.py [--stdout FILE] [--stderr FILE] -- CMD [ARG...]", file=sys.stderr)
        return 2

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out_path, flags, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, err_path, flags, 0o644),
    ]
    floor = vm_hwm_kib()
    t0 = time.perf_counter()
    try:
        pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=actions)
    except OSError as e:
        print(f"measure.py: cannot run '{cmd[0]}': {e}", file=sys.stderr)
        return 2
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    import json  # after the spawn: keeps this interpreter (the floor) small

    print(
        json.dumps(
            {
                "exit": code,
                "wall_s": wall,
                "user_s": ru.ru_utime,
                "sys_s": ru.ru_stime,
                "maxrss_kib": ru.ru_maxrss,  # KiB on Linux
                "floor_kib": floor,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
