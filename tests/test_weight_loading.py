"""Checkpoint loading: what loads, and the clear errors for what cannot."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from engine.demo_model import build_tiny_checkpoint
from engine.models.registry import get_model_class
from engine.weight_loader import iterate_checkpoint, load_model


def load(path: str) -> torch.nn.Module:
    return load_model(path, AutoConfig.from_pretrained(path), torch.float32, "cpu")


def edited_copy(src: str, dst, edit) -> str:
    """A copy of checkpoint `src` whose tensors dict went through `edit`."""
    dst = str(dst / "ckpt")
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_unsupported_architecture_is_named_with_the_supported_list(llama_checkpoint):
    with pytest.raises(ValueError, match=r"Model architectures \['FooForCausalLM'\] are not supported\. "
                                         r"Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        get_model_class(["FooForCausalLM"])
    config = AutoConfig.from_pretrained(llama_checkpoint)
    config.architectures = ["FooForCausalLM"]
    with pytest.raises(ValueError, match="FooForCausalLM"):
        load_model(llama_checkpoint, config, torch.float32, "cpu")


def test_missing_weight_is_named(llama_checkpoint, tmp_path):
    path = edited_copy(llama_checkpoint, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.self_attn\.k_proj\.weight$"):
        load(path)


def test_wrong_shape_names_the_tensor_and_both_shapes(llama_checkpoint, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    path = edited_copy(llama_checkpoint, tmp_path, shrink)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight': expected shape \(128, 64\), got \(100, 64\)"):
        load(path)


def test_unknown_tensor_is_rejected(llama_checkpoint, tmp_path):
    path = edited_copy(llama_checkpoint, tmp_path, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"'model\.extra\.weight' matches no parameter of LlamaForCausalLM"):
        load(path)


def test_truncated_safetensors_file_is_named(llama_checkpoint, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(llama_checkpoint, path)
    weights = os.path.join(path, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match=rf"cannot read safetensors file {weights}"):
        load(path)


def test_directory_without_safetensors_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no safetensors checkpoint in"):
        list(iterate_checkpoint(str(tmp_path)))


def test_sharded_checkpoint_loads_the_same_as_unsharded(llama_checkpoint, tmp_path):
    sharded = build_tiny_checkpoint(str(tmp_path / "sharded"), max_shard_size="100KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    whole, parts = load(llama_checkpoint).state_dict(), load(sharded).state_dict()
    assert whole.keys() == parts.keys()
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=0, rtol=0)


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    sharded = build_tiny_checkpoint(str(tmp_path / "sharded"), max_shard_size="100KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        last_shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded, last_shard))
    with pytest.raises(ValueError, match=rf"names shard '{last_shard}', which does not exist"):
        load(sharded)


def test_index_without_a_weight_map_is_named(tmp_path):
    sharded = build_tiny_checkpoint(str(tmp_path / "sharded"), max_shard_size="100KB")
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(ValueError, match=r"is not a safetensors index \(a JSON object with a 'weight_map'\)"):
        load(sharded)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: str(tmp / "missing"), "does not exist"),
        (lambda tmp: str(tmp), "has no config.json"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and str(tmp / "file.txt"), "is a file"),
    ],
    ids=["missing dir", "no config.json", "a file"],
)
def test_a_bad_model_path_is_named_before_transformers_sees_it(tmp_path, make, message):
    from engine.config import EngineArgs, ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_args(EngineArgs(model=make(tmp_path)), torch.device("cpu"))


def test_a_checkpoint_without_tokenizer_files_or_with_broken_json_is_named(llama_checkpoint, tmp_path):
    from engine import LLM

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(llama_checkpoint, no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(no_tokenizer / name)
    with pytest.raises(ValueError, match="no tokenizer files"):
        LLM(model=str(no_tokenizer))
    broken = tmp_path / "broken-config"
    shutil.copytree(llama_checkpoint, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        LLM(model=str(broken))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_shards_put_together_give_the_full_weights(tiny_checkpoints, tp_size):
    # 4 query heads and 2 KV heads: at tp_size 4 each KV head is replicated on two ranks.
    path = tiny_checkpoints["llama3-tied"]  # biases too
    config = AutoConfig.from_pretrained(path)
    full = dict(iterate_checkpoint(path))
    model_cls = get_model_class(config.architectures)
    ranks = []
    for rank in range(tp_size):
        model = model_cls(config, tp_rank=rank, tp_size=tp_size)
        model.load_weights(iterate_checkpoint(path))
        ranks.append(model.state_dict())

    head_dim, kv_replicas = 32, max(1, tp_size // config.num_key_value_heads)
    q_rows = config.num_attention_heads * head_dim // tp_size
    kv_rows = max(1, config.num_key_value_heads // tp_size) * head_dim
    prefix = "model.layers.1."
    for kind in ("weight", "bias"):
        qkv = [r[prefix + f"self_attn.qkv_proj.{kind}"] for r in ranks]
        torch.testing.assert_close(torch.cat([t[:q_rows] for t in qkv]), full[prefix + f"self_attn.q_proj.{kind}"])
        k_parts = [t[q_rows : q_rows + kv_rows] for t in qkv][::kv_replicas]
        torch.testing.assert_close(torch.cat(k_parts), full[prefix + f"self_attn.k_proj.{kind}"])
        v_parts = [t[q_rows + kv_rows :] for t in qkv][::kv_replicas]
        torch.testing.assert_close(torch.cat(v_parts), full[prefix + f"self_attn.v_proj.{kind}"])
        up = torch.cat([r[prefix + f"mlp.gate_up_proj.{kind}"].chunk(2)[1] for r in ranks])
        torch.testing.assert_close(up, full[prefix + f"mlp.up_proj.{kind}"])
    down = torch.cat([r[prefix + "mlp.down_proj.weight"] for r in ranks], dim=1)
    torch.testing.assert_close(down, full[prefix + "mlp.down_proj.weight"])
    torch.testing.assert_close(ranks[1][prefix + "mlp.down_proj.bias"], full[prefix + "mlp.down_proj.bias"])
    # The vocabulary does not divide evenly: the last shard is zero-padded.
    embed = torch.cat([r["model.embed_tokens.weight"] for r in ranks])
    torch.testing.assert_close(embed[: config.vocab_size], full["model.embed_tokens.weight"])
    assert not embed[config.vocab_size :].any()


TP_PROMPT = [0, 71, 69, 437, 225, 741, 496, 688, 12, 1000]  # 1000: in the last, padded vocabulary shard


def _tensor_parallel_worker(rank: int, world_size: int, path: str, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    from ops.forward_context import ForwardContext, set_forward_context

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        model = load_model(path, AutoConfig.from_pretrained(path), torch.float32, "cpu", rank, world_size)
        with torch.no_grad(), set_forward_context(ForwardContext(None, [])):
            logits = model.compute_logits(model(torch.tensor(TP_PROMPT), torch.arange(len(TP_PROMPT))))
        torch.save(logits, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch and transformers
def test_tensor_parallel_forward_over_two_processes_matches_one(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama3-tied"]
    torch.multiprocessing.spawn(
        _tensor_parallel_worker, args=(2, path, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2
    )
    from ops.forward_context import ForwardContext, set_forward_context

    model = load(path)
    with torch.no_grad(), set_forward_context(ForwardContext(None, [])):
        expected = model.compute_logits(model(torch.tensor(TP_PROMPT), torch.arange(len(TP_PROMPT))))
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, atol=1e-5, rtol=0)


def test_tokenizer_is_deterministic_and_round_trips_multibyte_text(tmp_path):
    from engine.demo_model import build_tokenizer

    first, second = tmp_path / "a", tmp_path / "b"
    tokenizer = build_tokenizer(str(first))
    build_tokenizer(str(second))
    for name in os.listdir(first):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    text = "A naïve café in 日本語 🙂 ❤️!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_demo_model_is_built_once_into_the_cache_dir(tmp_path, monkeypatch):
    import engine.demo_model as demo

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(demo, "DEMO_CONFIG", dict(hidden_size=32, num_hidden_layers=1))  # the mechanism, small
    path = demo.demo_model_path()
    assert path == str(tmp_path / demo.DEMO_NAME)
    assert os.listdir(tmp_path) == [demo.DEMO_NAME]  # no staging directory left behind
    built_at = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert demo.demo_model_path() == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == built_at
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [1, 2]
    assert load(path).config.architectures == ["LlamaForCausalLM"]


def test_a_checkpoint_with_its_own_config_code_loads_only_with_trust_remote_code(llama_checkpoint, tmp_path):
    """vLLM's trust_remote_code: a checkpoint whose config.json names its own config class (auto_map)
    is refused with transformers' reason without it, and runs like the plain checkpoint with it."""
    from engine import LLM, SamplingParams

    custom = tmp_path / "custom-config"
    shutil.copytree(llama_checkpoint, custom)
    (custom / "configuration_custom_llama.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomLlamaConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom_llama.CustomLlamaConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(model=str(custom))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = LLM(model=str(custom), trust_remote_code=True).generate(["Paris is"], params)[0].outputs[0].token_ids
    want = LLM(model=llama_checkpoint).generate(["Paris is"], params)[0].outputs[0].token_ids
    assert got == want
