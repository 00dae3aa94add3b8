"""The `Checkpoint` type: (config, tokenizer, Hugging Face-named tensors), one tensor at a time.

Two plaintext readers live here: a GGUF file (the bundled SmolLM2 is one; quantized tensors are
dequantized one at a time, or handed through as their blocks to a model that takes them:
`GgufTensors`) and a Hugging Face-style directory (config.json,
*.safetensors, tokenizer.json). Tensors are yielded lazily so loading never holds a second full
copy of the model. Sealed directories (encrypted at rest, `tdllm.sealing.reader`) produce the
same `Checkpoint` shape, their tensors decrypted one at a time as they are streamed; choosing
among these sources by name or path is `tdllm.sources.open_checkpoint`. This module imports
nothing from `tdllm.sealing` (an import-linter contract).
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdllm.errors import ModelLoadError
from tdllm.model.config import ModelConfig
from tdllm.model.gguf_blocks import GgufQuantized, rope_row_order
from tdllm.model.tokenizer import Tokenizer

NamedTensors = Iterator[tuple[str, torch.Tensor]]
# a stream for the model loader: quantized weights may come as their GGUF blocks
NamedWeights = Iterator[tuple[str, torch.Tensor | GgufQuantized]]
# (checkpoint name, shape, dtype) -> the model memory that tensor will be copied into, or None
Destination = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor | None]

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class Checkpoint:
    """A model source, opened: its shape, its tokenizer, and a way to stream its tensors."""

    name: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    tensors: Callable[[], NamedTensors]
    # Sources that produce fresh memory per tensor (sealed: decrypted) can write straight into
    # the model instead: one pass and no temporary to page-fault in (see docs/performance.md).
    # Only the model loader takes this stream; it may hand GGUF blocks (`GgufQuantized`) through.
    tensors_into: Callable[[Destination], NamedWeights] | None = None
    # A sealed model's identity, taken from the very manifest its MAC check authenticated
    # (sealing.format.manifest_identity); None for unauthenticated sources.
    identity: dict[str, str] | None = None


# -- GGUF ---------------------------------------------------------------------------------------


def open_gguf(path: Path) -> Checkpoint:
    try:
        reader = _plain_reader_class()(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (llama only)")
    names = {t.name for t in reader.tensors}
    try:
        config = _gguf_config(fields, tied="output.weight" not in names)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: incomplete llama metadata ({exc})") from None
    tokenizer = Tokenizer.from_gguf_fields(fields)
    name = str(fields.get("general.name") or path.stem)
    return Checkpoint(name, path, config, tokenizer, GgufTensors(reader, config, path))


@functools.cache
def _plain_reader_class() -> type:
    """``gguf.GGUFReader`` reading its map as a plain ndarray view: the reader slices the map
    once per piece of every field (two per tokenizer string), and each slice of a
    ``np.memmap`` runs numpy's Python-level subclass hooks; a plain view of the same pages
    reads the 1B shape's 128k-token header in 1.0 s instead of 3.0 s. The map itself is kept
    (`file_map`) for `GgufTensors.release_pages`."""
    import gguf

    class PlainMapReader(gguf.GGUFReader):
        file_map: np.memmap

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.memmap) -> None:
            self.file_map = mapped
            self._plain = mapped.view(np.ndarray)

    return PlainMapReader


def _gguf_config(fields: dict[str, Any], tied: bool) -> ModelConfig:
    def key(k: str) -> Any:
        return fields[f"llama.{k}"]

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(fields.get("llama.attention.head_count_kv") or heads),
        head_dim=int(fields.get("llama.rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(fields.get("llama.rope.freq_base") or 10000.0),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=tied,
    )


class GgufTensors:
    """A GGUF file's tensors, streamed: called, as floats (what every consumer takes; quantized
    tensors dequantized one at a time); `with_blocks`, quantized 2-D tensors as their raw blocks
    (`GgufQuantized`) for a model whose methods take them (`loader.load_model` asks). A consumer
    that replaces or wraps ``Checkpoint.tensors`` thereby loses the blocks stream too."""

    def __init__(self, reader: Any, config: ModelConfig, path: Path) -> None:
        # the tensors and the file's map only: the reader's metadata fields (one numpy view per
        # part of every tokenizer string, ~0.3 GB at a 128k vocabulary) are not kept alive
        self.tensors: list[Any] = list(reader.tensors)
        self.file_map: np.ndarray = reader.file_map  # the np.memmap
        self.config, self.path = config, path

    def __call__(self) -> NamedTensors:
        for name, item in self.with_blocks():
            yield name, item.dequantize() if isinstance(item, GgufQuantized) else item

    def release_pages(self, tensor: Any = None) -> None:
        """Drop the file's pages `tensor` was read through (all of them without one) from this
        process's memory: ``MADV_DONTNEED`` on the read-only map. They stay in the page cache, a
        view still held reads them back in, but a load no longer carries the file in its RSS
        next to the model built from it (the 1B shape's Q8_0: 1.3 GB). Best effort: without
        madvise they just stay."""
        start, stop = 0, self.file_map.nbytes
        if tensor is not None:
            start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
            stop = min(stop, tensor.data_offset + tensor.n_bytes)
        self._advise_dontneed(start, stop)

    def release_view(self, view: np.ndarray) -> None:
        """Drop the pages wholly inside `view`, a contiguous view of the file's map, from this
        process's memory (as `release_pages`); anything else is left alone: ``MADV_DONTNEED``
        on our own memory would zero it."""
        if not view.flags.c_contiguous or view.base is None:
            return
        start = view.__array_interface__["data"][0] - self.file_map.__array_interface__["data"][0]
        stop = start + view.nbytes
        if start < 0 or stop > self.file_map.nbytes:
            return  # not a view of this map
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: a neighbour's
        self._advise_dontneed(first, stop - stop % mmap.PAGESIZE)  # rows share the end pages

    def _advise_dontneed(self, start: int, stop: int) -> None:
        """``MADV_DONTNEED`` on bytes [start, stop) of the file's map (start page-aligned)."""
        mapped = getattr(self.file_map, "_mmap", None)  # numpy's map of the whole file
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= start:
            return
        with contextlib.suppress(OSError):  # best effort: the pages just stay
            mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def with_blocks(self) -> Iterator[tuple[str, torch.Tensor | GgufQuantized]]:
        for t in self.tensors:
            name = _hf_name(t.name)
            shape = tuple(int(d) for d in reversed(t.shape))
            try:
                item = _gguf_tensor(t, shape, self.release_view)
                # llama.cpp stores q/k rows interleaved for its rotary kernel; undo it
                # (rotate-half layout): on blocks, each row's blocks move together
                if name.endswith("q_proj.weight"):
                    item = _unpermute_rope(item, self.config.num_heads)
                elif name.endswith("k_proj.weight"):
                    item = _unpermute_rope(item, self.config.num_kv_heads)
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"{self.path}: tensor {t.name}: {exc}") from None
            yield name, item
            self.release_pages(t)  # the consumer has taken it


def _gguf_tensor(
    t: Any, shape: tuple[int, ...], release: Callable[[np.ndarray], None]
) -> torch.Tensor | GgufQuantized:
    kind = t.tensor_type.name
    if kind not in ("F32", "F16", "BF16") and len(shape) == 2:
        return GgufQuantized(kind, (shape[0], shape[1]), t.data, release)
    if kind in ("F32", "F16"):
        # torch widens from the map (vectorised; numpy's fp16 -> fp32 took 4 s of a 1B load)
        # into fresh memory: the read-only map itself is never written or handed on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            mapped = torch.from_numpy(np.asarray(t.data))
        return mapped.to(torch.float32, copy=True).reshape(shape)
    from gguf.quants import dequantize

    array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not array.flags.writeable:  # unquantized tensors come straight from the memory map
        array = array.copy()
    return torch.from_numpy(array.reshape(shape))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[2] in GGUF_LAYER_NAMES
        and parts[3] == "weight"
    ):
        return f"model.layers.{int(parts[1])}.{GGUF_LAYER_NAMES[parts[2]]}.weight"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no place in a llama model")


def _unpermute_rope(
    weight: torch.Tensor | GgufQuantized, heads: int
) -> torch.Tensor | GgufQuantized:
    if isinstance(weight, GgufQuantized):
        return weight.permute_rows(rope_row_order(weight.rows, heads))
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# -- Hugging Face directory ---------------------------------------------------------------------


def open_hf_directory(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: not a model directory (no config.json)")
    try:
        raw = json.loads(config_path.read_text())
        config = ModelConfig.from_hf(raw)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: not a usable Llama config ({exc})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    tokenizer = Tokenizer.from_hf_directory(folder)
    return Checkpoint(folder.name, folder, config, tokenizer, lambda: _safetensors(files))


def _safetensors(files: list[Path]) -> NamedTensors:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def save_hf_directory(
    checkpoint: Checkpoint, folder: Path, dtype: torch.dtype | None = None
) -> None:
    """Write `checkpoint` as a Hugging Face-style directory (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: (t.to(dtype) if dtype else t).contiguous() for name, t in checkpoint.tensors()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(checkpoint.config.to_hf(), indent=2))
    checkpoint.tokenizer.save_hf_directory(folder)
