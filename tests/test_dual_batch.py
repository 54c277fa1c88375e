"""graphs/dual_batch.py on the CPU: a decode batch run as two halves in pieces gives the whole forward's
hidden states, with one compiled graph a piece for every layer and batch size. (Its streams and CUDA
graphs: tests/test_gpu_engine.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from engine.demo_model import build_tiny_checkpoint
from engine.weight_loader import load_model
from graphs.compile import num_compiled_graphs
from graphs.dual_batch import DualBatchForward, dual_batch_min, split_decode_metadata, supports_dual_batch
from ops.forward_context import AttentionMetadata, ForwardContext, set_forward_context

BLOCK_SIZE, NUM_BLOCKS, HEAD_DIM = 4, 64, 32


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> torch.nn.Module:
    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3-4l")), "Qwen3ForCausalLM", head_dim=HEAD_DIM,
                                 num_hidden_layers=4)
    return load_model(path, AutoConfig.from_pretrained(path), torch.float32, "cpu")


def decode_batch(model, n: int, seed: int):
    """A decode step of n sequences over a random cache: (input_ids, positions, metadata, kv_caches)."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, model.config.num_key_value_heads, HEAD_DIM)
    kv_caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
                 for _ in range(model.config.num_hidden_layers)]
    seq_lens = torch.randint(1, 40, (n,), generator=g, dtype=torch.int32)
    tables = torch.randperm(NUM_BLOCKS, generator=g)[: n * 10].reshape(n, 10).to(torch.int32)
    positions = (seq_lens - 1).long()
    slots = tables[torch.arange(n), positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
                             seq_lens=seq_lens, block_tables=tables, max_query_len=1, max_seq_len=int(seq_lens.max()))
    input_ids = torch.randint(0, model.config.vocab_size, (n,), generator=g)
    return input_ids, positions, meta, kv_caches


def test_halves_give_the_whole_batch_hidden_states_eager(qwen3):
    assert supports_dual_batch(qwen3)
    dual = DualBatchForward(qwen3, compile=False, device=torch.device("cpu"))
    for n, seed in ((6, 0), (5, 1)):  # even and odd: halves of 3 / 3 and 2 / 3
        input_ids, positions, meta, kv_caches = decode_batch(qwen3, n, seed)
        with torch.no_grad(), set_forward_context(ForwardContext(meta, kv_caches, "torch")):
            want = qwen3(input_ids, positions)
            got = dual(input_ids, positions)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_each_piece_compiles_once_for_every_layer_and_batch_size(qwen3):
    """Inductor on the CPU: start, between (taking the layers as arguments) and finish compile one graph
    each, reused across the 4 layers and across batches of 6, 5 and 4 sequences."""
    torch._dynamo.reset()
    dual = DualBatchForward(qwen3, compile=True, device=torch.device("cpu"))
    before = num_compiled_graphs()
    for n, seed in ((6, 2), (5, 3), (4, 4)):
        input_ids, positions, meta, kv_caches = decode_batch(qwen3, n, seed)
        with torch.no_grad(), set_forward_context(ForwardContext(meta, kv_caches, "torch")):
            want = qwen3(input_ids, positions)
            got = dual(input_ids, positions)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert num_compiled_graphs() - before == 3


def test_split_metadata_gives_views_of_each_half():
    n = 5
    meta = AttentionMetadata(slot_mapping=torch.arange(n) * 10, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
                             seq_lens=torch.arange(1, n + 1, dtype=torch.int32),
                             block_tables=torch.arange(n * 3, dtype=torch.int32).reshape(n, 3),
                             max_query_len=1, max_seq_len=9)
    a, b = split_decode_metadata(meta, 2)
    assert a.slot_mapping.tolist() == [0, 10] and b.slot_mapping.tolist() == [20, 30, 40]
    assert a.query_start_loc.tolist() == [0, 1, 2] and b.query_start_loc.tolist() == [0, 1, 2, 3]
    assert b.seq_lens.tolist() == [3, 4, 5] and b.block_tables[0].tolist() == [6, 7, 8]
    assert b.seq_lens.data_ptr() == meta.seq_lens[2:].data_ptr()  # a view: graphs read the runner's buffers
    assert a.max_seq_len == b.max_seq_len == 9
    with pytest.raises(ValueError, match="leaves a half of a 5-sequence batch empty"):
        split_decode_metadata(meta, 5)
    meta.max_query_len = 3
    with pytest.raises(ValueError, match="only decode batches"):
        split_decode_metadata(meta, 2)


def test_min_batch_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("ENGINE_DUAL_BATCH_MIN", raising=False)
    assert dual_batch_min() == 0
    monkeypatch.setenv("ENGINE_DUAL_BATCH_MIN", "64")
    assert dual_batch_min() == 64
    for bad, match in (("2", "0 \\(off\\) or at least 4"), ("-1", "0 \\(off\\) or at least 4"), ("lots", "not a whole")):
        monkeypatch.setenv("ENGINE_DUAL_BATCH_MIN", bad)
        with pytest.raises(ValueError, match=match):
            dual_batch_min()
