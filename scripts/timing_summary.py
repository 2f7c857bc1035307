"""Prints where a test run's time went, from pytest's JUnit XML: the wall
time, the summed test time, and the slowest files and tests (CI's log ends
with it, so the next slow run shows its cause).

    python scripts/timing_summary.py JUNIT.xml STARTED_EPOCH_SECONDS
"""

import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter


def summary(junit_path: str, started: float, top: int = 10) -> str:
    by_file, by_test = Counter(), Counter()
    for case in ET.parse(junit_path).iter("testcase"):
        seconds = float(case.get("time") or 0)
        by_file[case.get("classname")] += seconds
        by_test[f"{case.get('classname')}::{case.get('name')}"] += seconds
    lines = [f"timing: {time.time() - started:.0f} s wall in all (set-up included), "
             f"{sum(by_file.values()):.0f} s of tests summed over workers, "
             f"{len(by_test)} tests",
             f"slowest {top} files (s):"]
    lines += [f"  {seconds:7.1f}  {name}" for name, seconds in by_file.most_common(top)]
    lines.append(f"slowest {top} tests (s):")
    lines += [f"  {seconds:7.1f}  {name}" for name, seconds in by_test.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1], float(sys.argv[2])))
