"""JSON lines as the benchmarks write them (one object per line), for the tools that pair them."""

import json
import sys


def read_rows(path, keep):
    """The objects of the JSON-lines file `path` for which `keep(row)` is true, in file order;
    blank lines are skipped, and a line that is not JSON ends the program naming file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                sys.exit(f"{path}:{n}: not JSON ({e})")
            if keep(r):
                out.append(r)
    return out
