"""Logprobs in OpenAI's two shapes: completions' parallel lists and chat's per-token entries."""

from __future__ import annotations

from typing import Iterable

from api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob
from engine.outputs import PositionLogprobs, RequestOutput


def _token_text(token_id: int, position: PositionLogprobs | None, tokenizer) -> str:
    entry = position.get(token_id) if position else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id])


def completion_logprobs(entries: Iterable[tuple[int, PositionLogprobs | None]], offset: int,
                        tokenizer) -> CompletionLogprobs:
    """Completions' shape: parallel lists; top_logprobs maps token text to logprob (the sampled
    token always included, so up to logprobs + 1 entries)."""
    out = CompletionLogprobs([], [], [], [])
    for token_id, position in entries:
        text = _token_text(token_id, position, tokenizer)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if position is None:  # the first prompt token has nothing before it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(position[token_id].logprob)
        out.top_logprobs.append({_token_text(t, position, tokenizer): lp.logprob for t, lp in position.items()})
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int, tokenizer) -> ChatLogprobs:
    """Chat's shape: one entry per token with its bytes and the top_k most likely alternatives."""
    content = []
    for token_id, position in zip(token_ids, positions):
        text = _token_text(token_id, position, tokenizer)
        best = sorted(position.items(), key=lambda item: -item[1].logprob)[:top_k]
        top = [TopLogprob(t_text, lp.logprob, list(t_text.encode()))
               for t_text, lp in ((_token_text(t, position, tokenizer), lp) for t, lp in best)]
        content.append(ChatTokenLogprob(text, position[token_id].logprob, list(text.encode()), top))
    return ChatLogprobs(content)


def prompt_logprobs(output: RequestOutput, tokenizer) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a completion choice: per prompt position (None for the first, which
    nothing comes before), token id -> its logprob, rank and text."""
    return [None if position is None else
            {token_id: PromptLogprob(lp.logprob, lp.rank, _token_text(token_id, position, tokenizer))
             for token_id, lp in position.items()}
            for position in (output.prompt_logprobs or [None] * len(output.prompt_token_ids))]
