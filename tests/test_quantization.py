"""Quantized checkpoints (AWQ, GPTQ 4-bit) and int8 quantized at load, on the CPU reference path: the
packer writes each on-disk layout from fake-quantized weights, loading gives those weights back
bit-exactly (whole, or split over tensor-parallel ranks), the engine then generates what transformers
generates on the same dequantized weights, and flags or settings that do not fit are refused by name."""

from __future__ import annotations

import functools
import logging
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import LLM, EngineArgs, SamplingParams
from engine.models.layers import ColumnParallelLinear, LinearBase, RowParallelLinear
from engine.models.registry import get_model_class
from engine.quantization import AWQConfig, GPTQConfig, Int8Config, resolve_quant_config
from engine.quantization.pack import (pack_awq, pack_int4, quantize_int4, write_int8_dequantized_checkpoint,
                                      write_quantized_checkpoint)
from engine.weight_loader import iterate_checkpoint, load_model
from ops.quant_ref import awq_to_gptq, dequantize_awq, dequantize_gptq, unpack_awq, unpack_int4
from tests.test_engine import hf_greedy, random_prompts

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
FORMATS = {
    "awq-g32": AWQ,
    "awq-g64": {**AWQ, "group_size": 64},
    "gptq-sym-g32": GPTQ,
    "gptq-asym-act-order": {**GPTQ, "sym": False, "desc_act": True},
    "gptq-v2-per-channel": {**GPTQ, "sym": False, "group_size": -1, "checkpoint_format": "gptq_v2"},
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoints, tmp_path_factory):
    """(format, model) -> (packed dir, dequantized float dir, dequantized weights by name), built on demand."""

    @functools.cache
    def build(fmt: str, model: str = "llama"):
        root = tmp_path_factory.mktemp(f"{model}-{fmt}")
        packed, dequantized = str(root / "packed"), str(root / "dequantized")
        weights = write_quantized_checkpoint(tiny_checkpoints[model], packed, FORMATS[fmt], dequantized_dir=dequantized)
        return packed, dequantized, weights

    return build


def layer_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A quantized linear layer's (local) weight [out, in], dequantized from its packed tensors."""
    config = layer.quant_method.config
    if isinstance(config, AWQConfig):
        weight = dequantize_awq(layer.qweight, layer.qzeros, layer.scales, config.group_size)
    else:
        weight = dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                 zeros_minus_one=config.checkpoint_format == "gptq")
    return weight.T


def load_ranks(path: str, tp_size: int, quantization: str | None = None) -> list[torch.nn.Module]:
    config = AutoConfig.from_pretrained(path)
    quant_config = resolve_quant_config(config, quantization)
    ranks = []
    for rank in range(tp_size):
        model = get_model_class(config.architectures)(config, tp_rank=rank, tp_size=tp_size, quant_config=quant_config)
        model.load_weights(iterate_checkpoint(path))
        ranks.append(model)
    return ranks


def test_awq_packs_outputs_in_autoawqs_interleaved_nibble_order():
    # AutoAWQ's WQLinear_GEMM.from_linear: nibble i of word c holds output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i].
    values = torch.arange(8, dtype=torch.int32)[None, :]
    assert pack_awq(values).item() == 0x75316420
    torch.manual_seed(0)
    values = torch.randint(0, 16, (5, 24), dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    loop_packed = torch.zeros(5, 3, dtype=torch.int64)
    for col in range(3):  # the loop as AutoAWQ writes it
        for i in range(8):
            loop_packed[:, col] |= values[:, col * 8 + order_map[i]].long() << (i * 4)
    assert torch.equal(pack_awq(values), loop_packed.to(torch.uint32).view(torch.int32))
    assert torch.equal(unpack_awq(pack_awq(values)), values)


def test_gptq_packs_inputs_and_zeros_sequentially_with_v1s_minus_one():
    inputs = torch.arange(8, dtype=torch.int32)[:, None]  # 8 inputs of one output -> one word
    assert pack_int4(inputs, dim=0).item() == 0x76543210
    assert pack_int4(torch.full((1, 8), 15, dtype=torch.int32), dim=-1).item() == -1  # 0xFFFFFFFF
    weight = quantize_int4(torch.randn(16, 64), 32, symmetric=True)
    assert torch.equal(weight.zeros, torch.full_like(weight.zeros, 8))
    stored = pack_int4(weight.zeros - 1, dim=-1)  # v1: zero - 1 = 7 in every nibble
    assert (stored == 0x77777777).all()
    torch.manual_seed(1)
    values = torch.randint(0, 16, (24, 16), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(values, dim=0), dim=0), values)
    assert torch.equal(unpack_int4(pack_int4(values, dim=1), dim=1), values)


def test_awq_repacked_into_gptqs_layout_is_the_same_weight():
    torch.manual_seed(2)
    words = torch.randint(-2**31, 2**31, (96, 40), dtype=torch.int64).to(torch.int32)  # every nibble pattern
    qzeros, scales = words[:3], torch.rand(3, 320).half()
    qweight, gptq_zeros = awq_to_gptq(words, qzeros, rows_at_once=16)  # chunks of rows give the same words
    assert qweight.shape == (12, 320) and gptq_zeros.shape == (3, 40)
    g_idx = torch.arange(96, dtype=torch.int32) // 32
    assert torch.equal(dequantize_gptq(qweight, gptq_zeros, scales, g_idx, zeros_minus_one=False),
                       dequantize_awq(words, qzeros, scales, 32))


def test_the_engine_runs_awq_layers_repacked_into_gptqs_layout(quantized):
    from engine import LLM

    packed, _, weights = quantized("awq-g32")
    llm = LLM(packed, max_model_len=64, num_gpu_blocks_override=16, block_size=4)
    layer = llm.llm_engine.runner.model.model.layers[1].mlp.down_proj
    assert layer.awq_repacked
    outputs, inputs = weights["model.layers.1.mlp.down_proj.weight"].shape
    assert layer.qweight.shape == (inputs // 8, outputs)  # GPTQ's: 8 inputs a word
    assert torch.equal(dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, zeros_minus_one=False).T,
                       weights["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_gives_back_the_fake_quantized_weights_bit_exactly(quantized, fmt):
    packed, _, weights = quantized(fmt)
    (model,) = load_ranks(packed, 1)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        parts = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
                 "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
        for fused, names in parts.items():
            module = layer.get_submodule(fused)
            group = fused.split(".")[0]
            want = torch.cat([weights[f"{prefix}{group}.{name}.weight"] for name in names])
            assert torch.equal(layer_weight(module), want), f"{prefix}{fused}"


@pytest.mark.parametrize("fmt,model", [("awq-g32", "llama"), ("awq-g64", "qwen2"), ("gptq-sym-g32", "qwen2"),
                                       ("gptq-asym-act-order", "llama"), ("gptq-v2-per-channel", "llama")])
def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(quantized, fmt, model):
    packed, dequantized, _ = quantized(fmt, model)
    llm = LLM(packed, block_size=4, max_model_len=128, seed=0)
    assert llm.llm_engine.model_config.quant_config.name == FORMATS[fmt]["quant_method"]
    hf = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    prompts = random_prompts([3, 17], seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("fmt,tp_size", [("awq-g32", 2), ("gptq-sym-g32", 2), ("gptq-asym-act-order", 4),
                                         ("gptq-v2-per-channel", 4)])
def test_tensor_parallel_shards_put_together_give_the_full_weights(quantized, fmt, tp_size):
    packed, _, weights = quantized(fmt)
    ranks = load_ranks(packed, tp_size)
    config = AutoConfig.from_pretrained(packed)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_replicas = max(1, tp_size // config.num_key_value_heads)
    q_rows = config.num_attention_heads * head_dim // tp_size
    kv_rows = max(1, config.num_key_value_heads // tp_size) * head_dim
    prefix = "model.layers.1."
    layers = [r.model.layers[1] for r in ranks]
    qkv = [layer_weight(layer.self_attn.qkv_proj) for layer in layers]
    assert torch.equal(torch.cat([w[:q_rows] for w in qkv]), weights[prefix + "self_attn.q_proj.weight"])
    k = torch.cat([w[q_rows : q_rows + kv_rows] for w in qkv][::kv_replicas])
    assert torch.equal(k, weights[prefix + "self_attn.k_proj.weight"])
    up = torch.cat([layer_weight(layer.mlp.gate_up_proj).chunk(2)[1] for layer in layers])
    assert torch.equal(up, weights[prefix + "mlp.up_proj.weight"])
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # row-parallel: the input dim is split
        full = torch.cat([layer_weight(layer.get_submodule(name)) for layer in layers], dim=1)
        assert torch.equal(full, weights[f"{prefix}{name}.weight"]), name
    # The packed tensors themselves: column-parallel splits output words, row-parallel input rows.
    tensors = dict(iterate_checkpoint(packed))
    down = [layer.mlp.down_proj for layer in layers]
    assert torch.equal(torch.cat([d.qweight for d in down], dim=0), tensors[prefix + "mlp.down_proj.qweight"])
    gate_words = [layer.mlp.gate_up_proj.qweight.chunk(2, dim=1)[0] for layer in layers]
    assert torch.equal(torch.cat(gate_words, dim=1), tensors[prefix + "mlp.gate_proj.qweight"])


@pytest.mark.parametrize("tp_size", [1, 4])
def test_act_order_layers_are_sorted_by_group_once_loaded_and_keep_their_weight(quantized, tp_size):
    """After loading, an act-order layer's inputs are reordered by group (qweight's rows, g_idx, and x
    gathered by `input_order`), so its matmul runs as without act-order; a row-parallel rank's share,
    which holds parts of groups, keeps act-order."""
    packed, _, _ = quantized("gptq-asym-act-order")
    sorted_layers, kept = 0, 0
    for rank in load_ranks(packed, tp_size):
        layers = {name: m for name, m in rank.named_modules() if isinstance(m, LinearBase)}
        before = {name: layer_weight(m) for name, m in layers.items()}
        with torch.no_grad():
            for m in layers.values():
                m.quant_method.process_weights_after_loading(m)
        for name, m in layers.items():
            x = torch.randn(3, m.g_idx.numel())
            torch.testing.assert_close(m.quant_method.apply(m, x, None), x @ before[name].T, rtol=1e-5, atol=1e-5)
            if m.act_order:
                assert isinstance(m, RowParallelLinear) and tp_size > 1, name
                assert m.input_order is None and torch.equal(layer_weight(m), before[name])
                kept += 1
            else:
                group_size = FORMATS["gptq-asym-act-order"]["group_size"]
                assert torch.equal(m.g_idx.long(), torch.arange(m.g_idx.numel()) // group_size), name
                assert m.input_order is not None  # a random act-order: never the identity
                assert torch.equal(layer_weight(m), before[name][:, m.input_order]), name
                sorted_layers += 1
    assert sorted_layers > 0 and (kept > 0) == (tp_size > 1)


def test_quantization_flag_that_contradicts_the_checkpoint_is_refused(quantized, llama_checkpoint):
    awq, _, _ = quantized("awq-g32")
    with pytest.raises(ValueError, match="quantization='gptq' contradicts the checkpoint, which is quantized with 'awq'"):
        LLM(awq, quantization="gptq")
    with pytest.raises(ValueError, match="quantization='awq' was asked for, but the checkpoint is not quantized"):
        LLM(llama_checkpoint, quantization="awq")
    with pytest.raises(ValueError, match="quantization='fp8' is not supported; supported: awq, gptq, bitsandbytes, int8"):
        EngineArgs(model=llama_checkpoint, quantization="fp8")
    llm = LLM(awq, quantization="awq", max_model_len=64)  # agreeing with the checkpoint is fine
    assert llm.llm_engine.model_config.quant_config == AWQConfig(group_size=32)


@pytest.mark.parametrize("config,message", [
    ({**AWQ, "bits": 3}, "awq with 3 bits is not supported; supported: 4 bits"),
    ({**AWQ, "version": "gemv"}, "awq version 'gemv' is not supported; supported: 'gemm'"),
    ({**AWQ, "group_size": 16}, "awq group_size 16 is not supported; supported: 32, 64, 128"),
    ({**AWQ, "group_size": -1}, "awq group_size -1 is not supported; supported: 32, 64, 128"),
    ({**AWQ, "zero_point": False}, "zero_point: false.* is not supported; supported: zero_point true"),
    ({**GPTQ, "bits": 8}, "gptq with 8 bits is not supported; supported: 4 bits"),
    ({**GPTQ, "group_size": 256}, "gptq group_size 256 is not supported; supported: 32, 64, 128, -1"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "gptq checkpoint_format 'marlin' is not supported; supported: gptq, gptq_v2"),
    ({"quant_method": "fp8"}, "quantized with 'fp8', which is not supported; supported: awq, gptq"),
])
def test_unsupported_quantization_settings_name_what_is_supported(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_quant_config(type("HFConfig", (), {"quantization_config": config}), None)


def test_autoawq_key_names_and_an_input_size_that_splits_groups_are_handled(quantized):
    assert AWQConfig.from_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True}) == \
        AWQConfig(group_size=128)
    assert GPTQConfig.from_config(GPTQ) == GPTQConfig(group_size=32, desc_act=False, sym=True)
    packed, _, _ = quantized("awq-g32")
    with pytest.raises(ValueError, match=r"input size per rank \(16\) is not divisible by 32 \(the awq group size\)"):
        load_ranks(packed, 4)  # o_proj's 64 inputs over 4 ranks: 16 each, half a group


def test_named_method_reads_the_older_tools_own_config_file(quantized, tmp_path):
    packed, _, _ = quantized("awq-g32")
    old_style = shutil.copytree(packed, tmp_path / "autoawq-style")
    with open(old_style / "config.json") as f:
        config = json.load(f)
    del config["quantization_config"]
    (old_style / "config.json").write_text(json.dumps(config))
    (old_style / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                              "version": "GEMM"}))
    prompt = [{"prompt_token_ids": random_prompts([9], seed=3)[0]}]
    want = LLM(packed, max_model_len=64).generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(str(old_style), quantization="awq", max_model_len=64)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want


@pytest.mark.parametrize("fmt", ["awq-g32", "gptq-asym-act-order"])
def test_dummy_weights_fill_quantized_layers_with_valid_values(quantized, fmt):
    packed, _, _ = quantized(fmt)
    llm = LLM(packed, load_format="dummy", max_model_len=64)
    output = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == GREEDY.max_tokens
    if fmt == "gptq-asym-act-order":  # dummy inputs in a random group order, as a real act-order checkpoint's:
        layers = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, LinearBase)]  # sorted at load
        assert layers and all(not m.act_order and m.input_order is not None for m in layers)
        for m in layers:
            assert not torch.equal(m.input_order.cpu(), torch.arange(m.input_order.numel()))
            assert torch.equal(m.g_idx, torch.sort(m.g_idx).values)  # the groups now in order


@pytest.mark.parametrize("fmt", ["awq-g32", "gptq-asym-act-order", "int8"])
def test_tensor_parallel_engine_gives_the_tokens_of_one_process(quantized, llama_checkpoint, fmt):
    if fmt == "int8":  # quantized at load, from the float checkpoint
        checkpoint, engine = llama_checkpoint, dict(quantization="int8")
    else:
        checkpoint, engine = quantized(fmt)[0], {}
    prompts = [{"prompt_token_ids": p} for p in random_prompts([4, 21], seed=11)]
    engine.update(block_size=4, max_model_len=64, seed=0)
    want = [o.outputs[0].token_ids for o in LLM(checkpoint, **engine).generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(checkpoint, tensor_parallel_size=2, **engine)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        llm.llm_engine.shutdown()
    assert got == want


# ---------------------------------------------------------------------------------------------
# int8: weight-only, quantized at load

FUSED_PARTS = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
               "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output row (max |w| / 127), written out independently of ops/."""
    scale = weight.abs().max(dim=1).values / 127
    return (weight / scale[:, None]).round().to(torch.int8), scale


def test_int8_weights_and_scales_equal_an_independent_per_channel_quantization(llama_checkpoint):
    (model,) = load_ranks(llama_checkpoint, 1, "int8")
    tensors = dict(iterate_checkpoint(llama_checkpoint))
    for i, layer in enumerate(model.model.layers):
        for fused, names in FUSED_PARTS.items():
            module = layer.get_submodule(fused)
            group = fused.split(".")[0]
            parts = [per_channel_int8(tensors[f"model.layers.{i}.{group}.{name}.weight"]) for name in names]
            assert module.weight.dtype == torch.int8 and module.weight_scale.dtype == torch.float32
            assert torch.equal(module.weight, torch.cat([q for q, _ in parts])), fused
            assert torch.equal(module.weight_scale, torch.cat([s for _, s in parts])), fused


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama3-tied"])
def test_int8_greedy_tokens_equal_transformers_on_the_dequantized_weights(tiny_checkpoints, tmp_path, model):
    dequantized = str(tmp_path / "dequantized")
    write_int8_dequantized_checkpoint(tiny_checkpoints[model], dequantized, torch.float32)
    llm = LLM(tiny_checkpoints[model], quantization="int8", block_size=4, max_model_len=128, seed=0)
    assert llm.llm_engine.model_config.quant_config == Int8Config()
    hf = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    prompts = random_prompts([3, 17], seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_int8_linear_weights_take_about_half_the_memory_of_bf16(llama_checkpoint):
    config = AutoConfig.from_pretrained(llama_checkpoint)

    def linear_bytes(quant_config) -> int:
        model = load_model(llama_checkpoint, config, torch.bfloat16, "cpu", quant_config=quant_config)
        layers = [m for m in model.modules() if isinstance(m, LinearBase)]
        assert all(m.weight_scale.dtype == torch.bfloat16 for m in layers if quant_config is not None)
        return sum(t.numel() * t.element_size() for m in layers for t in [*m.parameters(), *m.buffers()])

    ratio = linear_bytes(Int8Config()) / linear_bytes(None)
    # Half, plus one bf16 scale per output row: 1/in of the bf16 weight (in >= 64 here).
    assert 0.5 < ratio <= 0.5 + 1 / 64


@pytest.mark.parametrize("tp_size", [2, 4])
def test_int8_tensor_parallel_shards_put_together_give_the_full_int8_weights(llama_checkpoint, tp_size):
    (full,) = load_ranks(llama_checkpoint, 1, "int8")
    layers = [r.model.layers[1] for r in load_ranks(llama_checkpoint, tp_size, "int8")]
    want = full.model.layers[1]
    config = AutoConfig.from_pretrained(llama_checkpoint)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_replicas = max(1, tp_size // config.num_key_value_heads)
    q_rows = config.num_attention_heads * head_dim // tp_size
    kv_rows = max(1, config.num_key_value_heads // tp_size) * head_dim
    for attr in ("weight", "weight_scale"):  # column-parallel: output rows and their scales are split
        qkv = [getattr(layer.self_attn.qkv_proj, attr) for layer in layers]
        full_qkv = getattr(want.self_attn.qkv_proj, attr)
        q_total = q_rows * tp_size
        assert torch.equal(torch.cat([t[:q_rows] for t in qkv]), full_qkv[:q_total])
        k = torch.cat([t[q_rows : q_rows + kv_rows] for t in qkv][::kv_replicas])
        assert torch.equal(k, full_qkv[q_total : q_total + config.num_key_value_heads * head_dim])
        gate_up = [getattr(layer.mlp.gate_up_proj, attr).chunk(2) for layer in layers]
        for part in (0, 1):
            assert torch.equal(torch.cat([t[part] for t in gate_up]), getattr(want.mlp.gate_up_proj, attr).chunk(2)[part])
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # row-parallel: input columns split, scales whole
        full_layer = want.get_submodule(name)
        shards = [layer.get_submodule(name) for layer in layers]
        assert torch.equal(torch.cat([s.weight for s in shards], dim=1), full_layer.weight), name
        assert all(torch.equal(s.weight_scale, full_layer.weight_scale) for s in shards), name


def test_int8_refuses_a_checkpoint_that_is_already_quantized_and_non_float_weights(quantized):
    awq, _, _ = quantized("awq-g32")
    with pytest.raises(ValueError, match="quantization='int8' contradicts the checkpoint, which is already quantized "
                                         "with 'awq'"):
        LLM(awq, quantization="int8")
    layer = ColumnParallelLinear(8, 16, quant_config=Int8Config())
    with pytest.raises(ValueError, match="int8 quantizes float weights at load, got torch.int32"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 8, dtype=torch.int32))


def test_int8_dummy_weights_generate(llama_checkpoint):
    llm = LLM(llama_checkpoint, quantization="int8", load_format="dummy", max_model_len=64)
    output = llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == GREEDY.max_tokens


def test_int8_dummy_weights_are_random_int8_and_the_same_for_the_same_seed(llama_checkpoint):
    config = AutoConfig.from_pretrained(llama_checkpoint)

    def dummy_int8_weight() -> torch.Tensor:
        torch.manual_seed(0)
        model = load_model(llama_checkpoint, config, torch.bfloat16, "cpu", quant_config=Int8Config(), load_format="dummy")
        return model.model.layers[0].mlp.gate_up_proj.weight

    weight = dummy_int8_weight()
    assert weight.dtype == torch.int8
    assert weight.min() < -100 and weight.max() > 100  # the whole int8 range, made directly in int8
    assert torch.equal(weight, dummy_int8_weight())


def test_weight_memory_counts_what_quantization_frees_for_the_kv_cache(llama_checkpoint, caplog):
    from engine.weight_loader import weight_memory

    config = AutoConfig.from_pretrained(llama_checkpoint)
    dense_model = load_model(llama_checkpoint, config, torch.bfloat16, "cpu")
    int8_model = load_model(llama_checkpoint, config, torch.bfloat16, "cpu", quant_config=Int8Config())
    dense_bytes, dense_unquantized = weight_memory(dense_model, torch.bfloat16)
    int8_bytes, int8_unquantized = weight_memory(int8_model, torch.bfloat16)
    assert dense_bytes == dense_unquantized
    assert int8_unquantized == dense_bytes  # the same model, had it stayed in bf16
    assert int8_bytes < dense_bytes
    with caplog.at_level(logging.INFO, logger="engine"):
        LLM(llama_checkpoint, quantization="int8", dtype="bfloat16", max_model_len=128)
    freed = (dense_bytes - int8_bytes) / 2**30
    assert f"{freed:.2f} GiB less than unquantized" in caplog.text


@pytest.mark.parametrize("fmt", ["awq-g64", "gptq-sym-g32", "gptq-asym-act-order"])
def test_swapab_repacked_layers_give_the_tokens_of_gptqs_layout(tmp_path, monkeypatch, fmt):
    """ENGINE_SWAPAB_GEMM=1: qweight repacked at load into the swap-AB GEMM's order (the same nibbles) and every
    matmul through engine::swapab_matmul (its CPU form here): the greedy tokens of the GPTQ-layout engine. The model
    is sized for the GEMM (outputs a multiple of 128, inputs of 128). `auto` on this CPU keeps no copy."""
    from engine.demo_model import build_tiny_checkpoint
    from engine.quantization import swapab
    from ops.gluon_swapab import unpack_swapab

    base = build_tiny_checkpoint(str(tmp_path / "float"), "LlamaForCausalLM", hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    packed = str(tmp_path / "packed")
    write_quantized_checkpoint(base, packed, FORMATS[fmt])
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 19], seed=3)]

    def run(enabled: bool):
        monkeypatch.setattr(swapab, "ENABLED", enabled)
        llm = LLM(packed, block_size=4, max_model_len=64, seed=0)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        return llm.llm_engine.runner.model.model.layers[0].mlp.down_proj, tokens

    plain, want = run(False)
    assert getattr(plain, "swapab_packed", None) is None  # auto (the default) on a CPU: no copy
    layer, got = run(True)
    assert layer.swapab and not getattr(plain, "swapab", False)
    assert layer.qweight.shape == (256 // 64, 128 * 8)  # down_proj: K = 256 inputs, N = 128 outputs
    if getattr(plain, "input_order", None) is None:  # act-order sorted: another input order
        assert torch.equal(unpack_swapab(layer.qweight), unpack_int4(plain.qweight, dim=0))
    assert got == want


@pytest.mark.parametrize("fmt", ["awq-g64", "gptq-sym-g32", "gptq-asym-act-order"])
def test_swapab_auto_keeps_a_repacked_copy_where_it_fits_and_the_tokens(tmp_path, monkeypatch, caplog, fmt):
    """ENGINE_SWAPAB_GEMM=auto (the default), the GPU gate opened on this CPU: with a budget the copies fit in, each
    4-bit layer keeps GPTQ's qweight and a repacked copy of the same nibbles, its matmuls go through
    engine::dual_4bit_matmul, and the greedy tokens are the GPTQ-only engine's; with a budget they do not fit in, no
    layer keeps one (all or none) and the log says why."""
    from engine.demo_model import build_tiny_checkpoint
    from engine.quantization import swapab
    from ops.gluon_swapab import unpack_swapab

    base = build_tiny_checkpoint(str(tmp_path / "float"), "LlamaForCausalLM", hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    packed = str(tmp_path / "packed")
    write_quantized_checkpoint(base, packed, FORMATS[fmt])
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 19], seed=3)]
    calls = []
    dual = torch.ops.engine.dual_4bit_matmul

    def counting_dual(*args):
        calls.append(args[0].shape)
        return dual(*args)

    def run(memory: int):
        monkeypatch.setattr(swapab, "_copies_pay", lambda device: True)
        monkeypatch.setattr(swapab, "_device_memory", lambda device: memory)
        monkeypatch.setattr(torch.ops.engine, "dual_4bit_matmul", counting_dual)
        llm = LLM(packed, block_size=4, max_model_len=64, seed=0)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        return llm.llm_engine.runner.model.model.layers[0].mlp.down_proj, tokens

    assert swapab.MODE == "auto"
    with caplog.at_level(logging.INFO, logger="engine"):
        plain, want = run(1000)  # 0.06 of 1,000 bytes: no room
    assert getattr(plain, "swapab_packed", None) is None and not calls
    assert "stay on GPTQ's kernels only" in caplog.text
    layer, got = run(1 << 40)
    assert layer.swapab_packed.shape == (256 // 64, 128 * 8) and torch.equal(layer.qweight, plain.qweight)
    assert torch.equal(unpack_swapab(layer.swapab_packed), unpack_int4(layer.qweight, dim=0))
    assert calls  # every 4-bit matmul went through the dual op
    assert got == want


@pytest.mark.parametrize("group_size,zeros_minus_one", [(32, True), (128, False), (-1, True)])
def test_swapab_matmul_op_on_cpu_is_the_gptq_reference_and_passes_opcheck(group_size, zeros_minus_one):
    """engine::swapab_matmul's CPU form (the repacked nibbles read back) gives gptq_matmul's product on the same
    weight, bit for bit, for every group form (-1: one group); torch.library.opcheck checks its schema and fake."""
    import ops.quant_matmul  # noqa: F401  (registers the ops)
    from ops.gluon_swapab import repack_swapab

    torch.manual_seed(0)
    K, N = 256, 128
    qweight = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int64).to(torch.int32)
    groups = 1 if group_size == -1 else K // group_size
    qzeros = torch.randint(-2**31, 2**31, (groups, N // 8), dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(groups, N) * 0.02 + 1e-3).half()
    g_idx = (torch.arange(K) // (K if group_size == -1 else group_size)).to(torch.int32)
    x, bias = torch.randn(3, K), torch.randn(N)
    want = torch.ops.engine.gptq_matmul(x, qweight, qzeros, scales, g_idx, group_size, False, zeros_minus_one, bias)
    args = (x, repack_swapab(qweight), qzeros, scales, group_size, zeros_minus_one, bias)
    assert torch.equal(torch.ops.engine.swapab_matmul(*args), want)
    torch.library.opcheck(torch.ops.engine.swapab_matmul.default, args)
    dual_args = (x, qweight, *args[1:])
    assert torch.equal(torch.ops.engine.dual_4bit_matmul(*dual_args), want)
    torch.library.opcheck(torch.ops.engine.dual_4bit_matmul.default, dual_args)
