"""Tiny random-weight checkpoints of real architectures, made with transformers' own classes.

No weights can be downloaded where this project is built and tested, so tests, examples and the
quick-start run on checkpoints built here: a real HF config, random weights from `from_config`,
`save_pretrained`, and a small byte-level BPE tokenizer trained on the corpus below. Their words mean
nothing; what they pin is that the engine computes exactly what transformers computes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, HEADER_START, HEADER_END]
TOKENIZER_VOCAB_SIZE = 1000

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model predicts the next token of a text,
one token at a time, from all the tokens before it. The engine keeps the keys and values of earlier
tokens in a paged cache, so that each new token only attends over what is already stored.
Once upon a time there was a small village by the sea. Every morning the fishermen went out in their
boats, and every evening they came back with the catch of the day. The children ran along the beach and
the old men sat in the shade, telling stories about the storms of long ago.
Hello, how are you today? I am fine, thank you. What would you like to know? Tell me about the weather,
the mountains, the rivers and the cities of the world. Paris is the capital of France; Tokyo is the
capital of Japan; Berlin is the capital of Germany. One, two, three, four, five, six, seven, eight, nine, ten.
Numbers like 42, 1024 and 3.14159 appear in code and in prose: for i in range(10): print(i * 2).
She ordered a café au lait and a croissant; his naïve question made everyone smile at the résumé.
日本語のテキストも少し含まれています。こんにちは、世界。東京は日本の首都です。
Emoji travel in four bytes: 🙂 🚀 🎉 👍 and the heart ❤️ has a variation selector.
The library opens at nine in the morning and closes at six in the evening. Students read books about
history, science, music and art; some write letters, others study for their exams. A good question is
often more useful than a quick answer, and a careful reader learns something new from every page.
Rain fell on the green hills while the sun was setting behind the clouds. The river carried leaves and
small branches down to the lake, where the birds were singing and the wind moved gently through the trees.
Привет, мир! Ελληνικά γράμματα: α β γ δ. Ça va? Größe, Straße, señor, mañana, façade, jalapeño.
"""


def build_tokenizer(save_dir: str) -> PreTrainedTokenizerFast:
    """Train a ~1000-token byte-level BPE tokenizer on CORPUS and save it in HF format to save_dir.

    Every byte is in the initial alphabet, so any text encodes; training is deterministic, so the
    files are the same every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # Like Llama 3: encoding a prompt puts <|begin_of_text|> in front.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[EOT, HEADER_START, HEADER_END],
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(save_dir)
    return hf_tokenizer


MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def build_tiny_checkpoint(
    path: str,
    architecture: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    **config_overrides,
) -> str:
    """Save a random-weight `architecture` checkpoint plus tokenizer to `path`; returns `path`.

    `config_overrides` go to the HF config (e.g. num_hidden_layers=3, tie_word_embeddings=True,
    head_dim=32, rope_parameters={...}); `max_shard_size` (e.g. "100KB") makes a sharded checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if architecture not in MODEL_TYPES:
        raise ValueError(f"cannot build {architecture!r}; supported: {', '.join(MODEL_TYPES)}")
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(path)
    bos_id, eos_id, eot_id = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT))
    settings = dict(
        architectures=[architecture],
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # HF's default 0.02 gives nearly uniform logits on a model this small, and greedy decoding
        # then hinges on near-ties that float rounding can flip. At 0.2 the logits spread by a few
        # units (std ~ 0.2 * sqrt(hidden_size)), so the top token wins by a clear margin and
        # engine-vs-transformers comparisons are stable.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    settings.update(config_overrides)
    config = AutoConfig.for_model(MODEL_TYPES[architecture], **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # HF initialises norms to 1 and biases to 0, which would let a loader that swaps or skips them
    # pass every comparison; perturbing them makes each tensor of the checkpoint matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=[eos_id, eot_id], pad_token_id=eos_id).save_pretrained(path)
    return path


DEMO_NAME = "demo-llama-v1"
DEMO_CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, initializer_range=0.1)


def demo_model_path() -> str:
    """The built-in demo model: a small random-weight Llama checkpoint, built on first use.

    It is a demo whose words mean nothing: it exists so the engine, the server and the examples run
    end to end with no download. Cached under $ENGINE_CACHE_DIR (default ~/.cache/engine); it is
    built in a temporary directory and renamed into place, so a crash never leaves half a cache.
    """
    cache_dir = os.environ.get("ENGINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "engine")
    path = os.path.join(cache_dir, DEMO_NAME)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=cache_dir)
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the cache from other users
        build_tiny_checkpoint(staging, "LlamaForCausalLM", seed=0, **DEMO_CONFIG)
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write("Random-weight demo model built by engine.demo_model; its words mean nothing.\n")
        os.rename(staging, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "config.json")):  # not a concurrent builder winning
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


if __name__ == "__main__":
    print(demo_model_path())
