"""Print the README's bad-input table: each wrong input from tests/api/test_bad_input.py and tests/api/test_weights.py
(token / class weights, probability targets, LongCE) and the error it gets.

    python scripts/bad_input_table.py > /tmp/table.md
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "api"))

from test_bad_input import CASES as BASE_CASES  # noqa: E402
from test_weights import CASES as WEIGHT_CASES  # noqa: E402

CASES = list(BASE_CASES) + list(WEIGHT_CASES)


def main() -> None:
    print("| wrong input | exception | message |")
    print("|---|---|---|")
    for name, call, _, _ in CASES:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the point is to show it
            msg = str(exc).replace("|", "\\|")
            print(f"| {name} | `{type(exc).__name__}` | {msg} |")
        else:
            print(f"| {name} | (none!) | |")


if __name__ == "__main__":
    main()
