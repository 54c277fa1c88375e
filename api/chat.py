"""/v1/chat/completions: the messages rendered through the chat template into one prompt, n
choices of it, and logprobs in chat's shape. `chat_prompt` also serves /tokenize."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

import jinja2
from starlette.requests import Request
from starlette.responses import Response

from api.encoding import SSE_DONE, json_response, sse
from api.errors import APIError
from api.generation import (INLINE_TOKENIZE_CHARS, Cursor, Generation, continuous_usage, include_usage, new_parts,
                            sampling_params, truncated, usage)
from api.logprobs import chat_logprobs
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
    TokenizeRequest,
)
from api.server import Server, read_json
from api.streaming import EventStream, unless_disconnected
from engine.async_engine import AsyncLLMEngine
from engine.sampling_params import SamplingParams


def chat_prompt(server: Server, tokenizer, req: ChatCompletionRequest | TokenizeRequest) -> dict:
    """The engine prompt for a request's messages: rendered and tokenized (slow for long ones: run it
    off the event loop). The template writes the special tokens (BOS, headers) itself."""
    text = render_chat(server, tokenizer, req)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))}


# Arguments of apply_chat_template that chat_template_kwargs may not set (the request's own fields do)
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "chat_template", "add_generation_prompt",
                             "continue_final_message", "tokenize", "tools", "documents", "return_dict",
                             "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def render_chat(server: Server, tokenizer, req: ChatCompletionRequest | TokenizeRequest) -> str:
    """The request's messages through the chat template, with vLLM's options: add_generation_prompt,
    continue_final_message (the last message left open, so the model continues it) and
    chat_template_kwargs (more variables for the template)."""
    messages = req.messages
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if server.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template (none in its tokenizer files); start the server "
                            "with --chat-template FILE, or use /v1/completions", param="messages")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true (set "
                            "add_generation_prompt to false to continue the last message)",
                       param="continue_final_message")
    template_kwargs = req.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)} (use the request's own "
                            "fields)", param="chat_template_kwargs")
    conversation = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text for part in content)
        conversation.append({"role": message.role, "content": content or ""}
                            | ({"name": message.name} if message.name else {}))
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=server.chat_template,
                                             add_generation_prompt=req.add_generation_prompt,
                                             continue_final_message=req.continue_final_message, tokenize=False,
                                             **template_kwargs)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"the chat template failed on these messages: {exc}", param="messages") from exc
    except ValueError as exc:  # continue_final_message: the last message's text not found in the rendering
        raise APIError(400, f"the chat template cannot render these messages so: {exc}", param="messages") from exc


async def create_chat_completion(request: Request, server: Server) -> Response:
    req = await read_json(request, ChatCompletionRequest, server.max_body_bytes)
    engine = server.ready_engine()
    server.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
    top_logprobs = req.top_logprobs or 0
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, top_logprobs if req.logprobs else None)
    engine.check_not_overloaded()  # before the tokenizing, which may take seconds
    length = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or [])
                 for m in req.messages)
    if length <= INLINE_TOKENIZE_CHARS:
        prompt = chat_prompt(server, engine.tokenizer, req)
    else:
        prompt = await asyncio.to_thread(chat_prompt, server, engine.tokenizer, req)
    prompt = truncated(prompt, req, engine.tokenizer, engine.max_model_len)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    head = (request_id, int(time.time()), server.served_model_name)
    if req.stream:
        return EventStream(_chat_events(server, engine, req, head, prompt, params, top_logprobs))
    return await unless_disconnected(
        request, lambda: _chat_response(server, engine, req, head, prompt, params, top_logprobs))


async def _chat_response(server: Server, engine: AsyncLLMEngine, req: ChatCompletionRequest, head: tuple,
                         prompt: dict, params: SamplingParams, top_logprobs: int) -> Response:
    generation = await Generation.start(server, engine, head[0], [prompt], params)
    try:
        [final] = await generation.final_outputs()
    finally:
        generation.close()
    choices = [
        ChatChoice(
            c.index,
            ChatMessage("assistant", c.text),
            chat_logprobs(c.token_ids, c.logprobs, top_logprobs, engine.tokenizer, req.return_tokens_as_token_ids)
            if req.logprobs else None,
            c.finish_reason,
            c.stop_reason,
        )
        for c in final.outputs
    ]
    return json_response(ChatCompletionResponse(*head, choices, usage([final])))


async def _chat_events(server: Server, engine: AsyncLLMEngine, req: ChatCompletionRequest, head: tuple,
                       prompt: dict, params: SamplingParams, top_logprobs: int) -> AsyncIterator[bytes]:
    generation = await Generation.start(server, engine, head[0], [prompt], params)
    try:
        for index in range(params.n):
            yield sse(ChatCompletionChunk(*head, [ChatChunkChoice(index, DeltaMessage(role="assistant", content=""))]))
        cursors = [Cursor() for _ in range(params.n)]
        final = None
        async for _, final in generation.outputs():
            for c in final.outputs:
                parts = new_parts(cursors[c.index], c, with_tokens=req.logprobs)
                if parts is None:
                    continue
                text, tokens = parts
                logprobs = None
                if req.logprobs:
                    logprobs = chat_logprobs(c.token_ids[tokens], c.logprobs[tokens], top_logprobs, engine.tokenizer,
                                             req.return_tokens_as_token_ids)
                choice = ChatChunkChoice(c.index, DeltaMessage(content=text), logprobs, c.finish_reason, c.stop_reason)
                yield sse(ChatCompletionChunk(*head, [choice], usage([final]) if continuous_usage(req) else None))
        if include_usage(req):
            yield sse(ChatCompletionChunk(*head, [], usage([final])))
        yield SSE_DONE
    finally:
        generation.close()
