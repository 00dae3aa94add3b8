"""Text <-> token ids and the chat template, from GGUF metadata or a Hugging Face tokenizer.json.

The BPE itself runs in the `tokenizers` library; this module only builds it from the model file
and renders the model's own Jinja chat template in a sandbox (templates ship inside model files,
so they are untrusted input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BpeBackend

from tdllm.errors import ModelLoadError, UsageError

CONTROL_TOKEN = 3  # llama.cpp token type
USER_DEFINED_TOKEN = 4
# end-of-turn markers of common chat templates; stop generation when the vocabulary has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


class Tokenizer:
    def __init__(
        self,
        backend: BpeBackend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        stops = {vocab[t] for t in END_OF_TURN if t in vocab}
        if eos_token_id is not None:
            stops.add(eos_token_id)
        self.stop_token_ids = frozenset(stops)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens spelled out in it are recognized either way,
        `add_special_tokens` adds the model's own (a BOS, when its tokenizer adds one)."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_text(self, token_id: int) -> str | None:
        token: str | None = self.backend.id_to_token(token_id)
        return token

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise UsageError("this model has no chat template; use a plain prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error

        def name(token_id: int | None) -> str:
            return (self.token_text(token_id) or "") if token_id is not None else ""

        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=name(self.bos_token_id),
                eos_token=name(self.eos_token_id),
            )
        except TemplateError as exc:
            raise UsageError(f"the chat template rejected the messages: {exc}") from None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE only)"
            )
        tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = BpeBackend(
            models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        )
        backend.pre_tokenizer = _gguf_pre_tokenizer(str(fields.get("tokenizer.ggml.pre", "gpt2")))
        backend.decoder = decoders.ByteLevel()
        types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == CONTROL_TOKEN
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == USER_DEFINED_TOKEN
            ]
        )
        return cls(
            backend,
            bos_token_id=_opt_int(fields.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_opt_int(fields.get("tokenizer.ggml.eos_token_id")),
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_directory(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json")
        backend = BpeBackend.from_file(str(path))
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        vocab = backend.get_vocab(with_added_tokens=True)

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken serialisation
                value = value.get("content")
            return vocab.get(value) if isinstance(value, str) else None

        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            chat_template=config.get("chat_template"),
            add_bos=bool(config.get("add_bos_token", False)),
        )

    def save_hf_directory(self, folder: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (the form `from_hf_directory` reads)."""
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token_text(self.bos_token_id)
            if self.bos_token_id is not None
            else None,
            "eos_token": self.token_text(self.eos_token_id)
            if self.eos_token_id is not None
            else None,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then the GPT-2 split (as the model was trained)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise ModelLoadError(
        f"GGUF pre-tokenizer {pre!r} is not supported; "
        "load the model as a safetensors directory with its tokenizer.json instead"
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
