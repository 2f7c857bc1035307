"""Which Python distributions the GPU harness carries, and which the lent
machine already has.

vLLM 0.32's ``LLM(...)`` path imports these beyond what the machine's image
holds (``device_packages.txt``); they travel as cp312 manylinux x86-64 wheels
(or pure-Python ones) pinned to the versions installed in the project's venv,
so the carried set is the set the CI test imports against. ``typing-extensions``
is on the machine but travels anyway: pydantic 2.14 needs >= 4.16.
Deliberately left out (not reached by ``LLM(...)`` on a dense model): blake3,
setproctitle, opentelemetry, mistral_common, compressed-tensors, depyf,
outlines_core, lark, lm-format-enforcer, gguf.
"""

from __future__ import annotations

import re
from pathlib import Path

CARRIED = (
    # compiled (cp312 manylinux)
    "pydantic-core", "pyzmq", "oss-harmony", "msgspec", "xgrammar", "apache-tvm-ffi",
    "pybase64", "cbor2", "jiter", "llguidance",
    # pure Python
    "pydantic", "typing-inspection", "annotated-types", "typing-extensions",
    "openai", "httpx2", "httpcore2", "truststore", "sniffio", "cachetools",
    "fastapi", "starlette", "partial-json-parser",
)

# pip download targets: the machine's Python and processor.
PYTHON_VERSION = "3.12"
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)) + (
    "manylinux2014_x86_64", "manylinux1_x86_64")

DEVICE_LIST = Path(__file__).with_name("device_packages.txt")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> frozenset[str]:
    lines = DEVICE_LIST.read_text().splitlines()
    return frozenset(normalize(s) for line in lines if (s := line.strip())
                     and not s.startswith("#"))


def pinned_versions() -> dict[str, str]:
    """``name -> version`` of every carried distribution, as installed in the
    running Python (the project's venv); a missing one is an error."""
    from importlib.metadata import PackageNotFoundError, version

    pins, missing = {}, []
    for name in CARRIED:
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(f"not installed in {__import__('sys').executable}: "
                         f"{', '.join(missing)} (run scripts/setup.sh, then use .venv/bin/python)")
    return pins
