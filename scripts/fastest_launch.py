"""The fastest launch of one kernel variant in a benchmarks.kernels log: prints "BLOCK_N, WARPS, STAGES" (nothing
when no line of that variant timed), for gpu-round.sh to set before a bulk run."""

import json
import re
import sys


def fastest(log: str, variant: str) -> str:
    pattern = re.compile(re.escape(variant) + r", block_n (\d+), warps (\d+), stages (\d+) (\{.*\})$")
    timed = []
    for line in log.splitlines():
        if (m := pattern.match(line)) and "ms" in (row := json.loads(m.group(4))):
            timed.append((row["ms"], f"{m.group(1)}, {m.group(2)}, {m.group(3)}"))
    return min(timed)[1] if timed else ""


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(fastest(f.read(), sys.argv[2]))
