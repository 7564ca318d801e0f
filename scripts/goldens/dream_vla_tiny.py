"""A tiny random checkpoint in Dream-VLA's published format (github.com/DreamLM/Dream-VLX, ``vla/``).

    python scripts/goldens/dream_vla_tiny.py OUT_DIR

Writes, deterministically (one seeded CPU ``torch.Generator``, fixed draw order):

- ``config.json``: the fields ``DreamVLAConfig`` / ``DreamVLAForActionPrediction`` read
  (a Dream-7B decoder shrunk to 2 layers, hidden 32, 2 query heads over 1 key/value
  head; a Qwen2-VL ViT shrunk to 2 blocks of width 16; the MLP projector), with the
  real vocabulary size (152,064) and special ids (mask 151666, image pad 151655, ...).
- ``model.safetensors``: ``visual.*``, ``projector.*``, ``model.*``, ``lm_head.weight``,
  the published tensor names.
- ``proprio_projector--0_checkpoint.pt``: the OpenVLA-OFT proprio projector (8 -> 32)
  the LIBERO evaluation loads from the checkpoint folder.
- ``generation_config.json``: the diffusion settings the original's ``from_pretrained`` reads.
- ``dataset_statistics.json``: OpenVLA-style action/proprio statistics under
  ``libero_10_no_noops``.
- ``preprocessor_config.json``: the Qwen2-VL image processor settings Dream-VL ships.
- ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``chat_template.json``: a
  *minimal* byte-level BPE tokenizer in the Qwen2/Dream format. The real Qwen2.5 vocabulary
  cannot be downloaded here, so the vocabulary holds the 256 byte tokens (ids 0-255, in
  GPT-2's ``bytes_to_unicode`` order, as Qwen's does) and unique filler entries up to the
  real regular-vocabulary size (151,643), with no merges: every byte of an instruction is
  one token. The added tokens are the real ones at their real ids (Qwen2's 22 specials,
  Dream's ``<|beginoftext|>`` 151665 and ``<|mask|>`` 151666, and the 256
  ``<|action_n|>`` tokens Dream-VLA's fine-tuning adds, 151667-151922), so
  ``len(tokenizer)`` is the real 151,923 and the action ids ``len(tokenizer) - bin`` are
  the real ones. The chat template is the one Dream-VL publishes.

The weights are random but shaped like a trained action model in one respect: the
``lm_head`` rows of the 256 action tokens are drawn ten times larger than the others, so
that at action positions the argmax over the whole vocabulary usually lands on an action
token (as a fine-tuned Dream-VLA's does); the golden script records where it did not.
Attention projections are drawn with std ``2 / sqrt(fan_in)`` so that attention moves the
residual stream and different inputs give different tokens.

Nothing of the original code is needed to write it; ``scripts/goldens/dream_vla_golden.py``
runs the original on it, and ``tests/test_adapter_dream_vla.py`` regenerates it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import torch

SEED = 20261205

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 2, 1
VISION = dict(depth=2, embed_dim=16, hidden_size=24, hidden_act="quick_gelu", mlp_ratio=2, num_heads=2,
              in_chans=3, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)


class Dims(NamedTuple):
    """The sizes a checkpoint is written at: the decoder's (Qwen2: q/k/v biases, grouped-query
    attention ``heads : kv_heads``), the ViT's (``vision``, Qwen2-VL's config fields) and the proprio
    projector's input. The default is the tiny golden checkpoint; ``scripts/dream_vla_reduced.py``
    writes a larger one with the same layout and draws. (A NamedTuple, not a dataclass: the tests
    load this file without registering it as a module, which dataclasses need.)"""

    hidden: int = HIDDEN
    inter: int = INTER
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    vision: dict = VISION  # read, never modified
    proprio_dim: int = 8
    head_std: float = 0.05  # lm_head rows; the 256 action rows are drawn ten times larger

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = Dims()
VOCAB_SIZE = 152064          # Dream-7B's embedding rows (padded past the tokenizer)
REGULAR_VOCAB = 151643       # Qwen2.5's byte-level BPE vocabulary
N_BINS = 256
PROPRIO_DIM = 8
UNNORM_KEY = "libero_10_no_noops"

# Qwen2's added tokens at 151643.., then Dream's two
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
            "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
            "<|beginoftext|>", "<|mask|>"]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|image_pad|>{% elif content['type'] == 'video' or 'video' in "
    "content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|video_pad|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (Qwen2's byte-level BPE uses it)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def config_dict(dims: Dims = TINY) -> dict:
    hd = dims.head_dim
    return {
        "architectures": ["DreamVLAForActionPrediction"], "model_type": "dream-vla",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
        "mask_token_id": 151666, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "hidden_act": "silu", "hidden_size": dims.hidden, "intermediate_size": dims.inter,
        "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads, "num_key_value_heads": dims.kv_heads,
        "max_position_embeddings": 4096, "max_window_layers": dims.layers,
        "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16],  # sums to head_dim / 2 (Qwen2-VL's 16, 24, 24 at 128)
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "use_sliding_window": False, "tie_word_embeddings": False, "use_cache": False, "initializer_range": 0.02,
        "torch_dtype": "float32", "vocab_size": VOCAB_SIZE, "projector_hidden_act": "gelu",
        "n_action_bins": N_BINS, "vision_config": dict(dims.vision),
    }


def weights(gen: torch.Generator, dims: Dims = TINY) -> dict[str, torch.Tensor]:
    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    def linear(prefix, fan_in, fan_out, bias=True, gain=1.0):
        out = {f"{prefix}.weight": normal(fan_out, fan_in, std=gain / fan_in ** 0.5)}
        if bias:
            out[f"{prefix}.bias"] = normal(fan_out, std=0.1)
        return out

    def norm(prefix, dim, bias):
        out = {f"{prefix}.weight": 1.0 + normal(dim, std=0.1)}
        if bias:
            out[f"{prefix}.bias"] = normal(dim, std=0.1)
        return out

    w: dict[str, torch.Tensor] = {}
    v = dims.vision
    hidden, inter, heads, kv_heads = dims.hidden, dims.inter, dims.heads, dims.kv_heads
    e, patch_in = v["embed_dim"], 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    w["visual.patch_embed.proj.weight"] = normal(e, 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"],
                                                 std=1.0 / patch_in ** 0.5)
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}"
        w.update(norm(f"{p}.norm1", e, True))
        w.update(norm(f"{p}.norm2", e, True))
        w.update(linear(f"{p}.attn.qkv", e, 3 * e, gain=2.0))
        w.update(linear(f"{p}.attn.proj", e, e))
        w.update(linear(f"{p}.mlp.fc1", e, e * v["mlp_ratio"]))
        w.update(linear(f"{p}.mlp.fc2", e * v["mlp_ratio"], e))
    merged = e * v["spatial_merge_size"] ** 2
    w.update(norm("visual.merger.ln_q", e, True))
    w.update(linear("visual.merger.mlp.0", merged, merged))
    w.update(linear("visual.merger.mlp.2", merged, v["hidden_size"]))
    w.update(linear("projector.linear_1", v["hidden_size"], hidden))
    w.update(linear("projector.linear_2", hidden, hidden))
    w["model.embed_tokens.weight"] = normal(VOCAB_SIZE, hidden)
    head_dim = hidden // heads
    for i in range(dims.layers):
        p = f"model.layers.{i}"
        w.update(norm(f"{p}.input_layernorm", hidden, False))
        w.update(norm(f"{p}.post_attention_layernorm", hidden, False))
        w.update(linear(f"{p}.self_attn.q_proj", hidden, heads * head_dim, gain=2.0))
        w.update(linear(f"{p}.self_attn.k_proj", hidden, kv_heads * head_dim, gain=2.0))
        w.update(linear(f"{p}.self_attn.v_proj", hidden, kv_heads * head_dim, gain=2.0))
        w.update(linear(f"{p}.self_attn.o_proj", heads * head_dim, hidden, bias=False, gain=2.0))
        w.update(linear(f"{p}.mlp.gate_proj", hidden, inter, bias=False))
        w.update(linear(f"{p}.mlp.up_proj", hidden, inter, bias=False))
        w.update(linear(f"{p}.mlp.down_proj", inter, hidden, bias=False))
    w.update(norm("model.norm", hidden, False))
    head = normal(VOCAB_SIZE, hidden, std=dims.head_std)
    first_action = len_tokenizer() - N_BINS
    head[first_action:first_action + N_BINS] *= 10.0  # action rows: std 0.5 (tiny)
    w["lm_head.weight"] = head
    return w


def proprio_projector(gen: torch.Generator, dims: Dims = TINY) -> dict[str, torch.Tensor]:
    h, d = dims.hidden, dims.proprio_dim
    return {"fc1.weight": torch.randn(h, d, generator=gen) / d ** 0.5,
            "fc1.bias": torch.randn(h, generator=gen) * 0.1,
            "fc2.weight": torch.randn(h, h, generator=gen) / h ** 0.5,
            "fc2.bias": torch.randn(h, generator=gen) * 0.1}


def len_tokenizer() -> int:
    return REGULAR_VOCAB + len(SPECIALS) + N_BINS


def tokenizer_files(out: Path) -> None:
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), REGULAR_VOCAB)})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    added = {}
    for i, tok in enumerate(SPECIALS):
        added[str(REGULAR_VOCAB + i)] = {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True}
    for n in range(N_BINS):
        added[str(REGULAR_VOCAB + len(SPECIALS) + n)] = {"content": f"<|action_{n}|>", "lstrip": False,
                                                         "normalized": True, "rstrip": False,
                                                         "single_word": False, "special": False}
    tok_cfg = {"added_tokens_decoder": added, "bos_token": None, "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "mask_token": "<|mask|>",
               "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
               "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
               "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def statistics(gen: torch.Generator) -> dict:
    def stats(dim, mask):
        lo = (-1.0 - torch.rand(dim, generator=gen)).tolist()
        hi = (1.0 + torch.rand(dim, generator=gen)).tolist()
        out = {"mean": [0.0] * dim, "std": [1.0] * dim, "min": [2 * x for x in lo], "max": [2 * x for x in hi],
               "q01": lo, "q99": hi}
        if mask is not None:
            out["mask"] = mask
        return out
    return {UNNORM_KEY: {"action": stats(7, [True] * 6 + [False]), "proprio": stats(PROPRIO_DIM, None),
                         "num_transitions": 1000, "num_trajectories": 10}}


def write(out_dir, dims: Dims = TINY, seed: int = SEED, dataset_statistics: dict | None = None) -> Path:
    """Write the checkpoint into ``out_dir`` (created); returns it. ``dims``, ``seed``: another size
    and draw (the defaults are the golden checkpoint); ``dataset_statistics``: the statistics to
    write (default: random ones under ``UNNORM_KEY``, drawn after the weights)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    (out / "config.json").write_text(json.dumps(config_dict(dims), indent=2))
    save_file(weights(gen, dims), str(out / "model.safetensors"), metadata={"format": "pt"})
    torch.save(proprio_projector(gen, dims), out / "proprio_projector--0_checkpoint.pt")
    stats = statistics(gen) if dataset_statistics is None else dataset_statistics
    (out / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 3211264, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 3, "processor_class": "DreamVLProcessor",
        "image_processor_type": "DreamVLImageProcessor"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": 151666,
        "alg": "maskgit_plus", "steps": 1, "temperature": 0.0, "max_new_tokens": 58}, indent=2))
    tokenizer_files(out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    print(write(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
