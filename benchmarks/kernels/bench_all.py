"""Run every kernel micro-benchmark on the GPU; write JSON and a markdown table.

    python benchmarks/kernels/bench_all.py --out results.md   # also writes results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention_stats  # noqa: E402
import bench_compaction  # noqa: E402
import bench_paged_attention  # noqa: E402
from _bench_utils import copy_bandwidth_gbs  # noqa: E402


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(meta, rows):
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"measured copy bandwidth {meta['copy_GBps']:.0f} GB/s (read+write).", ""]
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, rs in by_kernel.items():
        cols = []
        for r in rs:
            for k in r:
                if k != "kernel" and k not in cols:
                    cols.append(k)
        lines.append(f"**{kernel}**")
        lines.append("")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rs:
            lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="markdown file (JSON goes next to it)")
    ap.add_argument("--skip-128k", action="store_true")
    ap.add_argument("--paged-tuning", default=None,
                    help='JSON overriding paged_attention.TUNING, e.g. {"block_n": 64, "num_warps": 4}')
    ap.add_argument("--stats-tuning", default=None,
                    help='JSON overriding attention_stats.TUNING, e.g. {"max_block_q": 128}')
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmarks need a CUDA GPU")
    import triton

    import importlib

    from _bench_utils import import_kernels

    import_kernels()
    pa = importlib.import_module("vllm_kvcompress_kernels.paged_attention")
    st = importlib.import_module("vllm_kvcompress_kernels.attention_stats")
    if a.paged_tuning:
        pa.TUNING.update(json.loads(a.paged_tuning))
    if a.stats_tuning:
        st.TUNING.update(json.loads(a.stats_tuning))
    copy_gbs = copy_bandwidth_gbs()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_GBps=copy_gbs, paged_tuning=dict(pa.TUNING), stats_tuning=dict(st.TUNING))
    print(meta, flush=True)
    lengths = (4096, 32768) if a.skip_128k else (4096, 32768, 131072)
    rows = []
    for name, fn in (
        ("paged_attention", lambda: bench_paged_attention.run(copy_gbs, lengths)),
        ("attention_stats", lambda: bench_attention_stats.run(copy_gbs)),
        ("compaction", lambda: bench_compaction.run(copy_gbs)),
    ):
        part = fn()
        for r in part:
            print(json.dumps(r), flush=True)
        rows += part
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(meta, rows) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(to_markdown(meta, rows))


if __name__ == "__main__":
    main()
