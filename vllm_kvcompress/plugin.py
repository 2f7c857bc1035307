"""The ``vllm.general_plugins`` entry point: adds the CLI flags and the
``LLM(kv_compress_rate=...)`` keyword, and hooks engine-config creation.

vLLM has no public hook for new engine arguments, so three ``EngineArgs``
methods and its constructor are wrapped (once per process). Without
``kv_compress_rate`` every wrapper passes straight through.
"""

from __future__ import annotations

import argparse
import functools

from .config import (
    SETTINGS,
    KVCompressConfig,
    KVCompressConfigError,
    Setting,
    flag_name,
    parse_bool,
)

_PATCHED_ATTR = "_kv_compress_patched"
KEYWORDS = tuple(s.key for s in SETTINGS)


def register() -> None:
    """Entry point; safe to call any number of times in any process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _PATCHED_ATTR, False):
        return
    _patch_constructors()
    _patch_cli(EngineArgs)
    _patch_create_engine_config(EngineArgs)
    setattr(EngineArgs, _PATCHED_ATTR, True)
    from . import capacity

    capacity.install()


def _move_keywords(kwargs: dict) -> None:
    """Move ``kv_compress_*`` keywords into ``additional_config``."""
    found = {k: v for k in KEYWORDS if (v := kwargs.pop(k, None)) is not None}
    if found:
        kwargs["additional_config"] = {**(kwargs.get("additional_config") or {}),
                                       **found}


def _patch_constructors() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    for cls in (EngineArgs, AsyncEngineArgs):
        if "__init__" in cls.__dict__ and not getattr(
            cls.__init__, _PATCHED_ATTR, False
        ):
            original = cls.__init__

            @functools.wraps(original)
            def init(self, *args, __original=original, **kwargs):
                _move_keywords(kwargs)
                __original(self, *args, **kwargs)

            setattr(init, _PATCHED_ATTR, True)
            cls.__init__ = init


def _argparse_type(setting: Setting):
    """Validate a flag while parsing, so a bad value stops ``vllm serve``
    before anything loads, with argparse's usual error line."""

    def parse(value: str):
        try:
            return setting.parse(value, setting.key)
        except KVCompressConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = setting.key
    return parse


def _patch_cli(engine_args_cls) -> None:
    original_add = engine_args_cls.add_cli_args
    original_from = engine_args_cls.from_cli_args.__func__

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        group = parser.add_argument_group(
            title="KVCompress",
            description="Per-head KV-cache compression (vllm_kvcompress plugin). "
            "Each flag is also accepted in --additional-config under its "
            "underscore name.",
        )
        for setting in SETTINGS:
            if setting.parse is parse_bool:
                group.add_argument(flag_name(setting.key), action="store_true",
                                   default=None, help=setting.help)
            else:
                group.add_argument(flag_name(setting.key), default=None,
                                   type=_argparse_type(setting), help=setting.help)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        values = {k: v for k in KEYWORDS if (v := getattr(args, k, None)) is not None}
        if values:
            engine_args.additional_config = {
                **(engine_args.additional_config or {}), **values}
        return engine_args

    engine_args_cls.add_cli_args = staticmethod(add_cli_args)
    engine_args_cls.from_cli_args = classmethod(from_cli_args)


def _patch_create_engine_config(engine_args_cls) -> None:
    original = engine_args_cls.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from . import engine_args

        if KVCompressConfig.from_additional_config(self.additional_config) is None:
            return original(self, *args, **kwargs)
        engine_args.check_engine_args(self)
        engine_args.apply_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        engine_args.check_vllm_config(vllm_config)
        return vllm_config

    engine_args_cls.create_engine_config = create_engine_config
