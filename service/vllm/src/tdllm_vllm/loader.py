"""vLLM model loaders that read tdllm's checkpoints: sealed (`tdllm-sealed`) or plain (`tdllm`).

A sealed model is decrypted tensor by tensor straight into vLLM's parameters by the same reader
the tdllm engine uses (`tdllm.sealing.reader.open_sealed`): every chunk authenticates before its
tensor is handed on, and no plaintext byte is written anywhere. The data key comes over the
service's one-shot loader channel (`tdllm.vllm_engine.loader_channel`), which also takes the
outcome back; the service passes the identity of the
manifest it verified with the same key (model id, model and version the broker released the
key for, manifest digest), and this loader refuses a directory that is not exactly that one:
the host cannot swap the files between the service's check and this load.

The outcome goes back as ``{"loaded": <tensors>}`` or ``{"failed": "<reason>"}``; the reason
is the reader's own words, which name a tensor or the manifest and never why (no oracle,
docs/sealed-format.md).
"""

from __future__ import annotations

import socket
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from tdllm.errors import TdllmError
from tdllm.model.checkpoint import Checkpoint
from tdllm.sealing.keys import wipe

log = init_logger("tdllm_vllm.loader")


class LoaderConfigError(ValueError):
    """`--model-loader-extra-config` is not what the service writes."""


@dataclass(frozen=True)
class LoaderOptions:
    """`--model-loader-extra-config`, as the service writes it (tdllm.vllm_engine.child)."""

    source: str
    channel: str | None = None  # the loader channel's socket (None: no service to talk to)
    # sealed only: the identity the service verified
    model_id: str | None = None
    model: str | None = None
    version: int | None = None
    manifest_sha256: str | None = None

    @classmethod
    def parse(cls, extra: dict[str, Any] | None, *, sealed: bool) -> LoaderOptions:
        fields = set(cls.__dataclass_fields__)
        extra = dict(extra or {})
        unknown = sorted(set(extra) - fields)
        if unknown:
            raise LoaderConfigError(f"unknown loader settings: {', '.join(unknown)}")
        if not isinstance(extra.get("source"), str):
            raise LoaderConfigError("the loader needs `source` (the model's path)")
        needed = ("channel", "model_id", "model", "version", "manifest_sha256")
        missing = [name for name in needed if extra.get(name) is None]
        if sealed and missing:
            raise LoaderConfigError(f"a sealed model needs {', '.join(missing)}")
        return cls(**extra)


class _TdllmLoader(BaseModelLoader):
    sealed = False

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(
            load_config.model_loader_extra_config, sealed=self.sealed
        )

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is ever downloaded: the model is on the TD's disk, sealed or bundled."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        from tdllm.vllm_engine.loader_channel import loader_socket, receive_key

        connection, key = None, bytearray()
        try:
            channel = loader_socket(self.options.channel, sealed=self.sealed)
            if channel is not None:
                connection, key = receive_key(channel)
            count = self._load(model, model_config.dtype, key)
        except Exception as exc:
            _report(connection, {"failed": _reason(exc)})
            raise
        finally:
            wipe(key)
        _report(connection, {"loaded": count})

    def _load(self, model: nn.Module, dtype: torch.dtype, key: bytearray) -> int:
        checkpoint = self._open(key)
        seen: list[str] = []

        def converted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in checkpoint.tensors():
                seen.append(name)
                yield name, tensor.to(dtype)

        loaded = set(model.load_weights(converted()))  # type: ignore[operator]
        missing = sorted({name for name, _ in model.named_parameters()} - loaded)
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise LoaderConfigError(f"the checkpoint lacks {len(missing)} parameters: {shown}")
        return len(seen)

    @abstractmethod
    def _open(self, key: bytearray) -> Checkpoint:
        """The checkpoint to load (`key`: the data key, empty for a plain model)."""


class PlainLoader(_TdllmLoader):
    """`--load-format tdllm`: a plaintext source tdllm opens (the bundled GGUF, dequantized)."""

    def _open(self, key: bytearray) -> Checkpoint:
        from tdllm.sources import open_checkpoint

        if key:
            raise LoaderConfigError("a key came for a plain model")
        return open_checkpoint(self.options.source)


class SealedLoader(_TdllmLoader):
    """`--load-format tdllm-sealed`: a sealed directory, opened with the handed-over key."""

    sealed = True

    def _open(self, key: bytearray) -> Checkpoint:
        from tdllm.sealing.format import ModelVersion
        from tdllm.sealing.reader import open_sealed

        o = self.options
        if o.model is None or o.version is None:
            raise LoaderConfigError("a sealed model needs model and version")
        if not key:
            raise LoaderConfigError("no key came over the loader channel")
        expect = ModelVersion(o.model, o.version)
        checkpoint = open_sealed(Path(o.source), data_key=key, model_id=o.model_id, expect=expect)
        identity = checkpoint.identity or {}
        if identity.get("manifest_sha256") != o.manifest_sha256:
            raise LoaderConfigError(
                "the sealed manifest is not the one the service verified (changed on disk)"
            )
        return checkpoint


def _reason(exc: BaseException) -> str:
    """What /ready may say: our own errors' words, else only the kind of failure."""
    if isinstance(exc, TdllmError):
        return exc.diagnostics()
    if isinstance(exc, LoaderConfigError | OSError):
        return str(exc)
    return f"loading the weights failed ({type(exc).__name__})"


def _report(connection: socket.socket | None, status: dict[str, Any]) -> None:
    from tdllm.vllm_engine.loader_channel import report

    if connection is None:
        return
    try:
        report(connection, status)
    except OSError as exc:  # the service is gone
        log.warning("cannot report the load's outcome to the service: %s", exc.strerror)
