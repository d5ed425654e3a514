"""Write the dashboards: `python -m tools.dashboards [--check]`."""

from __future__ import annotations

import argparse
import sys

from tools.dashboards.definitions import rendered
from tools.dashboards.queries import DASHBOARDS_DIR as OUT
from tools.dashboards.queries import ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args()
    files = rendered()
    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (OUT / n).exists() or (OUT / n).read_text() != text
        ]
        if stale:
            sys.exit(f"stale dashboards {stale}: run `make dashboards` and commit the result")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {(OUT / name).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
