"""The quality suite splits its cases so that one group's prompts stay in
the prefix cache (``benchmarks/quality.py``'s ``case_groups``)."""

import importlib.util
from pathlib import Path

from vllm_kvcompress.scheduler.pool import HeadBlockPool

# Loaded from its file: putting benchmarks/ on sys.path would let its
# modules shadow others for the rest of the test session.
_spec = importlib.util.spec_from_file_location(
    "quality_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py")
_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quality)
case_groups, prompt_length = _quality.case_groups, _quality.prompt_length


def _cases(count: int, tokens: int) -> list[dict]:
    return [{"context": [i] * (tokens - 4), "question": [0] * 4} for i in range(count)]


def test_cases_that_fit_run_in_one_group():
    pool = HeadBlockPool(num_head_blocks=6 * 1000 // 16, num_layers=2, num_kv_heads=3,
                         block_size=16)  # 62 token blocks: 992 tokens
    cases = _cases(6, 100)
    assert case_groups(pool, cases, max_num_seqs=2, max_model_len=100) == [cases]


def test_groups_fit_the_cache_beside_the_running_requests_and_keep_order():
    pool = HeadBlockPool(num_head_blocks=6 * 1000 // 16, num_layers=2, num_kv_heads=3,
                         block_size=16)  # 992 tokens, 200 for two running requests
    cases = _cases(20, 100)
    groups = case_groups(pool, cases, max_num_seqs=2, max_model_len=100)
    assert [len(g) for g in groups] == [7, 7, 6]
    assert all(sum(map(prompt_length, g)) <= 0.9 * (992 - 200) for g in groups)
    assert [c for g in groups for c in g] == cases
