"""The package imports and its references run without Triton; Triton wrappers then fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"

SCRIPT = textwrap.dedent(
    f"""
    import importlib.util, sys
    sys.modules["triton"] = None  # makes `import triton` raise ImportError
    sys.modules["triton.language"] = None
    try:
        import vllm_kvcompress_kernels as K
    except ImportError:
        d = {str(KERNELS_DIR)!r}
        spec = importlib.util.spec_from_file_location(
            "vllm_kvcompress_kernels", d + "/__init__.py", submodule_search_locations=[d])
        K = importlib.util.module_from_spec(spec)
        sys.modules["vllm_kvcompress_kernels"] = K
        spec.loader.exec_module(K)
    import torch
    from vllm_kvcompress_kernels.testing import make_pool
    assert not K.HAS_TRITON
    pool = make_pool([5, 0], 16, 8, torch.float32, device=torch.device("cpu"))
    kc, vc = pool["kv"][0, :, :, 0], pool["kv"][1, :, :, 0]
    q = torch.randn(1, 2, 4, 8)
    qpos = torch.tensor([[3, 9]])
    st = K.attention_stats_ref(q, qpos, kc, pool["block_tables"], pool["seq_lens"], pool["kv_position"], 0.5)
    assert st.sum_p.shape == (2, 32)
    try:
        K.attention_stats(q, qpos, kc, pool["block_tables"], pool["seq_lens"], pool["kv_position"], 0.5)
    except RuntimeError as e:
        assert "Triton is not importable" in str(e)
    else:
        raise AssertionError("no RuntimeError")
    print("OK")
    """
)


def test_package_works_without_triton():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
