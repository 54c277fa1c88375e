"""The engine's models compute what transformers computes: same checkpoint, same logits, through a
real paged KV cache (prefill over several non-contiguous blocks, then decode)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.weight_loader import load_model
from graphs.compile import compile_model, num_compiled_graphs
from ops.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from tests.conftest import TINY_CHECKPOINTS

BLOCK_SIZE = 4
NUM_BLOCKS = 16
ATOL = 1e-4


@functools.cache
def engine_model(path: str) -> torch.nn.Module:
    return load_model(path, AutoConfig.from_pretrained(path), torch.float32, "cpu")


@functools.cache
def hf_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0]


class PagedRun:
    """Drives a model by hand over a paged KV cache, as the model runner does."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, head_dim)
        # NaN-filled, so attending to a slot nobody wrote shows up in the logits.
        self.kv_caches = [(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
                          for _ in range(config.num_hidden_layers)]
        self.model = model

    def step(self, seqs: list[tuple[list[int], int, list[int]]]) -> list[torch.Tensor]:
        """Run one flattened forward. Each entry is (new token ids, tokens already cached, block table);
        returns each sequence's logits for its new tokens."""
        input_ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
        for new_tokens, num_cached, block_table in seqs:
            for pos in range(num_cached, num_cached + len(new_tokens)):
                positions.append(pos)
                slots.append(block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            input_ids += new_tokens
            query_start.append(query_start[-1] + len(new_tokens))
            seq_lens.append(num_cached + len(new_tokens))
        width = max(len(table) for _, _, table in seqs)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([table + [0] * (width - len(table)) for _, _, table in seqs], dtype=torch.int32),
            max_query_len=max(len(new) for new, _, _ in seqs),
            max_seq_len=max(seq_lens),
        )
        with torch.no_grad(), set_forward_context(ForwardContext(meta, self.kv_caches, backend="torch")):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(new) for new, _, _ in seqs]))


PROMPT = [0, 71, 69, 437, 225, 741, 496, 688, 12, 300, 45]  # 11 tokens: spans 3 blocks of 4


@pytest.mark.parametrize("name", list(TINY_CHECKPOINTS))
def test_prefill_then_decode_logits_match_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    run = PagedRun(engine_model(path))
    block_table = [9, 2, 14]  # out of order and not adjacent

    (prefill,) = run.step([(PROMPT, 0, block_table)])
    assert prefill.dtype == torch.float32
    torch.testing.assert_close(prefill, hf_logits(path, PROMPT), atol=ATOL, rtol=0)

    next_token = int(prefill[-1].argmax())
    (decode,) = run.step([([next_token], len(PROMPT), block_table)])
    torch.testing.assert_close(decode[0], hf_logits(path, PROMPT + [next_token])[-1], atol=ATOL, rtol=0)


def test_two_sequences_of_different_lengths_in_one_forward(tiny_checkpoints):
    path = tiny_checkpoints["qwen3"]
    run = PagedRun(engine_model(path))
    a, b = PROMPT, [0, 17, 99, 5, 600]
    table_a, table_b = [3, 11, 6], [8, 1]

    logits_a, logits_b = run.step([(a, 0, table_a), (b, 0, table_b)])
    torch.testing.assert_close(logits_a, hf_logits(path, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_b, hf_logits(path, b), atol=ATOL, rtol=0)

    # Then one decode step for both, the second crossing into its next block.
    a, b = a + [int(logits_a[-1].argmax())], b + [int(logits_b[-1].argmax())]
    step_a, step_b = run.step([(a[-1:], len(a) - 1, table_a), (b[-1:], len(b) - 1, table_b)])
    torch.testing.assert_close(step_a[0], hf_logits(path, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step_b[0], hf_logits(path, b)[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_one_shot_prefill(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    run = PagedRun(engine_model(path))
    table = [5, 0, 12]
    (first,) = run.step([(PROMPT[:6], 0, table)])
    (rest,) = run.step([(PROMPT[6:], 6, table)])
    torch.testing.assert_close(torch.cat([first, rest]), hf_logits(path, PROMPT), atol=ATOL, rtol=0)


def test_tied_embeddings_share_one_tensor(tiny_checkpoints):
    tied = engine_model(tiny_checkpoints["llama3-tied"])
    untied = engine_model(tiny_checkpoints["llama"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_bfloat16_model_keeps_float32_rope_table_and_logits(tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    model = load_model(path, AutoConfig.from_pretrained(path), torch.bfloat16, "cpu")
    assert torch.get_default_dtype() == torch.float32  # restored after building
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos.dtype == torch.float32
    (logits,) = PagedRun(model).step([(PROMPT, 0, [1, 2, 3])])
    assert logits.dtype == torch.float32
    reference = hf_logits(path, PROMPT)
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_unsupported_rope_type_is_rejected_naming_supported_ones():
    from engine.models.layers import RotaryEmbedding

    with pytest.raises(ValueError, match=r"'yarn' is not supported; supported: default, linear, llama3"):
        RotaryEmbedding(16, 32, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ],
)
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.models.layers import rope_inverse_frequencies, rope_parameters

    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072, rope_parameters=rope)
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    expected = init(config)[0] if init else 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
    torch.testing.assert_close(rope_inverse_frequencies(128, rope_parameters(config)), expected, atol=0, rtol=0)


def test_rope_settings_read_from_transformers_4_style_config():
    from types import SimpleNamespace

    from engine.models.layers import rope_parameters

    old_style = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters(old_style) == {"type": "linear", "factor": 2.0, "rope_theta": 500000.0, "rope_type": "linear"}


class _Compiled(torch.nn.Module):
    """A model whose forward is graphs.compile's (the engine's compiled forward on GPUs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.config = model, model.config
        self.forward_fn = compile_model(model)

    def forward(self, input_ids, positions):
        return self.forward_fn(input_ids, positions)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


@pytest.mark.slow
@pytest.mark.parametrize("token_dim, graphs", [("unbacked", 1), ("backed", 2)])
def test_the_compiled_forward_serves_one_token_and_many_in_the_graphs_its_mark_needs(tiny_checkpoints, monkeypatch,
                                                                                     token_dim, graphs):
    """Inductor on the CPU: one compile covers a prefill, a one-token decode (dynamo would specialize
    size 1 and compile again, unless the token dimension is unbacked) and a two-sequence decode, and
    gives the eager model's logits. ENGINE_TOKEN_DIM=backed (A/B runs) pays that second graph."""
    monkeypatch.setenv("ENGINE_TOKEN_DIM", token_dim)
    torch._dynamo.reset()  # the forward's code object keeps the other mark's graph otherwise
    path = tiny_checkpoints["llama"]
    eager, compiled = PagedRun(engine_model(path)), PagedRun(_Compiled(engine_model(path)))
    graphs_before = num_compiled_graphs()
    table_a, table_b = [9, 2, 14, 3], [5, 7]
    b = [0, 17, 99, 5, 600]
    steps = [[(PROMPT, 0, table_a)], [([301], len(PROMPT), table_a)], [(b, 0, table_b)],
             [([302], len(PROMPT) + 1, table_a), ([77], len(b), table_b)]]
    for seqs in steps:
        for want, got in zip(eager.step(seqs), compiled.step(seqs)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert num_compiled_graphs() - graphs_before == graphs


def test_token_dim_mark_comes_from_the_environment(monkeypatch):
    from graphs.compile import token_dim_mark

    monkeypatch.delenv("ENGINE_TOKEN_DIM", raising=False)
    assert token_dim_mark() == "unbacked"
    monkeypatch.setenv("ENGINE_TOKEN_DIM", "backed")
    assert token_dim_mark() == "backed"
    monkeypatch.setenv("ENGINE_TOKEN_DIM", "oblivious")
    with pytest.raises(ValueError, match="ENGINE_TOKEN_DIM='oblivious'; choose one of unbacked, backed"):
        compile_model(torch.nn.Linear(2, 2))


def test_inductor_options_come_from_the_environment(monkeypatch):
    """ENGINE_INDUCTOR_OPTIONS reaches torch.compile as its options; malformed ones fail with the variable's
    name, and an option inductor does not have fails when the model is compiled (torch names the valid ones)."""
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    model = torch.nn.Linear(2, 2)
    monkeypatch.setenv("ENGINE_INDUCTOR_OPTIONS", '{"combo_kernels": true}')
    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_model(model)
    assert seen["options"] == {"combo_kernels": True} and seen["dynamic"] and seen["fullgraph"]
    monkeypatch.delenv("ENGINE_INDUCTOR_OPTIONS")
    compile_model(model)
    assert seen["options"] is None
    monkeypatch.undo()
    for bad in ("combo_kernels", "[1, 2]"):
        monkeypatch.setenv("ENGINE_INDUCTOR_OPTIONS", bad)
        with pytest.raises(ValueError, match="ENGINE_INDUCTOR_OPTIONS"):
            compile_model(model)
    monkeypatch.setenv("ENGINE_INDUCTOR_OPTIONS", '{"no_such_option": 1}')
    with pytest.raises(RuntimeError, match="no_such_option"):
        compile_model(model)
