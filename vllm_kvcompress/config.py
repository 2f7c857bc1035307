"""Engine-level compression settings, parsed and validated in one place.

Settings travel from the front end to EngineCore and the workers inside
``VllmConfig.additional_config`` (pickled with the config), under their
underscore names (``kv_compress_rate`` ...). Every process rebuilds the same
``KVCompressConfig`` from that dict, so validation runs identically everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

RATE_KEY = "kv_compress_rate"
DEBUG_KEY = "kv_compress_debug"
KNOWN_KEYS = (RATE_KEY, DEBUG_KEY)


class KVCompressConfigError(ValueError):
    """A compression setting is malformed; the message names the flag."""


@dataclass(frozen=True)
class KVCompressConfig:
    """What the user asked for.

    rate: keep about 1/rate of the compressible KVs (1 = evict nothing, but
        still run on the per-head paged cache).
    debug: check the head-block books after every engine step (slow).
    """

    rate: float = 1.0
    debug: bool = False

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> "KVCompressConfig | None":
        """The config if compression was asked for, else None."""
        extra = dict(additional_config or {})
        unknown = sorted(
            k for k in extra if k.startswith("kv_compress_") and k not in KNOWN_KEYS
        )
        if unknown:
            raise KVCompressConfigError(
                f"unknown setting {unknown[0]!r} (flag {flag_name(unknown[0])}); "
                f"allowed: {', '.join(KNOWN_KEYS)}."
            )
        if extra.get(RATE_KEY) is None:
            if extra.get(DEBUG_KEY):
                raise KVCompressConfigError(
                    f"{flag_name(DEBUG_KEY)} needs {flag_name(RATE_KEY)}."
                )
            return None
        return cls(
            rate=parse_rate(extra[RATE_KEY]),
            debug=parse_bool(extra.get(DEBUG_KEY, False), DEBUG_KEY),
        )


def flag_name(key: str) -> str:
    """``kv_compress_rate`` -> ``--kv-compress-rate``."""
    return "--" + key.replace("_", "-")


def parse_rate(value: Any) -> float:
    """A compression rate: a finite number >= 1 (1 keeps everything)."""
    flag = flag_name(RATE_KEY)
    if isinstance(value, bool):
        raise KVCompressConfigError(
            f"{flag} must be a number >= 1 (e.g. 8 keeps about 1/8 of the KV "
            f"cache); got {value!r}."
        )
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise KVCompressConfigError(
            f"{flag} must be a number >= 1 (e.g. 8 keeps about 1/8 of the KV "
            f"cache); got {value!r}."
        ) from None
    if not math.isfinite(rate) or rate < 1.0:
        raise KVCompressConfigError(
            f"{flag} must be a finite number >= 1 (1 keeps every KV, 8 keeps "
            f"about 1/8); got {value!r}."
        )
    return rate


def parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise KVCompressConfigError(
        f"{flag_name(key)} must be true or false; got {value!r}."
    )
