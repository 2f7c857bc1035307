"""Text for training a scorer: real prose that installed packages ship.

Never the Paul Graham essays: they are the quality suite's haystack, and a
scorer fit on them would flatter its own results. The default corpus is
two sources any vLLM install has:
- Newton's *Opticks* (Project Gutenberg, public domain, ~570 KB), shipped
  by ``apache-tvm-ffi`` (a dependency of xgrammar, hence of vLLM) as a test
  text of its bundled libbacktrace: long-form narrative English, with
  numbers and measurements in it;
- the docstrings of Python's standard library (modern technical English).
"""

from __future__ import annotations

import ast
import importlib.util
import sysconfig
from pathlib import Path

# Pure-Python standard-library modules with long prose docstrings.
STDLIB_MODULES = ("argparse", "asyncio/base_events", "collections/__init__", "contextlib",
                  "dataclasses", "datetime", "decimal", "email/message", "functools",
                  "inspect", "logging/__init__", "pathlib", "pickle", "shutil", "subprocess",
                  "tarfile", "textwrap", "threading", "typing", "unittest/case", "zipfile")


def opticks() -> str:
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the apache-tvm-ffi package (which ships Opticks) is not "
                                "installed; pass --texts FILE ...")
    path = Path(spec.submodule_search_locations[0], "3rdparty", "libbacktrace",
                "Isaac.Newton-Opticks.txt")
    text = path.read_text(encoding="utf-8", errors="replace")
    # Drop Project Gutenberg's licence at the end.
    end = text.find("End of the Project Gutenberg")
    return text[:end] if end > 0 else text


def stdlib_docstrings(min_chars: int = 300) -> str:
    """The long docstrings of ``STDLIB_MODULES``, one paragraph block each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    blocks = []
    for name in STDLIB_MODULES:
        source = root / f"{name}.py"
        if not source.exists():
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    blocks.append(doc)
    return "\n\n".join(blocks)


def default_texts() -> dict[str, str]:
    return {"opticks": opticks(), "stdlib-docstrings": stdlib_docstrings()}


def windows(token_ids: list[int], lengths: list[int], validation: float
            ) -> tuple[list[list[int]], list[list[int]]]:
    """Consecutive windows of one text, their lengths cycling through
    ``lengths``; those starting in the text's last ``validation`` fraction
    are held out (a different stretch of the text, not a shuffle)."""
    train, held_out = [], []
    boundary = int(len(token_ids) * (1 - validation))
    start, turn = 0, 0
    while True:
        length = lengths[turn % len(lengths)]
        if start + length > len(token_ids):
            break
        (train if start + length <= boundary else held_out).append(
            token_ids[start:start + length])
        start, turn = start + length, turn + 1
    return train, held_out
