"""Memory and speed on paper for published dVLAs at their real sizes (docs/sizing.md).

Pure functions of a model's config numbers:

* :func:`decoder_params`, :func:`lora_params`: parameters of a Llama/Qwen2-layout decoder and of
  the project's LoRA adapter on it (``fast_dvla.training.lora.TARGETS``);
* :func:`kv_cache_bytes`: the exact cache's buffer, ``layers x 2 x kv_heads x head_dim x tokens x
  bytes x batch`` (``BlockKVCache`` preallocates it at full length, prefix plus chunk);
* per decoder, forwards (NFE) and query tokens per chunk (batch of one): :func:`vanilla_counts`
  (exact), :func:`vanilla_cached_counts` (NFE exact, query tokens best/worst by commit order),
  :func:`block_diffusion_counts` and :func:`fast_dvla_counts` (best case, the worst-case bound of
  ``fast_dvla.decoding.max_nfe``, and at given forwards per block);
* :func:`saved_bytes_per_token_per_layer`, :func:`distillation_memory`: what one LoRA distillation
  step (``fast_dvla.training.trainer.StageLoss``, asymmetric loss) keeps for backward, per op of
  ``fast_dvla.backbone.lean_forward``, with and without gradient checkpointing.

:func:`measure_distillation_step` runs one real distillation step of a small
:class:`~fast_dvla.model.ReferenceDVLA` and measures the same quantities
(``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage), which
``tests/test_sizing.py`` and ``scripts/sizing_table.py`` compare with the formulas.

:data:`PUBLISHED` holds the three published dVLAs' numbers, each with where it was read.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..decoding.unmask import fallback_steps_per_block, masked_after_step
from ..training.lora import TARGETS

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_STATES = 2          # exp_avg, exp_avg_sq per trainable parameter
FP32 = 4


# -- parameters and cache ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderShape:
    """A Llama/Qwen2-layout decoder: per layer RMSNorm -> q/k/v (bias for Qwen2) -> RoPE ->
    attention -> o -> residual -> RMSNorm -> SwiGLU (gate, up, down) -> residual; a final norm;
    ``vocab_size`` rows of input embeddings and of the LM head (unless tied)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None
    qkv_bias: bool = False
    tied_embeddings: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear layer of one decoder layer."""
        H, I = self.hidden_size, self.intermediate_size
        return {"q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
                "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def layer_params(shape: DecoderShape) -> int:
    """Weights (and q/k/v biases) of one decoder layer, with its two RMSNorm weights."""
    linears = sum(i * o for i, o in shape.linear_shapes().values())
    bias = (shape.q_dim + 2 * shape.kv_dim) if shape.qkv_bias else 0
    return linears + bias + 2 * shape.hidden_size


def decoder_params(shape: DecoderShape, lm_head: bool = True) -> int:
    """Every parameter of the decoder: embeddings, layers, final norm and (``lm_head``) the LM head."""
    head = shape.vocab_size * shape.hidden_size if lm_head and not shape.tied_embeddings else 0
    return shape.vocab_size * shape.hidden_size + shape.num_layers * layer_params(shape) + shape.hidden_size + head


def lora_params(shape: DecoderShape, rank: int, targets=TARGETS) -> int:
    """Parameters of a rank-``rank`` adapter (``A: r x in``, ``B: out x r``) on ``targets`` in every layer."""
    shapes = shape.linear_shapes()
    return shape.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def qwen2_vl_vision_params(vision: dict, decoder_hidden: int, proprio_dim: int | None = None) -> dict[str, int]:
    """Dream-VLA's vision side as ``fast_dvla.adapters.dream_vla`` builds it from a checkpoint's
    ``vision_config``: the Qwen2-VL ViT (3-D patch embedding without bias, ``depth`` blocks of
    LayerNorm/qkv/proj/LayerNorm/MLP, the 2x2 merger), the projector (two linears, vision width ->
    decoder width) and, given ``proprio_dim``, OpenVLA-OFT's proprio projector (fc1, fc2)."""
    e = vision["embed_dim"]
    c = vision.get("in_channels", vision.get("in_chans", 3))
    patch = c * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * e
    mlp = int(e * vision["mlp_ratio"])
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)
    merged = e * vision["spatial_merge_size"] ** 2
    merger = 2 * e + (merged * merged + merged) + (merged * vision["hidden_size"] + vision["hidden_size"])
    out = {"vision_tower": patch + vision["depth"] * block + merger,
           "projector": (vision["hidden_size"] * decoder_hidden + decoder_hidden)
           + (decoder_hidden * decoder_hidden + decoder_hidden)}
    if proprio_dim:
        out["proprio_projector"] = (proprio_dim * decoder_hidden + decoder_hidden) \
            + (decoder_hidden * decoder_hidden + decoder_hidden)
    return out


def kv_cache_bytes(shape: DecoderShape, tokens: int, dtype_bytes: int = 2, batch: int = 1) -> int:
    """Keys and values of every layer for ``tokens`` positions: ``layers x 2 x kv_heads x head_dim x
    tokens x dtype_bytes x batch`` (what ``BlockKVCache`` allocates for ``max_len = tokens``)."""
    return shape.num_layers * 2 * shape.num_kv_heads * shape.hd * tokens * dtype_bytes * batch


# -- forwards and query tokens per chunk ---------------------------------------------------------------
@dataclass(frozen=True)
class Counts:
    """Forwards of the backbone and tokens forwarded as queries (prefix included), per chunk, one row."""

    nfe: float
    query_tokens: float


def _blocks(chunk_len: int, block_size: int) -> int:
    if block_size < 1 or chunk_len % block_size:
        raise ValueError(f"block_size {block_size} must divide chunk_len {chunk_len} (the engine's rule)")
    return chunk_len // block_size


def vanilla_counts(prefix_len: int, chunk_len: int, steps: int, extra_tokens: int = 0) -> Counts:
    """``vanilla`` (bidirectional teacher, no cache): exactly ``min(steps, L)`` forwards over the whole
    sequence. ``extra_tokens``: positions every forward carries beyond prefix and chunk (Dream-VLA's
    two generated suffix tokens)."""
    nfe = min(steps, chunk_len)
    return Counts(nfe, nfe * (prefix_len + chunk_len + extra_tokens))


def vanilla_commits(chunk_len: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens committed by each forward of the vanilla schedule (``decode_vanilla``'s counts)."""
    masked, out = chunk_len, []
    for step in range(steps):
        if masked == 0:
            break
        count = max(1, masked - masked_after_step(chunk_len, steps, step, schedule))
        out.append(count)
        masked -= count
    return out


def vanilla_cached_counts(prefix_len: int, chunk_len: int, block_size: int, steps: int,
                          schedule: str = "cosine") -> dict[str, Counts]:
    """``vanilla_cached`` (student, vanilla's schedule, exact cache): NFE is fixed by the schedule;
    query tokens depend on the order of commits. Forward ``j`` covers ``[final_len, P + L)`` with
    ``final_len = P + k x`` (leading blocks complete before forward ``j - 1``). ``best``: commits fill
    blocks left to right; ``worst``: the first block stays incomplete to the end (every forward after
    the first recomputes the whole chunk)."""
    _blocks(chunk_len, block_size)
    commits = vanilla_commits(chunk_len, steps, schedule)
    nfe, P, L, k = len(commits), prefix_len, chunk_len, block_size
    before = [sum(commits[:j]) for j in range(nfe)]  # committed before forward j
    best = (P + L) + sum(L - k * (before[j - 1] // k) for j in range(1, nfe))
    worst = (P + L) + (nfe - 1) * L
    return {"best": Counts(nfe, best), "worst": Counts(nfe, worst)}


def block_diffusion_query_tokens(prefix_len: int, chunk_len: int, block_size: int, nfe: float) -> float:
    """Block diffusion's query tokens given its forwards (one row): block 0's first forward carries
    the prefix, every block's first forward also the block completed just before it (cached only
    after that forward), every other forward one block: ``P + k (NFE + N - 1)``."""
    N = _blocks(chunk_len, block_size)
    return prefix_len + block_size * (nfe + N - 1)


def block_diffusion_counts(prefix_len: int, chunk_len: int, block_size: int, fallback_n: int = 2,
                           forwards_per_block: float | None = None) -> dict[str, Counts]:
    """``block_diffusion`` (student, one block at a time, exact cache). ``best``: every block
    committed by one forward (``N``); ``bound``: ``N x S(k, n)`` forwards (``max_nfe``), met exactly
    by a model never above ``tau_conf``; ``at_f``: ``forwards_per_block`` forwards per block."""
    N = _blocks(chunk_len, block_size)
    S = fallback_steps_per_block(block_size, fallback_n)
    out = {"best": Counts(N, block_diffusion_query_tokens(prefix_len, chunk_len, block_size, N)),
           "bound": Counts(N * S, block_diffusion_query_tokens(prefix_len, chunk_len, block_size, N * S))}
    if forwards_per_block is not None:
        nfe = min(max(forwards_per_block, 1.0), S) * N
        out["at_f"] = Counts(nfe, block_diffusion_query_tokens(prefix_len, chunk_len, block_size, nfe))
    return out


def fast_dvla_counts(prefix_len: int, chunk_len: int, block_size: int, fallback_n: int = 2,
                     forwards_per_block: float | None = None, window_blocks: float | None = None
                     ) -> dict[str, Counts]:
    """``fast_dvla`` (student, pipelined blocks, exact cache).

    ``best``: one block added and completed per forward: ``N`` forwards; each forward after the
    first carries the new block and the one completed just before (not cached yet): ``P + k (2N - 1)``
    query tokens, the least any decode can forward (a block is added at most once per step).
    ``bound``: ``N x S(k, n)`` forwards (``max_nfe``); forward ``j >= 1`` (0-based) has at most
    ``min(j + 1, N)`` blocks added, so at most ``P + k + sum_j k min(j + 1, N)`` query tokens (a
    bound, not a decode). ``at_f``: ``forwards_per_block`` forwards per block and ``window_blocks``
    blocks per forward on average (a measured student's ``(query - P) / (k NFE)``):
    ``P + window_blocks x k x NFE``."""
    N = _blocks(chunk_len, block_size)
    S = fallback_steps_per_block(block_size, fallback_n)
    k, P = block_size, prefix_len
    bound_nfe = N * S
    bound_query = P + k + sum(k * min(j + 1, N) for j in range(1, bound_nfe))
    out = {"best": Counts(N, P + k * (2 * N - 1)), "bound": Counts(bound_nfe, bound_query)}
    if forwards_per_block is not None and window_blocks is not None:
        nfe = min(max(forwards_per_block, 1.0), S) * N
        out["at_f"] = Counts(nfe, P + min(max(window_blocks, 1.0), N) * k * nfe)
    return out


def measured_rates(prefix_len: int, chunk_len: int, block_size: int, nfe: float, query_tokens: float
                   ) -> dict[str, float]:
    """A measured decoder's forwards per block and mean blocks per forward (prefix excluded)."""
    N = _blocks(chunk_len, block_size)
    return {"forwards_per_block": nfe / N, "window_blocks": (query_tokens - prefix_len) / (block_size * nfe)}


# -- what one LoRA distillation step keeps for backward ---------------------------------------------------
# Input groups of the LoRA targets: which tensor each adapter's ``lora_A`` saves (for its weight's
# gradient) when the adapter computes in the activations' dtype. q/k/v share the attention norm's
# output, gate/up the MLP norm's; o_proj reads the attention output, which SDPA saves already (the same
# storage: its output is laid out [B, T, heads, D]); down_proj reads silu(gate) * up, saved by nobody else.
LORA_INPUT_GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",),
                     "mlp_in": ("gate_proj", "up_proj"), "mlp_prod": ("down_proj",)}


def saved_bytes_per_token_per_layer(shape: DecoderShape, rank: int, act_bytes: int = 2, lora_bytes: int = 4,
                                    targets=TARGETS, lora: bool = True) -> dict[str, int]:
    """Bytes one decoder layer of ``lean_forward`` saves for backward per token, by op, when only the
    LoRA adapter trains (frozen weights save no input for a weight gradient).

    * ``norms``: each RMSNorm upcasts to fp32 and saves that input and its rsqrt: ``2 (4H + 4)``.
    * ``attention``: SDPA saves q, k, v (GQA, not repeated), its output (act dtype) and the fp32
      logsumexp per head (PyTorch's flash kernel on the CPU; the GPU's memory-efficient kernel pads
      it to 32 queries). RoPE saves only cos/sin, shared by all layers (:func:`saved_activation_bytes`).
    * ``mlp``: gate (SiLU's input), silu(gate) and up (the product's operands): ``3I``.
    * ``lora_inputs``: in the act dtype, one saved input per group of :data:`LORA_INPUT_GROUPS`
      (none for o_proj: SDPA's output). With ``lora_bytes != act_bytes`` peft casts the input to the
      adapter's dtype in each adapter, and each cast copy is saved: ``sum(in_features) x lora_bytes``.
    * ``lora_hidden``: each adapter's ``A x`` (``rank`` values, adapter dtype), saved by ``B``.
    ``lora=False``: the frozen teacher's layer (its working set, nothing saved under no_grad).
    """
    H, I, a = shape.hidden_size, shape.intermediate_size, act_bytes
    out = {"norms": 2 * (FP32 * H + FP32),
           "attention": a * (shape.q_dim + 2 * shape.kv_dim + shape.q_dim) + FP32 * shape.num_heads,
           "mlp": a * 3 * I}
    if lora:
        ins = shape.linear_shapes()
        if lora_bytes == act_bytes:
            sizes = {"attn_in": H, "attn_out": 0, "mlp_in": H, "mlp_prod": I}
            out["lora_inputs"] = a * sum(sizes[g] for g, members in LORA_INPUT_GROUPS.items()
                                         if any(t in targets for t in members))
        else:
            out["lora_inputs"] = lora_bytes * sum(ins[t][0] for t in targets)
        out["lora_hidden"] = lora_bytes * rank * len(targets)
    return out


@dataclass(frozen=True)
class Precision:
    """Training precision: frozen weights and activations in ``act_bytes`` (bf16 on a GPU), the
    LoRA adapter (its weights, gradients and AdamW states) in ``lora_bytes`` (fp32)."""

    act_bytes: int = 2
    lora_bytes: int = 4


def saved_activation_bytes(shape: DecoderShape, rank: int, seq_len: int, chunk_len: int, loss_elements: int,
                           batch: int = 1, precision: Precision = Precision(), targets=TARGETS) -> dict[str, int]:
    """Everything one distillation step (``StageLoss``: teacher under no_grad, then the LoRA student's
    ``distillation_loss``) saves for backward, for ``batch`` sequences of ``seq_len = P + L`` tokens.

    * ``layers``: ``num_layers x batch x seq_len x`` :func:`saved_bytes_per_token_per_layer`. The
      first layer's input norm saves nothing (the embeddings need no gradient under LoRA), the final
      norm saves as much as one norm: the count of norms stays two per layer.
    * ``masks``: each layer's SDPA turns the boolean ``[T, T]`` mask into the query's dtype and
      saves it (once per layer, shared by the batch).
    * ``rope``: cos and sin ``[B, T, head_dim]``, act dtype, shared by all layers.
    * ``loss``: ``log_softmax`` of the student's logits and the teacher's softmax, fp32, over
      ``loss_elements`` (sum over chunk positions of the head's vocabulary) per row; the loss mask
      (bool) and weights (fp32) per chunk position.
    * The teacher's forward saves nothing (no_grad); its logits feed the softmax above.
    """
    a = precision.act_bytes
    per_token = sum(saved_bytes_per_token_per_layer(shape, rank, a, precision.lora_bytes, targets).values())
    return {"layers": shape.num_layers * batch * seq_len * per_token,
            "masks": shape.num_layers * seq_len * seq_len * a,
            "rope": batch * seq_len * 2 * shape.hd * a,
            "loss": batch * (loss_elements * 2 * FP32 + chunk_len * (FP32 + 1))}


def checkpointed_activation_bytes(shape: DecoderShape, rank: int, seq_len: int, chunk_len: int, loss_elements: int,
                                  batch: int = 1, precision: Precision = Precision(), targets=TARGETS
                                  ) -> dict[str, int]:
    """The same step with gradient checkpointing per decoder layer (formula only: the project's
    trainer does not checkpoint). Kept through the forward: each layer's input hidden state, the
    final norm's fp32 input and rsqrt, cos/sin and the loss terms. During backward one layer is
    recomputed, its full set (:func:`saved_bytes_per_token_per_layer` and its mask) alive at once:
    ``recompute``."""
    a = precision.act_bytes
    full = saved_activation_bytes(shape, rank, seq_len, chunk_len, loss_elements, batch, precision, targets)
    per_token = sum(saved_bytes_per_token_per_layer(shape, rank, a, precision.lora_bytes, targets).values())
    return {"layer_inputs": shape.num_layers * batch * seq_len * shape.hidden_size * a,
            "final_norm": batch * seq_len * (FP32 * shape.hidden_size + FP32),
            "rope": full["rope"], "loss": full["loss"],
            "recompute": batch * seq_len * per_token + seq_len * seq_len * a}


def lora_state_bytes(n_params: int, lora_bytes: int = 4) -> dict[str, int]:
    """The adapter's parameters, their gradients and AdamW's two moments, in ``lora_bytes`` each
    (AdamW's per-tensor ``step`` counters, a few bytes each, left out)."""
    return {"params": n_params * lora_bytes, "grads": n_params * lora_bytes,
            "adamw": n_params * lora_bytes * ADAMW_STATES}


def teacher_working_bytes(shape: DecoderShape, seq_len: int, loss_elements: int, batch: int = 1,
                          act_bytes: int = 2) -> dict[str, int]:
    """The teacher's forward under no_grad saves nothing; at most one layer's tensors are alive at a
    time (bounded by that layer's saved set without LoRA, plus its mask), and its logits over
    ``loss_elements`` per row (act dtype) live until the loss. An estimate, not measured."""
    per_token = sum(saved_bytes_per_token_per_layer(shape, 0, act_bytes, act_bytes, lora=False).values())
    return {"one_layer": batch * seq_len * per_token + seq_len * seq_len * act_bytes,
            "logits": batch * loss_elements * act_bytes}


# -- the published architectures -----------------------------------------------------------------------
INSTRUCTION_TOKENS = 11
INSTRUCTION_NOTE = ("instruction: 11 tokens assumed, the word count of LIBERO-Object's 'pick up the alphabet soup "
                    "and place it in the basket' (common words, one BPE token each; not tokenized here)")


@dataclass(frozen=True)
class Architecture:
    """A published dVLA at its published size and LIBERO setting, as this project would decode and
    distil it. ``prefix`` / ``chunk``: (what, tokens) parts of the prompt and of the generated region
    (fixed marker tokens inside it included: every forward computes them). ``loss_segments``:
    (chunk positions, vocabulary the logits cover there). ``block_size``: the student's block, a
    choice of this report (it must divide the chunk)."""

    name: str
    decoder: DecoderShape
    prefix: tuple[tuple[str, int], ...]
    chunk: tuple[tuple[str, int], ...]
    block_size: int
    block_note: str
    published_steps: int
    steps_note: str
    loss_segments: tuple[tuple[int, int], ...]
    loss_note: str
    other_params: dict = field(default_factory=dict)
    teacher_extra_tokens: int = 0
    cache_hidden: bool = False        # the adapter's cache also keeps each position's hidden state
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def prefix_len(self) -> int:
        return sum(n for _, n in self.prefix)

    @property
    def chunk_len(self) -> int:
        return sum(n for _, n in self.chunk)

    @property
    def loss_elements(self) -> int:
        return sum(p * v for p, v in self.loss_segments)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefix_len"], d["chunk_len"], d["loss_elements"] = self.prefix_len, self.chunk_len, self.loss_elements
        return d


DREAM_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}

DREAM_VLA = Architecture(
    name="Dream-VLA (Dream-7B decoder + Qwen2-VL ViT), LIBERO",
    decoder=DecoderShape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
                         vocab_size=152064, qkv_bias=True),
    prefix=(("OpenVLA-OFT proprio token (use_proprio, first)", 1),
            ("system turn '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'", 11),
            ("'<|im_start|>user\\n'", 3),
            ("image pads: 2 cameras x 64 (224 px, 14 px patches, 2x2 merge)", 128),
            ("'What action should the robot take to'", 7),
            ("instruction (assumed, see notes)", INSTRUCTION_TOKENS),
            ("'?'", 1),
            ("'<|im_end|>\\n<|im_start|>assistant\\n'", 5)),
    chunk=(("action tokens: 8 steps x 7 dims", 56),),
    block_size=14, block_note="14 = the shipped reference student's block (2 timesteps; its chunk is also 8 x 7)",
    published_steps=1, steps_note="run_libero_eval_dream.py: steps=1 (maskgit_plus), the LIBERO default",
    loss_segments=((56, 256),), loss_note="the adapter's action_logits: the 256 action rows of lm_head",
    other_params=qwen2_vl_vision_params(DREAM_VISION, 3584, proprio_dim=8),
    teacher_extra_tokens=2, cache_hidden=True,
    notes=("the teacher also generates the 2 chat-suffix tokens '<|im_end|>\\n' (bidirectional forwards carry "
           "them; the student leaves them out)",
           "DreamKVCache also keeps each position's final hidden state (the one-place logit shift)",
           INSTRUCTION_NOTE),
    sources=("github.com/DreamLM/Dream-VLX@a72fa41 vl/train/dreamvl/config.json (decoder shape, vision_config, "
             "vocab 152064, untied)",
             "github.com/DreamLM/Dream-VLX@a72fa41 vla/prismatic/vla/constants.py (LIBERO: 8 x 7 chunk, proprio 8)",
             "github.com/DreamLM/Dream-VLX@a72fa41 vla/experiments/robot/libero/run_libero_eval_dream.py "
             "(224 px images, steps=1, maskgit_plus)",
             "github.com/DreamLM/Dream-VLX@a72fa41 vla/vla-scripts/run-dreamvla.sh (2 images, proprio, LoRA rank 32)",
             "fast_dvla/adapters/dream_vla.py (prompt template, 64 tokens per 224 px image, suffix, hidden cache)"),
)

UD_VLA = Architecture(
    name="UD-VLA (Emu3-8B decoder), LIBERO",
    decoder=DecoderShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                         vocab_size=184622),
    prefix=(("BOS", 1), ("instruction (assumed, see notes)", INSTRUCTION_TOKENS),
            ("agent view 200x200 -> 25x25 VQ codes + boi, '1*25*25' (7), img, eof, eoi", 636),
            ("wrist view 80x80 -> 10x10 VQ codes + boi, '1*10*10' (7), img, eof, eoi", 111)),
    chunk=(("future agent view, same layout (boi/eoi kept, the 634 between masked)", 636),
           ("future wrist view, same layout", 111),
           ("boa + 69 action slots (FAST tokens up to eoa)", 70)),
    block_size=43, block_note="43 = a divisor of the 817-token region (19 blocks); a choice of this report",
    published_steps=72, steps_note="evaluate_libero_emu_ddp.py --steps 72 (the LIBERO scripts), cosine schedule",
    loss_segments=((747, 32768 + 9), (70, 1024 + 2)),
    loss_note=("the ids its sampler allows: 32,768 image codes + 9 digit/marker ids at image positions, the FAST "
               "range (1,025 ids) + eoa at action positions (it masks the 184,622-row logits to these)"),
    notes=("747 = 636 + 111 checked: Emu3's VQ downsamples by 8 and VLA_Video frames carry boi, 't*h*w' "
           "(one token per character), img, eof, eoi; the generated region is the context frames re-masked "
           "plus boa and 69 masks (make_mask)",
           "the original runs all 72 steps, each over the whole sequence",
           INSTRUCTION_NOTE),
    sources=("github.com/OpenHelix-Team/Unified-Diffusion-VLA@97756cc configs/moe_fast_video.json (hidden 4096, "
             "32 layers, 32/8 heads, 14336, vocab 184622, untied, no qkv bias per "
             "reference/Emu3/emu3/mllm/configuration_emu3.py)",
             "github.com/OpenHelix-Team/Unified-Diffusion-VLA@97756cc "
             "reference/RoboVLMs/eval/libero/model_wrapper_emu.py "
             "(EmuVLAModel_i_ia_dis: 200/80 px, max_new_tokens 747+70, steps 72, cosine, make_mask, allowed ids)",
             "github.com/OpenHelix-Team/Unified-Diffusion-VLA@97756cc "
             "reference/RoboVLMs/eval/libero/evaluate_libero_emu_ddp.py "
             "and scripts/libero/run_eval_libero_univla_dis_libero_object_mutilgpu.sh (window 1, steps 72)",
             "github.com/OpenHelix-Team/Unified-Diffusion-VLA@97756cc reference/Emu3/emu3/mllm/processing_emu3.py "
             "(VLA_Video frame layout)",
             "github.com/OpenHelix-Team/Unified-Diffusion-VLA@97756cc pretrain/fast_libero_all_t10_s50/"
             "processor_config.json (FAST vocab 1024)"),
)

MMADA_VLA = Architecture(
    name="MMaDA-VLA (LLaDA-8B / MMaDA-8B decoder), LIBERO",
    decoder=DecoderShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=12288,
                         vocab_size=134656 + 256),
    prefix=(("task token <|ti2ia|>", 1),
            ("soi + 256 MAGVIT-v2 codes of the 256x256 merged views + eoi", 258),
            ("text: bos + instruction + eos, left-padded to max_text_len", 128)),
    chunk=(("soi + 256 goal-image codes + eoi", 258), ("soa + 5 steps x 7 action bins + eoa", 37)),
    block_size=59, block_note="59 = a divisor of the 295-token region (5 blocks); a choice of this report",
    published_steps=24, steps_note="mmadavla/eval/utils.py: timesteps=24 (its server), cosine schedule",
    loss_segments=((256, 8192), (35, 256)),
    loss_note="its generate slices the logits to the codebooks: 8,192 image codes, 256 action bins",
    notes=("prefix + region = 682 tokens: the '~700-token' sequence",
           "LLaDA attends with 32 key/value heads (no grouping): 4x Emu3's cache per token",
           "its evaluation server turns on dLLM-Cache (approximate reuse every 6 steps); not counted here",
           "the markers inside the region (soi, eoi, soa, eoa) are fixed, never masked"),
    sources=("huggingface.co/GSAI-ML/LLaDA-8B-Instruct config.json (d_model 4096, 32 layers, 32/32 heads, "
             "mlp_hidden_size 12288, vocab 126464, no bias, untied)",
             "github.com/Gen-Verse/MMaDA@3cdb870 configs/mmada_pretraining_stage1_llada_instruct.yaml "
             "(new_vocab_size 134656, codebook 8192, num_vq_tokens 256)",
             "github.com/yliu-cs/MMaDA-VLA@872172d mmadavla/train/train_mmadavla.py (vocab + 256 action bins, "
             "chunk 5 for LIBERO, max_text_len 128)",
             "github.com/yliu-cs/MMaDA-VLA@872172d mmadavla/utils/prompt.py (sequence layout)",
             "github.com/yliu-cs/MMaDA-VLA@872172d mmadavla/data/preprocess.py (views merged into 256x256)",
             "github.com/yliu-cs/MMaDA-VLA@872172d mmadavla/eval/utils.py (timesteps 24, cosine, dLLM-Cache)"),
)

PUBLISHED = (DREAM_VLA, UD_VLA, MMADA_VLA)


# -- tables -------------------------------------------------------------------------------------------
def architecture_table(arch: Architecture, reference: dict, lora_rank: int = 32, batch: int = 8,
                       fallback_n: int = 2, vanilla_cached_steps: int = 5, project_vanilla_steps: int = 12,
                       precision: Precision = Precision(), cache_bytes: int = 2) -> dict:
    """Every number of one architecture's table. ``reference``: the reference student's measured
    rates, ``{"block_diffusion": {"forwards_per_block": ...}, "fast_dvla": {"forwards_per_block": ...,
    "window_blocks": ...}}`` (:func:`measured_rates`)."""
    shape, P, L, k = arch.decoder, arch.prefix_len, arch.chunk_len, arch.block_size
    T = P + L
    decoder = decoder_params(shape)
    params = {"decoder": decoder, **arch.other_params}
    params["total"] = sum(params.values())
    n_lora = lora_params(shape, lora_rank)
    cache = kv_cache_bytes(shape, T, cache_bytes)
    hidden = T * shape.hidden_size * cache_bytes if arch.cache_hidden else 0

    rows = []
    for steps, why in ((arch.published_steps, "published"), (project_vanilla_steps, "this project's default")):
        c = vanilla_counts(P, L, steps, arch.teacher_extra_tokens)
        rows.append({"decoder": "vanilla", "case": f"S={steps} ({why}), exact", "nfe": c.nfe,
                     "query_tokens": c.query_tokens})
    for steps, why in ((arch.published_steps, "published"), (vanilla_cached_steps, "the reference student's")):
        if steps == arch.published_steps and why != "published":
            continue
        vc = vanilla_cached_counts(P, L, k, steps)
        for case in ("best", "worst"):
            rows.append({"decoder": "vanilla_cached", "case": f"S={steps} ({why}), {case} commit order",
                         "nfe": vc[case].nfe, "query_tokens": vc[case].query_tokens})
    bd = block_diffusion_counts(P, L, k, fallback_n, reference["block_diffusion"]["forwards_per_block"])
    fd = fast_dvla_counts(P, L, k, fallback_n, reference["fast_dvla"]["forwards_per_block"],
                          reference["fast_dvla"]["window_blocks"])
    labels = {"best": "best case", "bound": f"worst-case bound (N x S({k},{fallback_n}))",
              "at_f": "at the reference student's measured rate"}
    for name, counts in (("block_diffusion", bd), ("fast_dvla", fd)):
        for case in ("best", "at_f", "bound"):
            rows.append({"decoder": name, "case": labels[case], "nfe": counts[case].nfe,
                         "query_tokens": counts[case].query_tokens})

    saved = saved_activation_bytes(shape, lora_rank, T, L, arch.loss_elements, 1, precision)
    ckpt = checkpointed_activation_bytes(shape, lora_rank, T, L, arch.loss_elements, 1, precision)
    saved_b = saved_activation_bytes(shape, lora_rank, T, L, arch.loss_elements, batch, precision)
    ckpt_b = checkpointed_activation_bytes(shape, lora_rank, T, L, arch.loss_elements, batch, precision)
    state = lora_state_bytes(n_lora, precision.lora_bytes)
    weights = params["total"] * precision.act_bytes
    one_layer_b = ckpt_b["recompute"]
    memory = {
        "batch": batch, "seq_len": T,
        "weights": weights,
        "lora_params": n_lora, "lora_state": state, "lora_state_total": sum(state.values()),
        "per_token_per_layer": saved_bytes_per_token_per_layer(shape, lora_rank, precision.act_bytes,
                                                               precision.lora_bytes),
        "saved_per_sample": saved, "saved_per_sample_total": sum(saved.values()),
        "saved_per_sample_bf16_adapter": sum(saved_activation_bytes(
            shape, lora_rank, T, L, arch.loss_elements, 1,
            Precision(precision.act_bytes, precision.act_bytes)).values()),
        "checkpointed_per_sample": ckpt,
        "checkpointed_kept_per_sample": sum(v for key, v in ckpt.items() if key != "recompute"),
        "saved_batch_total": sum(saved_b.values()),
        "checkpointed_batch_kept": sum(v for key, v in ckpt_b.items() if key != "recompute"),
        "one_layer_batch": one_layer_b,
        "teacher_batch": teacher_working_bytes(shape, T, arch.loss_elements, batch, precision.act_bytes),
    }
    memory["total_no_checkpointing"] = weights + memory["lora_state_total"] + memory["saved_batch_total"] + one_layer_b
    memory["total_checkpointing"] = (weights + memory["lora_state_total"] + memory["checkpointed_batch_kept"]
                                     + 2 * one_layer_b)
    return {"architecture": arch.to_dict(), "params": params, "lora_rank": lora_rank,
            "kv_cache": {"tokens": T, "bytes": cache, "bytes_per_token": cache // T, "dtype_bytes": cache_bytes,
                         "adapter_hidden_bytes": hidden},
            "blocks": {"block_size": k, "num_blocks": L // k,
                       "fallback_steps_per_block": fallback_steps_per_block(k, fallback_n)},
            "decoders": rows, "memory": memory}


# -- measuring one real distillation step ------------------------------------------------------------------
def measure_distillation_step(model_config=None, rank: int = 32, batch: int = 2, act_dtype: str = "fp32",
                              lora_dtype: str = "fp32", seed: int = 0) -> dict:
    """One step of the project's LoRA distillation (``add_lora``, ``StageLoss`` with the asymmetric
    loss, AdamW) on a random :class:`~fast_dvla.model.ReferenceDVLA` of ``model_config``: bytes of the
    tensors autograd saves (``saved_tensors_hooks``; deduplicated by storage, parameters and buffers
    left out), the adapter's parameter count and the bytes of its gradients and AdamW moments."""
    import torch

    from ..model import ModelConfig, ReferenceDVLA
    from ..training.config import TrainConfig
    from ..training.lora import add_lora
    from ..training.noise import student_noise
    from ..training.trainer import StageLoss

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cfg = model_config or ModelConfig()
    torch.manual_seed(seed)
    model = ReferenceDVLA(cfg).to(dtypes[act_dtype])
    params = add_lora(model, rank)
    for p in params:
        p.data = p.data.to(dtypes[lora_dtype])
    model.train()
    config = TrainConfig(stage="distill", data="unused", out="unused", teacher="unused", student="lora",
                         loss="asymmetric", lora_rank=rank)
    loss_module = StageLoss(config, model, model)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g)
    batch_data = {"images": images.to(dtypes[act_dtype]),
                  "instr_ids": torch.randint(1, cfg.instr_vocab, (batch, cfg.instr_len), generator=g),
                  "state": torch.randn(batch, cfg.state_dim, generator=g).to(dtypes[act_dtype]),
                  "tokens": torch.randint(0, cfg.n_bins, (batch, cfg.chunk_len), generator=g)}
    mask, weight = student_noise(batch, model.num_blocks, model.block_size, g)
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_module(batch_data, mask, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    moments = sum(v.untyped_storage().nbytes() for s in optimizer.state.values()
                  for key, v in s.items() if key in ("exp_avg", "exp_avg_sq"))
    return {"saved_bytes": sum(saved.values()), "saved_tensors": len(saved),
            "lora_params": sum(p.numel() for p in params),
            "lora_param_bytes": sum(p.untyped_storage().nbytes() for p in params),
            "grad_bytes": sum(p.grad.untyped_storage().nbytes() for p in params), "adamw_bytes": moments,
            "finite_loss": bool(torch.isfinite(loss).item())}


def reference_shape(model_config) -> DecoderShape:
    """The reference model's decoder as a :class:`DecoderShape` (its token table has 2 rows, unused)."""
    c = model_config
    return DecoderShape(hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
                        num_kv_heads=c.num_kv_heads, intermediate_size=c.intermediate_size, vocab_size=2,
                        qkv_bias=c.backbone == "qwen2")


def predicted_distillation_step(model_config=None, rank: int = 32, batch: int = 2, act_dtype: str = "fp32",
                                lora_dtype: str = "fp32") -> dict:
    """:func:`measure_distillation_step`'s quantities from the formulas."""
    from ..model import ModelConfig

    cfg = model_config or ModelConfig()
    shape = reference_shape(cfg)
    precision = Precision(DTYPE_BYTES[act_dtype], DTYPE_BYTES[lora_dtype])
    T, L = cfg.prefix_len + cfg.chunk_len, cfg.chunk_len
    saved = saved_activation_bytes(shape, rank, T, L, L * cfg.n_bins, batch, precision)
    n = lora_params(shape, rank)
    state = lora_state_bytes(n, precision.lora_bytes)
    return {"saved_bytes": sum(saved.values()), "saved_parts": saved, "lora_params": n,
            "lora_param_bytes": state["params"], "grad_bytes": state["grads"], "adamw_bytes": state["adamw"]}


def human_bytes(n: float) -> str:
    """Bytes in binary units: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    """``7.62 B``, ``40.4 M``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f} {unit}"
    return f"{n:.0f}"


__all__ = ["DecoderShape", "Counts", "Precision", "Architecture", "PUBLISHED", "decoder_params", "layer_params",
           "lora_params", "qwen2_vl_vision_params", "kv_cache_bytes", "vanilla_counts", "vanilla_commits",
           "vanilla_cached_counts", "block_diffusion_counts", "block_diffusion_query_tokens", "fast_dvla_counts",
           "measured_rates", "saved_bytes_per_token_per_layer", "saved_activation_bytes",
           "checkpointed_activation_bytes", "lora_state_bytes", "teacher_working_bytes", "architecture_table",
           "measure_distillation_step", "predicted_distillation_step", "reference_shape", "human_bytes",
           "human_count"]
