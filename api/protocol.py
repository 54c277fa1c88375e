"""Request and response bodies of the OpenAI-compatible API, as msgspec Structs.

Names and meanings are OpenAI's, plus vLLM's extras (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, skip_special_tokens, stop_token_ids, ...). Requests are decoded with
`msgspec.json.decode(body, type=...)`, so a wrong type or a missing field fails with msgspec's own
message (which names the field); unknown fields are ignored, as OpenAI's clients send some we do not
use. Responses are encoded with `msgspec.json.encode`. Fields OpenAI documents as nullable (n,
stream, echo, chat's logprobs) take null as their default. Features we do not implement (best_of,
suffix, structured output, tool calls) are refused by name instead of ignored.
"""

from __future__ import annotations

from typing import Any

from msgspec import UNSET, Struct, UnsetType

# ---- requests ---------------------------------------------------------------------------------------


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False  # a last chunk with empty choices and the usage
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class SamplingRequest(Struct, kw_only=True):
    """The fields completions and chat completions share. None means "the default"."""

    model: str | None = None  # the served model's name; None = the one served
    n: int | None = 1  # None (null) = 1
    temperature: float | None = None  # default 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as by OpenAI for abuse tracking
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI) -> bias in [-100, 100]
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (-1: max_model_len)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N", not by their text
    # Read only to refuse them (api/generation.refuse_unsupported): clients must not be silently ignored.
    best_of: int | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's structured-output extras
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    def __post_init__(self) -> None:
        self.n = 1 if self.n is None else self.n
        self.stream = bool(self.stream)


class CompletionRequest(SamplingRequest, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists. (msgspec allows
    # one array type per union; the app checks the list is homogeneous.)
    prompt: str | list[str | int | list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # top-k logprobs per token (plus the sampled one)
    echo: bool | None = False  # put the prompt in front of the completion
    prompt_logprobs: int | None = None  # vLLM's: top-k logprobs of every prompt token (and the token's own)
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS (etc.) in front of a text prompt
    suffix: str | None = None  # refused when set: no fill-in-the-middle

    def __post_init__(self) -> None:
        super().__post_init__()
        self.echo = bool(self.echo)


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageParam(Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: list[ChatMessageParam]
    max_tokens: int | None = None  # None: up to max_model_len
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when set
    logprobs: bool | None = False
    top_logprobs: int | None = None  # 0..20, needs logprobs=true
    add_generation_prompt: bool = True  # vLLM's: end the prompt with the assistant header
    continue_final_message: bool = False  # vLLM's: leave the last message open for the model to go on with
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more template variables (Qwen3's enable_thinking)
    add_special_tokens: bool = False  # vLLM's: the tokenizer's BOS on top of the template's rendering
    tools: list[dict[str, Any]] | None = None  # refused unless tool_choice is "none": no tool calling
    tool_choice: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.logprobs = bool(self.logprobs)


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (their template adds them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


# ---- responses --------------------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(Struct):
    """vLLM's entry of a prompt position: a token's logprob, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's, only when asked for (prompt_logprobs): per prompt position (None for the first), token id ->
    # entry. Absent from the JSON otherwise.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | UnsetType = UNSET


class CompletionResponse(Struct):
    """A completion, or one chunk of a streamed one (same object name, as OpenAI does)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]


class ChatMessage(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class DeltaMessage(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(Struct):
    id: str
    created: int
    root: str  # the checkpoint it was loaded from
    max_model_len: int
    owned_by: str = "engine"
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Struct):
    prompt: str


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorInfo
