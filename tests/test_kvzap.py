"""kvzap's parts without an engine: the features, the ridge fit from running
sums, the scorer's prediction against a hand-computed reference, which KVs
a compression scores, and the scorer file (round trip, matching a model by
its config, refusals that name the flag)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress.attention.pool_view import HeadBlockCache
from vllm_kvcompress.compression.scorers.kvzap import LearnedScores
from vllm_kvcompress.kvzap.features import (
    RotarySpec, feature_columns, key_features, token_features,
)
from vllm_kvcompress.kvzap.ridge import RidgeSums, fit, r_squared
from vllm_kvcompress.kvzap.scorer_file import (
    IDENTITY_FIELDS, ScorerFileError, load_scorer, read_metadata, resolve_scorer,
    save_scorer,
)

NEOX = RotarySpec(dim=4, neox=True)


def rotate(keys: torch.Tensor, angles: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """Turn each rotary pair of ``keys`` [..., D] by ``angles`` [..., dim/2]."""
    out = keys.clone()
    half = rotary.dim // 2
    pairs = ([(i, i + half) for i in range(half)] if rotary.neox
             else [(2 * i, 2 * i + 1) for i in range(half)])
    for j, (a, b) in enumerate(pairs):
        cos, sin = angles[..., j].cos(), angles[..., j].sin()
        out[..., a] = keys[..., a] * cos - keys[..., b] * sin
        out[..., b] = keys[..., a] * sin + keys[..., b] * cos
    return out


@pytest.mark.parametrize("rotary", [NEOX, RotarySpec(dim=4, neox=False), RotarySpec(2, True)])
def test_key_features_do_not_depend_on_the_rotation(rotary):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 6, generator=gen)
    angles = torch.rand(5, rotary.dim // 2, generator=gen) * 6.3
    plain, turned = key_features(keys, rotary), key_features(rotate(keys, angles, rotary), rotary)
    torch.testing.assert_close(turned, plain, atol=1e-5, rtol=1e-5)
    assert plain.shape == (5, 6 - rotary.dim // 2)
    # The pair norms by hand, then the unturned dimensions as they are.
    half = rotary.dim // 2
    partner = half if rotary.neox else 1  # dimension 0 turns with this one
    assert math.isclose(float(plain[0, 0]), math.hypot(keys[0, 0], keys[0, partner]),
                        rel_tol=1e-6)
    torch.testing.assert_close(plain[:, half:], keys[:, rotary.dim:])


def test_token_features_and_columns_line_up():
    keys, values = torch.arange(2 * 3 * 4.).view(2, 3, 4), -torch.arange(2 * 3 * 4.).view(2, 3, 4)
    features = token_features(keys, values, NEOX)  # [3 tokens, 2 heads x (2 + 4)]
    assert features.shape == (3, 12)
    # Token 1, head 1: its keys' pair norms, then its value.
    k, v = keys[1, 1], values[1, 1]
    expected = [math.hypot(k[0], k[2]), math.hypot(k[1], k[3]), *v.tolist()]
    torch.testing.assert_close(features[1, 6:], torch.tensor(expected))
    assert feature_columns("own_head", 2, 4, NEOX, 1) == list(range(6, 12))
    assert feature_columns("keys", 2, 4, NEOX, 0) == [0, 1, 6, 7]
    assert feature_columns("values", 2, 4, NEOX, 0) == [2, 3, 4, 5, 8, 9, 10, 11]
    assert feature_columns("all", 2, 4, NEOX, 0) == list(range(12))


def test_ridge_from_sums_recovers_a_linear_map_and_scores_it():
    gen = torch.Generator().manual_seed(1)
    true_w, true_b = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64), torch.randn(2, 3)
    sums, held_out = RidgeSums(2, 5, 3), RidgeSums(2, 5, 3)
    samples = []
    for target in (sums, held_out, sums):  # sums add up over calls
        for layer in range(2):
            x = torch.randn(200, 5, generator=gen, dtype=torch.float64) * 3 + 1
            noise = 0.1 * torch.randn(200, 3, generator=gen, dtype=torch.float64)
            y = x @ true_w[layer] + true_b[layer] + noise
            target.add(layer, x, y)
            if target is held_out:
                samples.append((x, y))
    columns = [list(range(5))] * 3
    weights, bias = fit(sums, columns, alpha=1e-6)
    torch.testing.assert_close(weights, true_w, atol=0.02, rtol=0)
    torch.testing.assert_close(bias, true_b.double(), atol=0.05, rtol=0)
    # R^2 from the sums equals R^2 computed on the samples themselves.
    r2 = r_squared(held_out, weights, bias)
    for layer, (x, y) in enumerate(samples):
        residual = (y - x @ weights[layer] - bias[layer]).square().sum()
        total = (y - y.mean(0)).square().sum()
        assert math.isclose(float(r2[layer]), float(1 - residual / total), rel_tol=1e-9)
    # A head restricted to some columns gets weight 0 on the others.
    narrow, _ = fit(sums, [[0, 1], [2], [3, 4]], alpha=1e-3)
    assert narrow[:, 2:, 0].abs().max() == 0 and narrow[:, [0, 1, 3, 4], 1].abs().max() == 0


def tiny_scorer(layers=2, heads=2, head_dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = heads * (head_dim - NEOX.dim // 2 + head_dim)
    weights = torch.randn(layers, width, heads, generator=gen)
    bias = torch.randn(layers, heads, generator=gen)
    return SimpleNamespace(weights=weights, bias=bias, rotary=NEOX, path="tiny.safetensors",
                           metadata={})


def test_prediction_equals_the_hand_computed_sum():
    scorer = LearnedScores(tiny_scorer(), torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 2, 3, 4, generator=gen), torch.randn(2, 2, 3, 4, generator=gen)
    predicted = scorer.predict(keys, values)  # [L, H, N]
    for layer in range(2):
        for head in range(2):
            for token in range(3):
                features = []
                for h in range(2):
                    k, v = keys[layer, h, token], values[layer, h, token]
                    features += [math.hypot(k[0], k[2]), math.hypot(k[1], k[3]), *v.tolist()]
                expected = sum(f * float(scorer.weights[layer, i, head])
                               for i, f in enumerate(features)) + float(scorer.bias[layer, head])
                assert math.isclose(float(predicted[layer, head, token]), expected,
                                    rel_tol=1e-4, abs_tol=1e-4)


def test_ranks_sum_to_the_one_rank_prediction():
    """Tensor parallelism: 4 KV heads over 2 ranks. Each rank's share of
    every head's prediction depends on its own heads' K/V alone, and the
    shares summed over the ranks give each rank exactly the one-rank
    prediction of its heads."""
    whole = LearnedScores(tiny_scorer(heads=4, seed=5), torch.device("cpu"))
    gen = torch.Generator().manual_seed(6)
    keys, values = torch.randn(2, 4, 3, 4, generator=gen), torch.randn(2, 4, 3, 4, generator=gen)
    expected = whole.predict(keys, values)  # [L, 4 heads, N]
    shares = {}

    def keep(rank):
        def record(values):
            shares[rank] = values.copy()
            return values
        return record

    ranks = [slice(0, 2), slice(2, 4)]
    for rank, heads in enumerate(ranks):  # each rank's share alone
        LearnedScores(tiny_scorer(heads=4, seed=5), torch.device("cpu"), heads,
                      keep(rank)).predict(keys[:, heads], values[:, heads])
    assert shares[0].shape == (2, 3, 4)  # [L, N, every head]
    for rank, heads in enumerate(ranks):
        split = LearnedScores(tiny_scorer(heads=4, seed=5), torch.device("cpu"), heads,
                              lambda _: shares[0] + shares[1])
        split.check(2, 4, 4, NEOX)  # checked against the whole model's heads
        torch.testing.assert_close(split.predict(keys[:, heads], values[:, heads]),
                                   expected[:, heads], atol=1e-5, rtol=1e-5)


def test_a_compression_scores_only_what_was_written_since_the_last():
    """Two heads whose older KVs were compacted into different orders; the
    new tokens sit at each head's tail. Only those get (new) predictions,
    taken from the K/V of the same token in every head."""
    scorer = LearnedScores(tiny_scorer(layers=1), torch.device("cpu"))
    block_size, head_dim = 4, 4
    pool = HeadBlockCache.empty(4, block_size, head_dim, torch.float32)
    gen = torch.Generator().manual_seed(3)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=gen))
    metric = torch.full((4 * block_size,), 7.0)
    # Head 0 holds positions [3, 0, 5, 6] in blocks 0; head 1 [0, 3, 5, 6] in block 2.
    positions = torch.tensor([[[3, 0, 5, 6], [0, 3, 5, 6]]])
    slots = torch.tensor([[[0, 1, 2, 3], [8, 9, 10, 11]]])
    request = SimpleNamespace(slots=slots, in_head=torch.ones(1, 2, 4, dtype=torch.bool))
    scorer.scored["r"] = 5
    scorer.score_new("r", pool, "row_major", metric, request, positions)
    keys, values = pool.gather(torch.tensor([[[2, 3], [10, 11]]]), "row_major")
    expected = scorer.predict(keys, values)[0]
    torch.testing.assert_close(metric[[2, 3]], expected[0])
    torch.testing.assert_close(metric[[10, 11]], expected[1])
    assert metric[[0, 1, 8, 9]].tolist() == [7.0] * 4  # scored before: untouched
    assert scorer.scored["r"] == 7
    scorer.drop("r")
    assert "r" not in scorer.scored


def identity(**changes):
    fields = dict(model_type="llama", num_hidden_layers=2, hidden_size=16,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                  intermediate_size=32, vocab_size=100, max_position_embeddings=256)
    fields.update(changes)
    return SimpleNamespace(**fields)


def write(path, config):
    scorer = tiny_scorer()
    save_scorer(path, scorer.weights, scorer.bias, {
        "model": {"name": "tiny", "identity": {k: getattr(config, k) for k in IDENTITY_FIELDS}},
        "rotary": NEOX.to_json(), "features": "all", "validation_r2": [0.5, 0.6]})
    return scorer


def test_scorer_file_round_trip_and_matching(tmp_path, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    scorer = write(path, identity())
    loaded = load_scorer(str(path))
    torch.testing.assert_close(loaded.weights, scorer.weights)
    assert loaded.rotary == NEOX and read_metadata(path)["validation_r2"] == [0.5, 0.6]
    assert resolve_scorer(str(path), identity(), "tiny", required=True) == str(path)
    # Found without a flag by the model's config, whatever its path.
    monkeypatch.setattr("vllm_kvcompress.kvzap.scorer_file.BUNDLED_DIR", tmp_path)
    assert resolve_scorer(None, identity(), "/elsewhere/tiny", required=True) == str(path)
    assert resolve_scorer(None, identity(num_hidden_layers=3), "other", required=False) is None
    with pytest.raises(ScorerFileError, match="kv-compress-policy kvzap needs a trained "
                                              "scorer for other.*train_scorer other"):
        resolve_scorer(None, identity(num_hidden_layers=3), "other", required=True)


def test_bad_scorer_files_are_refused_naming_the_flag(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write(path, identity())
    with pytest.raises(ScorerFileError, match="--kv-compress-scorer .*num_key_value_heads 2 "
                                              r"\(model: 4\)"):
        resolve_scorer(str(path), identity(num_key_value_heads=4), "big", required=True)
    with pytest.raises(ScorerFileError, match="--kv-compress-scorer .*cannot read"):
        resolve_scorer(str(tmp_path / "missing.safetensors"), identity(), "tiny", True)
    (tmp_path / "text.safetensors").write_text("not a scorer")
    with pytest.raises(ScorerFileError, match="--kv-compress-scorer .*cannot read"):
        read_metadata(tmp_path / "text.safetensors")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ScorerFileError, match="without kvzap metadata"):
        read_metadata(tmp_path / "plain.safetensors")
    old = tmp_path / "old.safetensors"
    save_file({"weights": torch.zeros(1)}, str(old),
              metadata={"kvzap": json.dumps({"format_version": 0})})
    with pytest.raises(ScorerFileError, match="format version 0"):
        read_metadata(old)


def test_a_scorer_that_does_not_fit_the_worker_model_is_refused():
    scorer = LearnedScores(tiny_scorer(), torch.device("cpu"))
    scorer.check(2, 2, 4, NEOX)  # fits
    with pytest.raises(ScorerFileError, match="kv-compress-scorer"):
        scorer.check(3, 2, 4, NEOX)
    with pytest.raises(ScorerFileError, match="kv-compress-scorer"):
        scorer.check(2, 2, 4, RotarySpec(4, neox=False))
