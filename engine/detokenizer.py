"""Incremental detokenization and stop-string handling.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
sentencepiece (a token's leading space depends on its neighbours). So, like vLLM and TGI, each step
decodes a short window of recent tokens twice — with and without the new ones — and emits the
difference, holding it back while it ends in an incomplete UTF-8 character (U+FFFD).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine.sequence import Sequence


class IncrementalDetokenizer:
    """Turns each sequence's newest tokens into text, one step at a time."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # The Rust tokenizer directly: the same text as tokenizer.decode without its Python
            # overhead, which costs more than the model step at large batch sizes. Called as
            # decode(ids, skip_special_tokens=...), like tokenizer.decode: no Python layer between.
            self._decode = backend.decode
        else:
            self._decode = tokenizer.decode
        # The text of single tokens, by skip_special_tokens then token id (a decode is a pure
        # function of its ids): one decoding sequence's prefix window is its previous token, so
        # the step's first decode is mostly a look-up here. At most one entry per vocabulary token.
        self._token_texts: dict[bool, dict[int, str]] = {False: {}, True: {}}

    def decode_token(self, token_id: int, skip_special_tokens: bool = False) -> str:
        texts = self._token_texts[skip_special_tokens]
        text = texts.get(token_id)
        if text is None:
            text = texts[token_id] = self._decode([token_id], skip_special_tokens=skip_special_tokens)
        return text

    def step(self, seq: Sequence, final: bool = False) -> str:
        """Append the text of `seq`'s newest tokens to `seq.output_text`; returns the new text.
        `final` flushes a trailing incomplete character too (the sequence ended on it)."""
        skip = seq.request.params.skip_special_tokens
        tokens, prefix_offset = seq.token_ids, seq.prefix_offset
        if seq.read_offset - prefix_offset == 1:
            prefix_text = self._token_texts[skip].get(tokens[prefix_offset])
            if prefix_text is None:
                prefix_text = self.decode_token(tokens[prefix_offset], skip)
        else:
            prefix_text = self._decode(tokens[prefix_offset : seq.read_offset], skip_special_tokens=skip)
        full_text = self._decode(tokens[prefix_offset:], skip_special_tokens=skip)
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            new_text = full_text[len(prefix_text) :]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(seq.token_ids)
            seq.output_text += new_text
            return new_text
        return ""


def find_stop_string(seq: Sequence, new_text_len: int) -> str | None:
    """If a stop string appeared in the newest text, cut the output there and return it."""
    params = seq.params
    for stop in params.stop_strings:
        # Only the new text, plus enough before it to catch a stop string that straddles the edge.
        search_from = max(len(seq.output_text) - new_text_len - len(stop) + 1, 0)
        at = seq.output_text.find(stop, search_from)
        if at != -1:
            end = at + len(stop) if params.include_stop_str_in_output else at
            seq.output_text = seq.output_text[:end]
            return stop
    return None


def visible_text_len(seq: Sequence) -> int:
    """How much of the output text a caller may see now: while running, hold back the tail that
    could still turn out to be the start of a stop string (which would then be cut). Only ever grows:
    a stop string found later starts at or after this point."""
    hold = seq.params.stop_hold
    if hold == 0 or seq.is_finished:
        return len(seq.output_text)
    return max(len(seq.output_text) - hold, 0)


def visible_text(seq: Sequence) -> str:
    return seq.output_text[: visible_text_len(seq)]
