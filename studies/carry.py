"""Carry stored studies across a change to the shared code that leaves every stored run as it was.

Every stored row is fingerprinted with the code it ran, the shared packages included (core,
assets, foundations, simulation), so any change there makes every study stale, also one that
cannot change a single number (a new hook whose default does nothing). This script marks as
current the rows that were current at ``--base`` (the commit before the change) and records in
each row's provenance the old fingerprint, the base and the reason. Use it only after checking
that the change is neutral, and say how in ``--reason``: for instance, the same run at the base
and now, compared number by number. Rows that were stale at the base stay stale.

    python studies/carry.py --base b5bcf52 --reason "..." part2 part3 testbed deviations
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedlora_edu.studies import carry_forward, read_rows, stale_rows  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit before the neutral change")
    parser.add_argument("--reason", required=True, help="what changed and how its neutrality was checked")
    parser.add_argument("studies", nargs="+", help="study names (fedlora_edu/results/<name>.jsonl)")
    args = parser.parse_args(argv)
    for name in args.studies:
        try:
            carried = carry_forward(name, args.base, args.reason)
        except ValueError as error:
            parser.error(str(error))
        print(f"{name}: {carried} of {len(read_rows(name))} rows carried; still stale: {len(stale_rows(name))}")


if __name__ == "__main__":
    main()
