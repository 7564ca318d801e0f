"""A tiny random checkpoint in UD-VLA's published format (github.com/OpenHelix-Team/Unified-Diffusion-VLA).

    python scripts/goldens/ud_vla_tiny.py OUT_DIR

Writes, deterministically (one seeded CPU ``torch.Generator``, fixed draw order; the tokenizer
files from fixed rules, no random draws):

- ``config.json``: the fields ``Emu3MoEConfig`` saves (``architectures: ["Emu3MoE"]``,
  ``model_type: "Emu3"``, ``use_blockwise_attn_mask: true`` as UD-VLA's training script sets it,
  ``action_experts: false``), an Emu3-8B decoder shrunk to 2 layers of width 16 with 4 query heads
  over 2 key/value heads (grouped-query attention, as Emu3's 32 over 8), and the real vocabulary
  (184,622 rows) and special ids: every id the original hard-codes (mask 151848, ``<boa>`` 151844,
  ``<eoa>`` 151845, ``<image start>`` 151852, ..., the FAST base 151642) is the real one.
- ``model.safetensors``: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``, the
  published tensor names. The two 184,622 x 16 tables make it about 24 MB: small enough to write at
  test time, so nothing of it is committed.
- ``emu3.tiktoken``, ``emu3_vision_tokens.txt``, ``tokenizer_config.json``: the Emu3 tokenizer's
  files (a UD-VLA checkpoint saves them next to the weights). The real byte-level BPE ranks cannot
  be downloaded here, so ``emu3.tiktoken`` holds the 256 byte tokens (ranks 0-255 in GPT-2's
  ``bytes_to_unicode`` order, as Qwen's and Emu3's do: ``"0"`` is 15, ``"*"`` is 9), then
  ``N_MERGES`` merges learned here from ``CORPUS`` (so that instructions really merge), then
  unique filler tokens up to the real 151,643 ranks (each starts with the byte 0xF8, which UTF-8
  text never holds, so no text ever forms one). ``emu3_vision_tokens.txt`` is the real list:
  ``<|image token|>``, ``<|image start|>``, ``<|image end|>`` and the 32,768 visual tokens.
- ``action_tokenizer/``: a FAST action tokenizer in the format of the repository's
  ``pretrain/fast_calvin_abcd_a10_s50`` (``processor_config.json`` with its scale 50, vocab 1024,
  min token -158; ``tokenizer.json``, a byte-level BPE whose vocabulary is, like the real one, the
  324 raw characters then 700 merged tokens; here the merges are the UTF-8 pairs of the DCT codes
  nearest zero, by rule, not fitted to data).

The weights are random but shaped so that tokens depend on the prompt: ``lm_head`` rows are drawn
with std 1, so logits spread over several units and the seeded multinomial draws of the original
sampler land on different tokens for different prompts; the ``<eoa>`` row is drawn ``EOA_GAIN``
times larger, so that, as a fine-tuned model ends its FAST tokens with ``<eoa>``, some runs commit
one early (and the sampler's re-masking after it is exercised); attention projections have std
``2 / sqrt(fan_in)`` so that attention moves the residual stream.

Nothing of the original code is needed to write it; ``scripts/goldens/ud_vla_golden.py`` runs the
original on it, and ``tests/test_adapter_ud_vla.py`` regenerates it.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
from pathlib import Path

import torch

SEED = 20261206
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 16, 48, 2, 4, 2
VOCAB_SIZE = 184622            # Emu3: 151,643 BPE ranks + 3 + 205 extras + 3 image specials + 32,768 visual tokens
REGULAR_VOCAB = 151643
N_VISUAL = 32768
N_MERGES = 60
EOA_ID = 151845                # <|extra_199|>, the end of the action tokens
EOA_GAIN = 2.0                 # its lm_head row's scale: some sampled runs end their actions early
MAX_POSITIONS = 1650           # UD-VLA's CALVIN training sets --max_position_embeddings 1650
FAST = {"scale": 50, "vocab_size": 1024, "min_token": -158}
ACTION_TOKENIZER_DIR = "action_tokenizer"

# CALVIN-style instructions: the text the tiny BPE's merges are learned from
CORPUS = ("open the drawer", "close the drawer", "push the sliding door to the left",
          "push the sliding door to the right", "lift the red block from the table", "turn on the led light",
          "turn off the lightbulb", "place the blue block in the sliding cabinet", "stack the blocks on top",
          "rotate the pink block to the right", "push the blue block into the drawer", "lift the pink block")
# Emu3Tokenizer's pattern (Qwen's): contractions, letters, single digits, punctuation, spaces
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte order of Qwen's and Emu3's ranks,
    and the alphabet of the FAST tokenizer's byte-level BPE)."""
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


def config_dict() -> dict:
    """``config.json`` as ``Emu3MoEConfig.save_pretrained`` writes it for a UD-VLA fine-tune."""
    return {
        "architectures": ["Emu3MoE"], "model_type": "Emu3", "transformers_version": "4.44.0", "torch_dtype": "float32",
        "vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS, "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": True,
        "pad_token_id": 151643, "bos_token_id": 151849, "eos_token_id": 151850, "img_token_id": 151851,
        "boi_token_id": 151852, "eoi_token_id": 151853, "eol_token_id": 151846, "eof_token_id": 151847,
        "boa_token_id": 151844, "bov_token_id": 151854, "eov_token_id": 184621, "image_area": 262144,
        "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 1000000.0, "rope_scaling": None,
        "attention_dropout": 0.1, "qkv_bias": False, "use_blockwise_attn_mask": True,
        "use_bidirectional_attn_mask": False, "action_experts": False, "action_dim": 7, "vision_loss_weight": 0.5,
        "action_config": {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 2,
                          "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "action_dim": 7,
                          "vision_loss_weight": 5.0, "rope_theta": 10000.0},
    }


def weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The decoder's tensors under their published names, drawn in a fixed order."""
    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    def linear(fan_in, fan_out, gain=1.0):
        return normal(fan_out, fan_in, std=gain / fan_in ** 0.5)

    head_dim = HIDDEN // HEADS
    w = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = 1.0 + normal(HIDDEN, std=0.1)
        w[f"{p}.self_attn.q_proj.weight"] = linear(HIDDEN, HEADS * head_dim, gain=2.0)
        w[f"{p}.self_attn.k_proj.weight"] = linear(HIDDEN, KV_HEADS * head_dim, gain=2.0)
        w[f"{p}.self_attn.v_proj.weight"] = linear(HIDDEN, KV_HEADS * head_dim, gain=2.0)
        w[f"{p}.self_attn.o_proj.weight"] = linear(HEADS * head_dim, HIDDEN, gain=2.0)
        w[f"{p}.post_attention_layernorm.weight"] = 1.0 + normal(HIDDEN, std=0.1)
        w[f"{p}.mlp.gate_proj.weight"] = linear(HIDDEN, INTER)
        w[f"{p}.mlp.up_proj.weight"] = linear(HIDDEN, INTER)
        w[f"{p}.mlp.down_proj.weight"] = linear(INTER, HIDDEN)
    w["model.norm.weight"] = 1.0 + normal(HIDDEN, std=0.1)
    w["lm_head.weight"] = normal(VOCAB_SIZE, HIDDEN)
    w["lm_head.weight"][EOA_ID] *= EOA_GAIN
    return w


# -- the Emu3 tokenizer's files ---------------------------------------------------------------------
def learned_merges(corpus=CORPUS, n_merges: int = N_MERGES) -> list[bytes]:
    """Byte-pair merges learned from ``corpus`` (pre-split with ``PAT_STR`` as tiktoken splits):
    the most frequent adjacent pair each round, ties to the smallest pair of byte strings."""
    import regex

    words = collections.Counter(tuple(bytes([b]) for b in piece.encode())
                                for text in corpus for piece in regex.findall(PAT_STR, text))
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best[0] + best[1])
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def bpe_ranks() -> list[bytes]:
    """The 151,643 regular tokens in rank order: bytes, learned merges, fillers."""
    tokens = [bytes([b]) for b in bytes_to_unicode()]
    tokens += learned_merges()
    tokens += [b"\xf8" + i.to_bytes(3, "big") for i in range(REGULAR_VOCAB - len(tokens))]
    assert len(set(tokens)) == REGULAR_VOCAB
    return tokens


def tokenizer_files(out: Path) -> None:
    lines = (base64.b64encode(tok).decode() + f" {rank}" for rank, tok in enumerate(bpe_ranks()))
    (out / "emu3.tiktoken").write_text("\n".join(lines) + "\n")
    vision = ["<|image token|>", "<|image start|>", "<|image end|>"]
    vision += [f"<|visual token {i:06d}|>" for i in range(N_VISUAL)]
    (out / "emu3_vision_tokens.txt").write_text("\n".join(vision) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_emu3.Emu3Tokenizer", None]},
        "bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>", "pad_token": "<|endoftext|>",
        "img_token": "<|image token|>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
        "eol_token": "<|extra_200|>", "eof_token": "<|extra_201|>", "clean_up_tokenization_spaces": False,
        "errors": "replace", "model_max_length": MAX_POSITIONS, "padding_side": "right",
        "tokenizer_class": "Emu3Tokenizer"}, indent=2))


# -- the FAST action tokenizer ----------------------------------------------------------------------
def fast_vocab() -> tuple[dict[str, int], list[str]]:
    """The FAST BPE's vocabulary and merges: characters 0..323 (which cover every byte-level
    character), then the UTF-8 pairs of the 2-byte DCT codes, nearest to zero first, then pairs of
    the codes nearest zero, up to ``vocab_size`` tokens."""
    b2u = bytes_to_unicode()
    alphabet = max(ord(c) for c in b2u.values()) + 1       # 324
    zero = -FAST["min_token"]                                # the code of a zero DCT coefficient

    def as_bytes(code: int) -> str:
        return "".join(b2u[b] for b in chr(code).encode())

    vocab = {chr(i): i for i in range(alphabet)}
    merges = []
    two_byte = sorted(range(128, alphabet), key=lambda c: (abs(c - zero), c))
    for code in two_byte:
        a, b = as_bytes(code)
        merges.append((a, b))
    central = two_byte[:23]
    merges += [(as_bytes(x), as_bytes(y)) for x in central for y in central]
    merges = merges[:FAST["vocab_size"] - alphabet]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in merges]


def action_tokenizer_files(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = fast_vocab()
    byte_level = {"add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level, "add_prefix_space": False},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges}}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    auto_map = {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"}
    (out / "processor_config.json").write_text(json.dumps({
        "action_dim": None, "auto_map": auto_map, "min_token": FAST["min_token"],
        "processor_class": "UniversalActionProcessor", "scale": FAST["scale"], "time_horizon": None,
        "vocab_size": FAST["vocab_size"]}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {}, "auto_map": auto_map, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656, "processor_class": "UniversalActionProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "special_tokens_map.json").write_text("{}\n")


def write(out_dir, seed: int = SEED) -> Path:
    """Write the checkpoint into ``out_dir`` (created); returns it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    (out / "config.json").write_text(json.dumps(config_dict(), indent=2))
    save_file(weights(gen), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_files(out)
    action_tokenizer_files(out / ACTION_TOKENIZER_DIR)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    print(write(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
