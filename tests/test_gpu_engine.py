"""The GPU fast path end to end: torch.compile + CUDA graphs against eager, and against
transformers in bf16. Run on a CUDA machine with `python -m pytest -m gpu`."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.demo_model import build_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Graph buckets 2, 4, 8, 16 and 24 (one sequence pads to 2): the tests hit each edge and one past it.
BUCKETS = [2, 4, 8, 16, 24]
EDGE_BATCH_SIZES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(
        str(tmp_path_factory.mktemp("gpu-llama")), "LlamaForCausalLM", seed=3, dtype=torch.bfloat16,
        hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    )


def prompts_for(batch_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(5, 900) for _ in range(rng.randrange(1, 90))]} for _ in range(batch_size)]


# Graphs vs eager is compared in float32, where the two paths must give the same greedy tokens.
# In bf16 this random model is too sensitive for that: on the CPU its bf16 and fp32 prompt
# logprobs differ by up to 0.47, and on the H100 two bf16 paths flipped tokens outside each
# other's top-5 at batch sizes 3 and 17 (2026-11-25), which is rounding, not a wrong row.
@pytest.fixture(scope="module")
def eager(checkpoint) -> LLM:
    return LLM(checkpoint, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=32)


@pytest.fixture(scope="module")
def graphed(checkpoint) -> LLM:
    return LLM(checkpoint, dtype="float32", max_model_len=512, max_num_seqs=32, cuda_graph_sizes=BUCKETS)


@pytest.fixture(scope="module")
def graphed_bf16(checkpoint) -> LLM:
    return LLM(checkpoint, dtype="bfloat16", max_model_len=512, max_num_seqs=32, cuda_graph_sizes=BUCKETS)


def test_graphs_were_captured_for_every_bucket(graphed):
    runner = graphed.llm_engine.runner
    assert sorted(runner.graph_runner.graphs) == BUCKETS


@pytest.mark.parametrize("batch_size", EDGE_BATCH_SIZES)
def test_compiled_and_graphed_greedy_equals_eager_at_bucket_edges(eager, graphed, batch_size):
    prompts = prompts_for(batch_size, seed=batch_size)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want


def test_no_recompiles_after_warmup(graphed):
    graphed.generate(prompts_for(13, seed=99), GREEDY, use_tqdm=False)
    assert graphed.llm_engine.runner.recompiles_since_warmup() == 0


def test_greedy_equals_transformers_in_bf16_where_margins_allow(checkpoint, graphed_bf16):
    """bf16 rounding differs between implementations, so a token may flip where the top two logits
    nearly tie. Teacher-force transformers along our tokens: every step must pick transformers'
    argmax, or a token in its top 3 whose logit is within bf16 noise (5% of the top logit; the
    two bf16 implementations were seen 0.19 apart at a logit of 8.4 on the H100)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    prompts = prompts_for(8, seed=7)
    outputs = graphed_bf16.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ids = prompt["prompt_token_ids"] + out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        n = len(prompt["prompt_token_ids"])
        for step, token in enumerate(out.outputs[0].token_ids):
            row = logits[n - 1 + step]
            best = int(row.argmax())
            if token != best:
                assert token in row.topk(3).indices.tolist(), f"step {step}: ours {token}, transformers {best}"
                assert row[best] - row[token] < 0.05 * row[best].abs(), f"step {step}: ours {token}, transformers {best}"
