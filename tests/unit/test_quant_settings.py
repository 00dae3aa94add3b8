"""The `quant` setting: which projections it quantizes, and the configurations it refuses."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tdllm.api.commands import serve
from tdllm.errors import UsageError
from tdllm.model.int4_methods import Int4WeightOnlyMethod
from tdllm.model.int8_methods import Int8WeightOnlyMethod
from tdllm.profiles.options import ProtectionOptions
from tdllm.profiles.td_only import TdOnly
from tdllm.settings import Settings, SettingsError, load_settings
from tests.tiny_model import TINY


def test_quant_defaults_to_none_and_comes_from_the_environment() -> None:
    assert Settings().quant == "none"
    assert load_settings(environ={"TDLLM_QUANT": "int8"}).quant == "int8"
    assert load_settings(environ={"TDLLM_QUANT": "w8a8-onednn"}).quant == "w8a8-onednn"


def test_serve_takes_quant_and_shows_it_in_the_resolved_settings() -> None:
    result = CliRunner().invoke(serve, ["--check", "--quant", "int4"], env={"TDLLM_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["quant"] == "int4"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quant": "int3"}, "quant must be one of none, int8, int4"),
        (
            {"quant": "int8", "profile": "obfuscated"},
            "runs with profile 'td-only', 'split' or 'masked' ('obfuscated' runs every projection",
        ),
        (
            {"quant": "int8", "engine": "vllm", "vllm_python": "/bin/true"},
            "quant 'int8' is the tdllm engine's",
        ),
    ],
)
def test_settings_refuse_quant_with_obfuscated_or_outside_the_tdllm_engine(
    changes: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings(**changes)  # type: ignore[arg-type]


def test_protection_options_refuse_quant_with_obfuscated_only() -> None:
    with pytest.raises(UsageError, match="runs with profile 'td-only', 'split' or 'masked'"):
        ProtectionOptions("obfuscated", quant="int8")
    assert ProtectionOptions("split", quant="int4").quant == "int4"
    assert ProtectionOptions("masked", quant="w8a8").quant == "w8a8"
    assert Settings(quant="int4", profile="masked").quant == "int4"
    with pytest.raises(UsageError, match="unknown quant"):
        ProtectionOptions(quant="fp8")


@pytest.mark.parametrize(
    ("quant", "kind"), [("int8", Int8WeightOnlyMethod), ("int4", Int4WeightOnlyMethod)]
)
def test_td_only_quantizes_every_projection_and_the_head(quant: str, kind: type) -> None:
    table = TdOnly(ProtectionOptions(quant=quant), None, 1, 16).linear_methods(TINY)
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"):
        assert isinstance(table.method_for(name), kind)
    # int4 keeps the head int8: int4 g32 of the bundled tied head costs most of int4's quality
    assert isinstance(table.method_for("lm_head"), Int8WeightOnlyMethod)


def test_compile_defaults_to_off_and_comes_from_the_environment_or_serve() -> None:
    assert Settings().compile == "off"
    assert load_settings(environ={"TDLLM_COMPILE": "decode"}).compile == "decode"
    result = CliRunner().invoke(serve, ["--check", "--compile", "decode"], env={"TDLLM_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["compile"] == "decode"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"compile": "all"}, "compile must be one of off, decode, decode-groups"),
        ({"compile": "decode-groups", "quant": "w8a8"}, "quant 'w8a8' cannot"),
        ({"compile": "decode-groups", "quant": "w8a8-avx512"}, "use compile 'decode'"),
        ({"compile": "decode", "profile": "masked"}, "td-only or split, not masked"),
        ({"compile": "decode", "profile": "obfuscated"}, "td-only or split, not obfuscated"),
        (
            {"compile": "decode", "engine": "vllm", "vllm_python": "/bin/true"},
            "compile 'decode' is the tdllm engine's",
        ),
    ],
)
def test_settings_refuse_compile_where_the_engine_cannot_compile(
    changes: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**changes)  # type: ignore[arg-type]
