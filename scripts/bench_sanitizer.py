"""How long the prompt screen takes, as one JSON object: a long ordinary prompt and hostile
ones (separators that could stand in for letters once made the check cubic). Best of
--repeat runs each, in milliseconds. A speed figure, so it lives here, not in a test.

    .venv/bin/python scripts/bench_sanitizer.py
"""

from __future__ import annotations

import argparse
import json
import time

from server.sanitizer import Sanitizer

PROMPTS = {
    "long_4000_chars": (
        "a gorgeous sunset over the sea with boats, 4k, highly detailed, violet. " * 60
    )[:4000],
    "pipes_5000": "exp" + "|" * 5000,
    "bangs_5000": "v" + "!" * 5000,
    "spaced_pipes_5000": "e x p " + "| " * 2500,
    "dots_5000": "n" + "." * 5000,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    check = Sanitizer.default().check
    out: dict[str, float] = {}
    for name, prompt in PROMPTS.items():
        check(prompt)  # warm caches
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            check(prompt)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_ms"] = round(best * 1000, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
