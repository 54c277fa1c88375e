"""bitsandbytes LLM.int8() on CPU (bitsandbytes 0.50 runs its int8 matmul there): quantized at load it
generates exactly what transformers generates with BitsAndBytesConfig(load_in_8bit=True); a checkpoint
transformers saved in 8-bit is auto-detected and loads the same integers, whole or split over ranks;
settings and flags that do not fit are refused by name."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")  # transformers' bitsandbytes integration needs it

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig as HFBitsAndBytesConfig  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.quantization import BitsAndBytesConfig, resolve_quant_config  # noqa: E402
from tests.test_engine import hf_greedy, random_prompts  # noqa: E402
from tests.test_quantization import load_ranks  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def hf_8bit(checkpoint: str):
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=HFBitsAndBytesConfig(load_in_8bit=True),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved_8bit(llama_checkpoint, tmp_path_factory) -> str:
    """The tiny llama as transformers saves it after load_in_8bit (int8 weight, SCB, weight_format)."""
    path = str(tmp_path_factory.mktemp("llama-8bit"))
    hf_8bit(llama_checkpoint).save_pretrained(path)
    for name in os.listdir(llama_checkpoint):  # the tokenizer, which save_pretrained leaves out
        if not os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(llama_checkpoint, name), path)
    return path


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama3-tied"])
def test_quantized_at_load_greedy_tokens_equal_transformers_load_in_8bit(tiny_checkpoints, model):
    llm = LLM(tiny_checkpoints[model], quantization="bitsandbytes", block_size=4, max_model_len=128, seed=0)
    assert llm.llm_engine.model_config.quant_config == BitsAndBytesConfig()
    # Its outlier search reads the device on the host: on a GPU it runs compiled, without graphs.
    assert llm.llm_engine.runner._cuda_graph_blocker() == "quantization method BitsAndBytesLinearMethod"
    hf = hf_8bit(tiny_checkpoints[model])
    # One prompt at a time, as transformers runs them: which activation columns are outliers is
    # decided over the whole batch, so a row's result depends on the rows batched with it.
    for prompt in random_prompts([3, 17], seed=5):
        assert generate(llm, [prompt]) == [hf_greedy(hf, prompt, GREEDY.max_tokens)]


def test_transformers_8bit_checkpoint_is_detected_and_holds_the_integers_of_quantizing_at_load(saved_8bit,
                                                                                                llama_checkpoint):
    config = resolve_quant_config(type("HFConfig", (), {"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 5.0}}), None)
    assert config == BitsAndBytesConfig(threshold=5.0, prequantized=True)
    (saved,) = load_ranks(saved_8bit, 1)
    (at_load,) = load_ranks(llama_checkpoint, 1, "bitsandbytes")
    for name in ("self_attn.qkv_proj", "mlp.down_proj"):
        got, want = saved.model.layers[1].get_submodule(name), at_load.model.layers[1].get_submodule(name)
        assert got.weight.dtype == torch.int8 and torch.equal(got.weight, want.weight), name
        assert torch.equal(got.SCB, want.SCB), name
    prompts = random_prompts([4, 21], seed=11)
    llm = LLM(saved_8bit, block_size=4, max_model_len=64)
    assert llm.llm_engine.model_config.quant_config.prequantized
    assert generate(llm, prompts) == generate(LLM(llama_checkpoint, quantization="bitsandbytes", block_size=4,
                                                  max_model_len=64), prompts)


def test_tensor_parallel_shards_of_an_8bit_checkpoint_put_together_give_the_full_layers(saved_8bit):
    (full,) = load_ranks(saved_8bit, 1)
    ranks = load_ranks(saved_8bit, 2)
    want = full.model.layers[0]
    layers = [r.model.layers[0] for r in ranks]
    gate, up = zip(*(layer.mlp.gate_up_proj.weight.chunk(2) for layer in layers))  # column-parallel: rows split
    assert torch.equal(torch.cat([*gate, *up]), want.mlp.gate_up_proj.weight)
    gate_scb, up_scb = zip(*(layer.mlp.gate_up_proj.SCB.chunk(2) for layer in layers))
    assert torch.equal(torch.cat([*gate_scb, *up_scb]), want.mlp.gate_up_proj.SCB)
    down = [layer.mlp.down_proj for layer in layers]  # row-parallel: input columns split, SCB whole
    assert torch.equal(torch.cat([d.weight for d in down], dim=1), want.mlp.down_proj.weight)
    assert all(torch.equal(d.SCB, want.mlp.down_proj.SCB) for d in down)


def test_flags_and_settings_that_do_not_fit_are_refused(saved_8bit, tmp_path):
    with pytest.raises(ValueError, match="quantization='int8' contradicts the checkpoint, which is already quantized "
                                         "with 'bitsandbytes'"):
        LLM(saved_8bit, quantization="int8")
    with pytest.raises(ValueError, match="quantization='awq' contradicts the checkpoint, which is quantized with "
                                         "'bitsandbytes'"):
        LLM(saved_8bit, quantization="awq")
    for config, message in [({"load_in_4bit": True}, "bitsandbytes 4-bit .* not supported; supported: load_in_8bit"),
                            ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight")]:
        with pytest.raises(ValueError, match=message):
            resolve_quant_config(type("HFConfig", (), {"quantization_config": {"quant_method": "bitsandbytes",
                                                                                **config}}), None)
    column_major = shutil.copytree(saved_8bit, tmp_path / "column-major")
    tensors = load_file(column_major / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    save_file(tensors, column_major / "model.safetensors")
    with pytest.raises(ValueError, match="weight_format 2 is not supported; supported: 0"):
        LLM(str(column_major), max_model_len=64)


def test_checkpoint_without_weight_format_loads_and_dummy_weights_generate(saved_8bit, llama_checkpoint, tmp_path):
    no_format = shutil.copytree(saved_8bit, tmp_path / "no-weight-format")
    tensors = load_file(no_format / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("weight_format")}, no_format / "model.safetensors")
    prompt = random_prompts([9], seed=3)
    assert generate(LLM(str(no_format), max_model_len=64), prompt) == generate(LLM(saved_8bit, max_model_len=64), prompt)
    llm = LLM(llama_checkpoint, quantization="bitsandbytes", load_format="dummy", max_model_len=64)
    assert len(generate(llm, [[5, 6, 7]])[0]) == GREEDY.max_tokens
