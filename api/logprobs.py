"""Logprobs in OpenAI's two shapes: completions' parallel lists and chat's per-token entries."""

from __future__ import annotations

from typing import Iterable

from api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob
from engine.outputs import PositionLogprobs, RequestOutput


def _token_text(token_id: int, position: PositionLogprobs | None, tokenizer, as_ids: bool = False) -> str:
    """A token as logprobs show it: its text, or with `as_ids` (vLLM's return_tokens_as_token_ids)
    "token_id:N", which a client can map back to the exact token whatever its text."""
    if as_ids:
        return f"token_id:{token_id}"
    entry = position.get(token_id) if position else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def completion_logprobs(entries: Iterable[tuple[int, PositionLogprobs | None]], offset: int,
                        tokenizer, as_ids: bool = False) -> CompletionLogprobs:
    """Completions' shape: parallel lists; top_logprobs maps token text to logprob (the sampled
    token always included, so up to logprobs + 1 entries)."""
    out = CompletionLogprobs([], [], [], [])
    for token_id, position in entries:
        text = _token_text(token_id, position, tokenizer, as_ids)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if position is None:  # the first prompt token has nothing before it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(position[token_id].logprob)
        out.top_logprobs.append({_token_text(t, position, tokenizer, as_ids): lp.logprob for t, lp in position.items()})
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int, tokenizer,
                  as_ids: bool = False) -> ChatLogprobs:
    """Chat's shape: one entry per token with its bytes and the top_k most likely alternatives."""
    content = []
    for token_id, position in zip(token_ids, positions):
        text = _token_text(token_id, position, tokenizer, as_ids)
        best = sorted(position.items(), key=lambda item: -item[1].logprob)[:top_k]
        top = [TopLogprob(t_text, lp.logprob, list(t_text.encode()))
               for t_text, lp in ((_token_text(t, position, tokenizer, as_ids), lp) for t, lp in best)]
        content.append(ChatTokenLogprob(text, position[token_id].logprob, list(text.encode()), top))
    return ChatLogprobs(content)


def prompt_logprobs(output: RequestOutput, tokenizer) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a completion choice: per prompt position (None for the first, which
    nothing comes before), token id -> its logprob, rank and text."""
    return [None if position is None else
            {token_id: PromptLogprob(lp.logprob, lp.rank, _token_text(token_id, position, tokenizer))
             for token_id, lp in position.items()}
            for position in (output.prompt_logprobs or [None] * len(output.prompt_token_ids))]
