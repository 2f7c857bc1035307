"""Make the plugin importable and visible to vLLM from a plain folder, the
way ``pip install -e .`` does in the project's venv, without pip or a network.

vLLM finds general plugins through the ``vllm.general_plugins`` entry point of
an installed distribution, and ``kernels/`` is imported as
``vllm_kvcompress_kernels`` (``package-dir`` in pyproject.toml). This writes a
``vllm_kvcompress-<version>.dist-info`` with the project's entry points and
links each top-level package into ``site``, all read off pyproject.toml.

    python benchmarks/gpu/plugin_dist.py SITE [--repo ROOT]
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def install(site: Path, repo: Path = REPO) -> Path:
    """Write the dist-info and package links into ``site``; the dist-info."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    project, setuptools = meta["project"], meta["tool"]["setuptools"]
    site = Path(site)
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in points.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))
    (dist / "RECORD").write_text("")
    folders = setuptools.get("package-dir", {})
    for package in {p.split(".")[0] for p in setuptools["packages"]}:
        link = site / package
        if link.is_symlink():
            link.unlink()
        os.symlink(repo / folders.get(package, package), link, target_is_directory=True)
    return dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args()
    print(f"plugin: {install(args.site, args.repo)}")


if __name__ == "__main__":
    main()
