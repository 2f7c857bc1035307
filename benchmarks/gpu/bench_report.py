"""The GPU harness's figures from the engines' reports: whether the plugin's
greedy tokens equal stock's (and, where not, whether that is a near tie),
the throughput table with ratios to stock, and the printed summary.
"""

from __future__ import annotations


def compare_tokens(stock: dict | None, plugin: dict | None) -> dict | None:
    """Per exactness prompt: identical or not; where they first differ, and
    stock's top-2 log-probability gap there (a near tie, or not)."""
    if not stock or not plugin or "exact" not in stock or "exact" not in plugin:
        return None
    prompts = []
    for i, (a, b) in enumerate(zip(stock["exact"]["outputs"], plugin["exact"]["outputs"])):
        first = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        entry = {"prompt_len": stock["exact"]["lengths"][i],
                 "identical": a["tokens"] == b["tokens"], "first_difference": first}
        if first is not None and len(a["top2"][first]) == 2:
            entry["stock_top2_gap_there"] = a["top2"][first][0][1] - a["top2"][first][1][1]
        common = first if first is not None else len(a["tokens"])
        deltas = [abs(a["top2"][j][0][1] - b["top2"][j][0][1]) for j in range(common)]
        entry["max_logprob_delta_before"] = max(deltas, default=0.0)
        prompts.append(entry)
    return {"identical": all(p["identical"] for p in prompts), "prompts": prompts}


def throughput_table(stock: dict | None, plugin_reports: list[dict]) -> list[dict]:
    base = ((stock or {}).get("workloads") or {}).get("stock")
    rows = []
    if base:
        rows.append({"engine": "stock", "mode": stock["mode"], **base, "ratio": 1.0})
    for report in plugin_reports:
        for name, result in (report.get("workloads") or {}).items():
            rows.append({"engine": f"plugin {name}", "mode": report["mode"], **result,
                         "ratio": result["output_tokens_per_s"] / base["output_tokens_per_s"]
                         if base else None})
    return rows


def print_summary(report: dict) -> None:
    print("summary", flush=True)
    for key in ("exact_bf16", "exact_fp32"):
        if report.get(key):
            print(f"  {key}: identical={report[key]['identical']} "
                  f"{[(p['prompt_len'], p['first_difference']) for p in report[key]['prompts']]}")
    for row in report.get("throughput", []):
        extra = "".join(f" {k}={row[k]:.2f}" for k in ("compress_share", "kvzip_pass_share")
                        if k in row)
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "n/a"
        print(f"  {row['engine']:<24} {row['mode']:<16} {row['output_tokens_per_s']:8.0f} "
              f"new tok/s  {ratio}  peak batch {row['peak_running']}{extra}", flush=True)
