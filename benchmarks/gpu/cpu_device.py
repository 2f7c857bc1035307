"""Make a CPU-only Python look like the lent GPU machine to vLLM, for the CI
check of the carried tree (no GPU, no download):

- ``device_site``: a folder of links to the packages of this environment
  that the machine has (``device_packages.txt``) or that travel with the
  carry (``carry_packages.CARRIED``), and nothing else. Python started with ``-S``
  (no site-packages) on it sees what the machine will see: an import the
  machine cannot satisfy fails, and optional-package probes answer as there;
- ``fake_nvml``: vLLM's own copy of NVML (``vllm.third_party.pynvml``)
  answers for one NVIDIA H200 (capability 9.0, 141 GB), so vLLM's normal
  platform detection picks ``CudaPlatform``, as it will on the machine;
- ``fake_triton_driver``: Triton's CUDA driver reports itself active, so
  vLLM imports real Triton instead of its placeholders (as on the machine).

What this cannot show: anything that touches CUDA itself (this torch has
none), and differences between torch 2.11 (the machine's) and this one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import types
from pathlib import Path

import carry_packages as packages

H200 = {"name": "NVIDIA H200", "capability": (9, 0), "memory": 143771 * 2**20,
        "uuid": "GPU-00000000-0000-0000-0000-000000000000"}


def device_site(dest: Path) -> dict[str, list[str]]:
    """Link the top-level entries (packages, modules, dist-info, .libs) of
    every allowed distribution of the running environment into ``dest``.
    Returns ``{"linked": distributions, "left_out": distributions}``."""
    allowed = packages.device_packages() | {packages.normalize(n) for n in packages.CARRIED}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    linked, left_out = [], []
    for dist in importlib.metadata.distributions():
        name = packages.normalize(dist.metadata["Name"] or "")
        if name not in allowed or not dist.files:
            left_out.append(name)
            continue
        linked.append(name)
        root = Path(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files
                if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            source, link = root / top, dest / top
            if source.exists() and not link.exists():
                os.symlink(source, link)
    return {"linked": sorted(linked), "left_out": sorted(left_out)}


def fake_triton_driver() -> None:
    """Triton's CUDA driver says it is active (it asks torch, which has no
    CUDA here); nothing is compiled or launched by the checks."""
    from triton.backends.nvidia.driver import CudaDriver

    CudaDriver.is_active = staticmethod(lambda: True)


def fake_nvml(device: dict = H200) -> types.ModuleType:
    """An NVML module with one device, in place of vLLM's copy (imports
    ``vllm``, so the carried tree must be on ``sys.path`` first)."""
    parent = importlib.import_module("vllm.third_party")
    nvml = types.ModuleType("vllm.third_party.pynvml")

    class NVMLError(Exception):
        pass

    memory = types.SimpleNamespace(total=device["memory"], free=device["memory"], used=0)
    nvml.__dict__.update(
        NVMLError=NVMLError,
        NVML_P2P_CAPS_INDEX_NVLINK=0, NVML_P2P_STATUS_OK=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetHandleByUUID=lambda uuid: 0,
        nvmlDeviceGetIndex=lambda handle: handle,
        nvmlDeviceGetCudaComputeCapability=lambda handle: device["capability"],
        nvmlDeviceGetName=lambda handle: device["name"],
        nvmlDeviceGetUUID=lambda handle: device["uuid"],
        nvmlDeviceGetMemoryInfo=lambda handle: memory,
        nvmlDeviceGetNumaNodeId=lambda handle: 0,
    )
    sys.modules[nvml.__name__] = nvml
    parent.pynvml = nvml
    return nvml
