"""Synthetic Llama models of real shapes, as GGUF files both engines load (`tdllm bench --shape`).

Random weights (seeded, normal with std 0.02) in the shapes of SmolLM2-135M, Llama-3.2-1B and
Llama-3.1-8B, written with the ``gguf`` package into a cache folder (``.tdllm/synthetic``) and
reused when present. The weights are drawn a block of rows at a time and quantized by
``gguf.quants.quantize`` (F16, Q8_0, Q4_0: all three are implemented there), then streamed into
the file, so writing never holds a whole tensor of floats. Norms are F32, as llama.cpp writes
them. In the Q4_0 file the embedding and the output head are Q8_0: our int4 setting keeps the
lm_head int8 (`tdllm.model.quantized.quant_table`) and llama.cpp's Q4 mixes keep it wider too,
so both engines read the same bytes for it.

The tokenizer is a byte-level BPE (``tokenizer.ggml.model = gpt2``, pre-tokenizer ``default``:
the one both our loader and llama.cpp accept) trained by ``tokenizers`` on a short built-in text
and padded with filler tokens to the shape's vocabulary size, then two control tokens (BOS/EOS).
Llama 3's rope scaling is left out (our engine does not implement it; it does not change the
arithmetic per token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdllm.errors import UsageError

DEFAULT_DIR = Path(".tdllm") / "synthetic"
WRITER_VERSION = "v1"  # a new writer gets a new tag, so files of an older one are not reused
SEED = 0
WEIGHT_STD = 0.02
CHUNK_ROWS = 1024  # rows drawn and quantized at a time
BPE_MERGED = 2000  # trained BPE tokens (bytes + merges) before the fillers


@dataclass(frozen=True)
class Shape:
    """A Llama-family model's dimensions (what `tdllm.model.config.ModelConfig` reads back)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    context: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """GGUF tensor names and PyTorch-order shapes, in file order."""
        kv = self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += [
                (f"blk.{i}.attn_norm.weight", (self.hidden,)),
                (f"blk.{i}.attn_q.weight", (self.hidden, self.hidden)),
                (f"blk.{i}.attn_k.weight", (kv, self.hidden)),
                (f"blk.{i}.attn_v.weight", (kv, self.hidden)),
                (f"blk.{i}.attn_output.weight", (self.hidden, self.hidden)),
                (f"blk.{i}.ffn_norm.weight", (self.hidden,)),
                (f"blk.{i}.ffn_gate.weight", (self.ffn, self.hidden)),
                (f"blk.{i}.ffn_up.weight", (self.ffn, self.hidden)),
                (f"blk.{i}.ffn_down.weight", (self.hidden, self.ffn)),
            ]
        out.append(("output_norm.weight", (self.hidden,)))
        if not self.tied:
            out.append(("output.weight", (self.vocab, self.hidden)))
        return out

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensors())


SHAPES = {
    "135m": Shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, tied=True, rope_theta=100000.0),
    "1b": Shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, tied=True),
    "8b": Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, tied=False),
}

# format -> (GGUF type of the projections, of the embedding/output, our engine's quant setting)
FORMATS = {
    "f16": ("F16", "F16", "none"),
    "q8_0": ("Q8_0", "Q8_0", "int8"),
    "q4_0": ("Q4_0", "Q8_0", "int4"),
}


def shape_named(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise UsageError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}") from None


def format_named(name: str) -> tuple[str, str, str]:
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def tensor_type(name: str, fmt: str) -> str:
    """The GGUF type of tensor `name` in a file of format `fmt`."""
    projection, outer, _ = format_named(fmt)
    if name.endswith("norm.weight"):
        return "F32"
    if name in ("token_embd.weight", "output.weight"):
        return outer
    return projection


def tensor_bytes(name: str, shape: tuple[int, ...], fmt: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[tensor_type(name, fmt)]]
    return int(np.prod(shape)) // block * size


def file_bytes(shape: Shape, fmt: str) -> int:
    """The tensor data of the file (what llama.cpp maps; the header adds a few MB)."""
    return sum(tensor_bytes(n, s, fmt) for n, s in shape.tensors())


def decode_bytes(shape: Shape, fmt: str) -> int:
    """Weight bytes a decode step reads from this file's tensors: every projection, the norms and
    the output head (the embedding itself is one row per token, not counted unless tied)."""
    total = 0
    for name, dims in shape.tensors():
        if name != "token_embd.weight" or shape.tied:
            total += tensor_bytes(name, dims, fmt)
    return total


def cached_path(folder: Path, key: str, shape: Shape, fmt: str, seed: int = SEED) -> Path:
    return folder / f"{key}-{fmt}-seed{seed}-{WRITER_VERSION}-{shape.layers}l.gguf"


def ensure_gguf(
    key: str,
    fmt: str,
    folder: Path = DEFAULT_DIR,
    seed: int = SEED,
    shape: Shape | None = None,
    progress: bool = True,
) -> Path:
    """The cached file of shape `key` in format `fmt`, written first if missing (atomically:
    a temporary name, renamed when complete)."""
    shape = shape or shape_named(key)
    format_named(fmt)
    path = cached_path(folder, key, shape, fmt, seed)
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        write_gguf(tmp, shape, fmt, seed, progress)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_gguf(path: Path, shape: Shape, fmt: str, seed: int = SEED, progress: bool = True) -> None:
    """Write `shape` with random weights in format `fmt` to `path` (streamed, a tqdm bar)."""
    import gguf
    from tqdm import tqdm

    writer = gguf.GGUFWriter(path, "llama")
    _metadata(writer, shape, fmt)
    plan = [(name, dims, gguf.GGMLQuantizationType[tensor_type(name, fmt)])
            for name, dims in shape.tensors()]  # fmt: skip
    for name, dims, qtype in plan:
        nbytes = tensor_bytes(name, dims, fmt)
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if writer.fout is None:
        raise RuntimeError(f"{path}: the GGUF writer opened no file")
    out = writer.fout[0]
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(d)) for _, d, _ in plan)
    with tqdm(total=total, unit="w", unit_scale=True, desc=path.name, disable=not progress) as bar:
        for name, dims, qtype in plan:
            writer.write_padding(out, out.tell())
            written = 0
            for chunk in _chunks(rng, name, dims):
                data = gguf.quants.quantize(chunk, qtype)
                data.tofile(out)
                written += data.nbytes
                bar.update(chunk.size)
            writer.write_padding(out, written)
    writer.close()


def _chunks(rng: np.random.Generator, name: str, dims: tuple[int, ...]) -> Iterator[np.ndarray]:
    if len(dims) == 1:  # norms: around 1, as trained models have them
        yield (1.0 + 0.1 * rng.standard_normal(dims[0], dtype=np.float32)).astype(np.float32)
        return
    rows, cols = dims
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        chunk = rng.standard_normal((n, cols), dtype=np.float32)
        chunk *= np.float32(WEIGHT_STD)
        yield chunk


def _metadata(writer: Any, shape: Shape, fmt: str) -> None:
    writer.add_name(f"synthetic {shape.name} ({fmt}, seed {SEED})")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    tokens, merges, types = synthetic_vocab(shape.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(shape.vocab - 2)
    writer.add_eos_token_id(shape.vocab - 1)
    writer.add_add_bos_token(False)


def synthetic_vocab(size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a byte-level BPE of exactly `size` tokens: one trained
    on the bench's own text (bytes and merges), filler tokens no merge reaches, then BOS and EOS
    as control tokens (the last two ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tdllm_lab.bench.engine_worker import TEXT

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if size < len(alphabet) + 2:
        raise ValueError(f"a byte-level vocabulary needs at least {len(alphabet) + 2} tokens")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=min(BPE_MERGED, size - 2),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator([TEXT] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = sorted(vocab, key=vocab.__getitem__)
    tokens += [f"filler{i}" for i in range(size - 2 - len(tokens))]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    if len(set(tokens)) != size:
        raise ValueError("synthetic vocabulary: a filler token collides with a trained one")
    types = [1] * (size - 2) + [3, 3]  # normal, then control (llama.cpp's token types)
    return tokens, merges, types
