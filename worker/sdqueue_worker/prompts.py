"""Prompts past CLIP's 77-token window, encoded in chunks (as A1111 and compel do), never cut.

CLIP reads 77 tokens: a start token, 75 prompt tokens and an end token. diffusers truncates
anything longer (with a log warning). Here a prompt of more than 75 tokens is split into 75-token
chunks; each chunk is wrapped in start/end tokens, padded to 77 and encoded on its own, and the
chunks' hidden states are concatenated along the sequence axis (the UNet's cross-attention takes
any length). The negative prompt is chunked the same way and padded with empty chunks to the same
length. SDXL: both text encoders (penultimate hidden states, as diffusers uses), concatenated per
chunk; the pooled embedding is text_encoder_2's projection of the first chunk.

Prompts of up to 75 tokens take diffusers' own encode path unchanged, so short prompts produce
the same images as before. Jobs batch together only with the same chunk count (the batch key
holds it), because padding a short prompt with empty chunks would change its image.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_TOKENS = 75


@dataclass(frozen=True)
class PromptLength:
    """Token counts of a job's prompts (without start/end tokens) and the chunks they need."""

    tokens: int
    negative_tokens: int

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.tokens / CHUNK_TOKENS), math.ceil(self.negative_tokens / CHUNK_TOKENS))

    def describe(self) -> dict[str, Any]:
        """What the manifest records."""
        return {
            "tokens": self.tokens,
            "negative_tokens": self.negative_tokens,
            "chunks": self.chunks,
            "encoding": "chunked" if self.chunks > 1 else "diffusers",
        }


class PromptCounter:
    """Counts tokens for task threads with a private copy of the tokenizer (a tokenizer shared
    with the GPU thread could be used concurrently with other padding settings)."""

    def __init__(self, pipe: Any) -> None:
        self._tokenizers = [copy.deepcopy(tok) for tok in _tokenizers(pipe)]
        for tokenizer in self._tokenizers:
            tokenizer.model_max_length = 10**9  # counting only: no "longer than 77" warning per job
        self._lock = threading.Lock()

    def measure(self, prompt: str, negative_prompt: str) -> PromptLength:
        with self._lock:
            return PromptLength(self._count(prompt), self._count(negative_prompt))

    def _count(self, text: str) -> int:
        return max(len(_token_ids(tok, text)) for tok in self._tokenizers) if text else 0


def _tokenizers(pipe: Any) -> list[Any]:
    return [tok for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tok is not None]


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    return ids


def chunk_ids(tokenizer: Any, text: str, chunks: int) -> torch.Tensor:
    """(chunks, 77) token ids: each chunk ``[start] + 75 tokens + [end] + padding``."""
    ids = _token_ids(tokenizer, text) if text else []
    if len(ids) > chunks * CHUNK_TOKENS:
        raise ValueError(f"prompt has {len(ids)} tokens, more than {chunks} chunks hold")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for index in range(chunks):
        piece = ids[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS]
        rows.append(
            [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (CHUNK_TOKENS - len(piece))
        )
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class PromptEmbeddings:
    """One prompt's embeddings: (1, chunks * 77, dim), plus SDXL's pooled (1, dim2)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


def encode_chunked(pipe: Any, text: str, chunks: int) -> PromptEmbeddings:
    """Encode ``text`` as ``chunks`` 77-token windows with every text encoder of the pipeline."""
    encoders = [enc for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if enc is not None]
    sdxl = len(encoders) == 2
    hidden: list[torch.Tensor] = []
    pooled = None
    for tokenizer, encoder in zip(_tokenizers(pipe), encoders, strict=True):
        ids = chunk_ids(tokenizer, text, chunks).to(encoder.device)
        output = encoder(ids, output_hidden_states=sdxl)
        hidden.append(output.hidden_states[-2] if sdxl else output[0])
        if encoder is getattr(pipe, "text_encoder_2", None):
            pooled = output[0][:1]
    states = torch.cat(hidden, dim=-1)
    embeds = states.reshape(1, chunks * states.shape[1], states.shape[-1])
    return PromptEmbeddings(embeds.to(encoders[-1].dtype), pooled)


def batch_embeddings(pipe: Any, rows: list[tuple[str, str]], chunks: int) -> dict[str, torch.Tensor]:
    """Pipeline kwargs (``prompt_embeds``, ``negative_prompt_embeds``, SDXL pooled) for rows of
    (prompt, negative prompt), each prompt encoded once."""
    cache: dict[str, PromptEmbeddings] = {}

    def encoded(text: str) -> PromptEmbeddings:
        if text not in cache:
            cache[text] = encode_chunked(pipe, text, chunks)
        return cache[text]

    positive = [encoded(prompt) for prompt, _ in rows]
    negative = [encoded(negative) for _, negative in rows]
    kwargs = {
        "prompt_embeds": torch.cat([p.embeds for p in positive]),
        "negative_prompt_embeds": torch.cat([n.embeds for n in negative]),
    }
    if positive[0].pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.cat([p.pooled for p in positive if p.pooled is not None])
        kwargs["negative_pooled_prompt_embeds"] = torch.cat(
            [n.pooled for n in negative if n.pooled is not None]
        )
    return kwargs
