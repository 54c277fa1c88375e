"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, like vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence as Seq

from tqdm.auto import tqdm

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

Message = dict  # {"role": ..., "content": ...}


class LLM:
    """Generate text for a batch of prompts with continuous batching.

    Keyword arguments are `EngineArgs` fields (vLLM's names): dtype, max_model_len,
    gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, block_size, seed,
    enforce_eager, tensor_parallel_size, quantization, enable_prefix_caching, ...
    """

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs):
        unknown = set(kwargs) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {sorted(unknown)}")
        if kwargs.get("engine_process"):
            raise ValueError("engine_process is for the server; LLM runs the engine in this process")
        self.llm_engine = LLMEngine(EngineArgs(model=model, tokenizer=tokenizer, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. A single prompt may be
        a string, a list of token ids, or a {"prompt_token_ids": [...]} / {"prompt": ...} dict."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        final_only: dict[int, SamplingParams] = {}  # the caller's params stay untouched
        try:
            for prompt, params in zip(prompts, sampling_params):
                if id(params) not in final_only:
                    final_only[id(params)] = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(str(next(self._ids)))
                engine.add_request(ids[-1], prompt, final_only[id(params)])
        except BaseException:
            engine.abort_request(ids)  # leave the engine as it was, whatever went wrong
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate.
        As vLLM's: `continue_final_message` leaves the last message open for the model to go on with
        (add_generation_prompt must then be False); `chat_template_kwargs` are more template variables
        (Qwen3's enable_thinking)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        if chat_template is None and tokenizer.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
        prompts = [
            {
                "prompt_token_ids": tokenizer.apply_chat_template(
                    conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=True,
                    return_dict=False, continue_final_message=continue_final_message, **(chat_template_kwargs or {})
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        start = time.perf_counter()
        prompt_tokens_at_start = engine.prompt_tokens_total
        generated_at_start = engine.generation_tokens_total
        try:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in wanted:  # not another caller's request
                        finished[output.request_id] = output
                        if bar is not None:
                            elapsed = time.perf_counter() - start
                            bar.set_postfix_str(
                                f"input: {(engine.prompt_tokens_total - prompt_tokens_at_start) / elapsed:.0f} tok/s, "
                                f"output: {(engine.generation_tokens_total - generated_at_start) / elapsed:.0f} tok/s",
                                refresh=False,
                            )
                            bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]
