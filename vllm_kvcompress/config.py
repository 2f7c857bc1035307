"""Compression settings: one table of flags, parsed and validated in one place.

Settings travel from the front end to EngineCore and the workers inside
``VllmConfig.additional_config`` under their underscore names
(``--kv-compress-policy`` <-> ``kv_compress_policy``), so every process
rebuilds the same ``KVCompressConfig``. Settings marked per-request can be
overridden through ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

POLICIES = ("kvcompress", "cake", "adakv", "kvzip", "kvzap", "snapkv", "pyramidkv",
            "streamingllm", "random")


class KVCompressConfigError(ValueError):
    """A compression setting is malformed; the message names the flag."""


def flag_name(key: str) -> str:
    """``kv_compress_rate`` -> ``--kv-compress-rate``."""
    return "--" + key.replace("_", "-")


def _fail(key: str, wanted: str, value: Any) -> KVCompressConfigError:
    return KVCompressConfigError(f"{flag_name(key)} must be {wanted}; got {value!r}.")


def _number(value: Any, key: str, wanted: str) -> float:
    """``value`` as a float (booleans refused), else an error naming ``key``."""
    if isinstance(value, bool):
        raise _fail(key, wanted, value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail(key, wanted, value) from None


def parse_rate(value: Any, key: str = "kv_compress_rate") -> float:
    """A finite number >= 1 (1 keeps every KV, 8 keeps about 1/8)."""
    wanted = "a finite number >= 1 (1 keeps every KV, 8 keeps about 1/8)"
    rate = _number(value, key, wanted)
    if not math.isfinite(rate) or rate < 1.0:
        raise _fail(key, wanted, value)
    return rate


def _int_parser(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        wanted = f"an integer >= {minimum}"
        if isinstance(value, bool):
            raise _fail(key, wanted, value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or value < minimum:
            raise _fail(key, wanted, value)
        return value

    return parse


def parse_fraction(value: Any, key: str) -> float:
    wanted = "a number between 0 and 1"
    fraction = _number(value, key, wanted)
    if not 0.0 <= fraction <= 1.0:  # also refuses NaN
        raise _fail(key, wanted, value)
    return fraction


def _real_parser(wanted: str, accept: Callable[[float], bool]) -> Callable[[Any, str], float]:
    """A parser of finite numbers that ``accept`` takes, built on ``_number``."""
    def parse(value: Any, key: str) -> float:
        number = _number(value, key, wanted)
        if not math.isfinite(number) or not accept(number):
            raise _fail(key, wanted, value)
        return number

    return parse


parse_positive = _real_parser("a finite number > 0", lambda x: x > 0)
parse_non_negative = _real_parser("a finite number >= 0", lambda x: x >= 0)


def parse_policy(value: Any, key: str) -> str:
    if value not in POLICIES:
        raise _fail(key, f"one of {', '.join(POLICIES)}", value)
    return value


def parse_path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a file path", value)
    return value


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise _fail(key, "true or false", value)


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[Any, str], Any]
    per_request: bool
    help: str


SETTINGS = (
    Setting("kv_compress_rate", parse_rate, True,
            "Turn KV compression on and keep about 1/RATE of each request's "
            "compressible KVs (a number >= 1; 1 evicts nothing)."),
    Setting("kv_compress_max_tokens", _int_parser(1), True,
            "Instead of a rate, a fixed budget: keep at most this many KVs per "
            "head on average (over all layers and KV heads)."),
    Setting("kv_compress_policy", parse_policy, True,
            f"Which KVs go: {', '.join(POLICIES)}. Default: kvzap where a "
            "trained scorer for the model exists (one ships for "
            "SmolLM2-135M), else kvzip. kvzap: kvzip's scores predicted "
            "from each KV by a small trained model, no extra pass, blocks "
            "ranked across all layers and heads; kvzip: scores from a pass "
            "that makes the model repeat the context, query-agnostic, about "
            "3x a prefill's time on CPU; kvcompress: squared attention of "
            "recent queries, the same ranking; cake: per-layer budgets from "
            "attention entropy and variance, then that ranking within each "
            "layer; adakv: equal layer budgets, that ranking within each "
            "layer; snapkv, pyramidkv, streamingllm, random: the same count "
            "in every head."),
    Setting("kv_compress_scorer", parse_path, False,
            "kvzap only: the trained scorer file (python -m "
            "vllm_kvcompress.train_scorer MODEL --out FILE); default: the one "
            "bundled for the model, found by its config (SmolLM2-135M ships)."),
    Setting("kv_compress_head_floor", parse_fraction, True,
            "kvcompress only: every KV head keeps at least this fraction of the "
            "request's average per-head budget (default 0: no floor, as in "
            "the KV-Compress paper)."),
    Setting("kv_compress_cake_tau1", parse_positive, True,
            "cake only: temperature of attention entropy in a layer's share "
            "of the budget, P = entropy**(1/tau1) * variance**(1/tau2) "
            "(a number > 0, default 1)."),
    Setting("kv_compress_cake_tau2", parse_positive, True,
            "cake only: temperature of the attention variance across the "
            "window in a layer's share of the budget (a number > 0, default 1)."),
    Setting("kv_compress_cake_gamma", parse_non_negative, True,
            "cake only: weight of the attention variance in each KV's "
            "eviction score, mean + gamma * variance (a number >= 0, "
            "default 200)."),
    Setting("kv_compress_kvzip_chunk", _int_parser(16), False,
            "kvzip only: context tokens per reconstruction forward; bounds "
            "the pass's extra memory (default 512)."),
    Setting("kv_compress_protected_window", _int_parser(0), True,
            "The most recent tokens whose KVs are never evicted (default 32)."),
    Setting("kv_compress_sinks", _int_parser(0), True,
            "The first tokens whose KVs are never evicted (default 0)."),
    Setting("kv_compress_window", _int_parser(1), False,
            "Observation window: how many recent queries score the KVs "
            "(default 32)."),
    Setting("kv_compress_interval", _int_parser(0), False,
            "Also compress every N decode steps (default 0: only when a "
            "prompt has been read)."),
    Setting("kv_compress_cascade", parse_bool, False,
            "Also compress between prompt chunks, so a request holds at most "
            "its budget plus one chunk (--max-num-batched-tokens) while its "
            "prompt is read: prompts larger than the KV pool can be served, "
            "at some cost in quality (early chunks are judged by early "
            "queries)."),
    Setting("kv_compress_debug", parse_bool, False,
            "Check the head-block books after every engine step (slow; tests "
            "and debugging)."),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
RATE_KEY = "kv_compress_rate"
DEBUG_KEY = "kv_compress_debug"


@dataclass(frozen=True)
class KVCompressConfig:
    """Engine-wide settings (the defaults of every request)."""

    rate: float = 1.0
    max_tokens: int | None = None
    policy: str = "kvzip"
    head_floor: float = 0.0
    cake_tau1: float = 1.0
    cake_tau2: float = 1.0
    cake_gamma: float = 200.0
    kvzip_chunk: int = 512
    scorer: str | None = None
    protected_window: int = 32
    sinks: int = 0
    window: int = 32
    interval: int = 0
    cascade: bool = False
    debug: bool = False

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> "KVCompressConfig | None":
        """The config if compression was asked for, else None."""
        given = {k: v for k, v in (additional_config or {}).items()
                 if k.startswith("kv_compress_") and v is not None}
        unknown = sorted(set(given) - set(SETTINGS_BY_KEY))
        if unknown:
            raise KVCompressConfigError(
                f"unknown setting {unknown[0]!r} ({flag_name(unknown[0])}); "
                f"allowed: {', '.join(SETTINGS_BY_KEY)}."
            )
        if RATE_KEY not in given:
            others = [k for k in given if given[k] is not False]
            if others:
                raise KVCompressConfigError(
                    f"{flag_name(others[0])} needs {flag_name(RATE_KEY)} "
                    "(which turns compression on)."
                )
            return None
        return cls(**_parsed(given))

    @property
    def evicts(self) -> bool:
        """Whether these settings can evict anything at all."""
        return self.rate != 1.0 or self.max_tokens is not None

    def for_request(self, extra_args: Mapping[str, Any] | None) -> "KVCompressConfig":
        """This config with a request's ``extra_args`` overrides applied."""
        given = {k: v for k, v in (extra_args or {}).items()
                 if k.startswith("kv_compress_")}
        for key in given:
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None or not setting.per_request:
                allowed = [s.key for s in SETTINGS if s.per_request]
                raise KVCompressConfigError(
                    f"{key!r} cannot be set per request; allowed: "
                    f"{', '.join(allowed)}."
                )
        return replace(self, **_parsed(given)) if given else self


def _parsed(given: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(KVCompressConfig)}
    out = {}
    for key, value in given.items():
        field = key.removeprefix("kv_compress_")
        assert field in names, key
        out[field] = SETTINGS_BY_KEY[key].parse(value, key)
    return out
