"""Settings from flags and environment: repeatable flags (`--model A --model B`) and their variables."""
from __future__ import annotations

import argparse

import pytest

from common.settings import (ModelSettings, ServedModelsSettings, SettingsError, add_cli_args, from_cli_args,
                             to_cli_args)


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServedModelsSettings:
    parser = argparse.ArgumentParser()
    add_cli_args(parser, ServedModelsSettings, environ or {})
    return from_cli_args(ServedModelsSettings, parser.parse_args(argv))


def test_default_is_the_default_model() -> None:
    assert parse([]).entries() == [ModelSettings(model="smollm2", model_id="")]


def test_repeated_flags_pair_by_position() -> None:
    s = parse(["--model", "a", "--model", "b", "--model-id", "A", "--cache-dir", "/c"])
    assert s.model == ("a", "b") and s.model_id == ("A",)
    assert s.entries() == [ModelSettings("a", "A", "/c"), ModelSettings("b", "", "/c")]


def test_the_variable_is_comma_separated_and_a_flag_wins() -> None:
    env = {"TGQ_MODEL": "a, b", "TGQ_MODEL_ID": "x,y"}
    assert parse([], env).entries() == [ModelSettings("a", "x"), ModelSettings("b", "y")]
    assert parse(["--model", "c", "--model-id", "z"], env).entries() == [ModelSettings("c", "z")]


@pytest.mark.parametrize("argv", [["--model", "a", "--model-id", "x", "--model-id", "y"],
                                  ["--model", "a", "--model", "b", "--model-id", "x", "--model-id", "x"]])
def test_bad_pairs_are_refused(argv: list[str]) -> None:
    with pytest.raises(SettingsError):
        parse(argv)


def test_to_cli_args_rebuilds_the_settings() -> None:
    s = ServedModelsSettings(model=("a", "b"), model_id=("A", "B"), cache_dir="/c")
    assert parse(to_cli_args(s)) == s


@pytest.mark.parametrize("url", ["redis+sentinel://127.0.0.1/svc", "redis+sentinel://127.0.0.1:26379/",
                                 "redis+sentinel://127.0.0.1:26379/svc/x"])
def test_bad_sentinel_urls_are_refused(url: str) -> None:
    from common.redis_client import SentinelURLError, connect
    from common.settings import RedisSettings

    with pytest.raises(SentinelURLError):
        connect(RedisSettings(url))
