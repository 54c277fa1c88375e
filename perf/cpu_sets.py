"""CPU lists (for taskset -c) of disjoint physical cores: `python perf/cpu_sets.py 1 2 1` prints three
lists, the first with every logical CPU of one physical core, the second of the next two, and so on.
Physical cores are told apart by (package, core id) from /sys (hyperthread siblings share both)."""

from __future__ import annotations

import collections
import glob
import os
import sys


def physical_cores() -> list[list[int]]:
    cores: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology"), key=lambda p: int(p.split("cpu")[-1].split("/")[0])):
        cpu = int(path.split("/")[-2][3:])
        if cpu not in os.sched_getaffinity(0):
            continue
        with open(f"{path}/physical_package_id") as f, open(f"{path}/core_id") as g:
            cores[(f.read().strip(), g.read().strip())].append(cpu)
    return list(cores.values())


def main(counts: list[int]) -> None:
    cores = physical_cores()
    if sum(counts) > len(cores):
        sys.exit(f"asked for {sum(counts)} physical cores, this machine has {len(cores)}")
    lists, at = [], 0
    for n in counts:
        lists.append(",".join(str(cpu) for core in cores[at : at + n] for cpu in core))
        at += n
    print(" ".join(lists))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
