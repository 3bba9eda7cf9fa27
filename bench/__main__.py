"""``make bench``: run every benchmark module in a fixed order (or the ones named on the command line)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time

ORDER = ("packager", "serving", "memory", "fleet", "fleet_scale", "cloud", "fpga", "lean", "delta")


def main(argv: list[str]) -> int:
    names = argv or [n for n in ORDER if importlib.util.find_spec(f"bench.{n}") is not None]
    failed = []
    for name in names:
        print(f"\n##### bench/{name}.py", flush=True)
        start = time.monotonic()
        try:
            importlib.import_module(f"bench.{name}").main()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            print(f"bench/{name} failed: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
        print(f"##### bench/{name}.py took {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
