"""UD-VLA's discrete-diffusion sampler, as pure functions (``make_mask``, ``denoise``,
``mask_by_random_topk`` and the step loop of ``reference/RoboVLMs/eval/calvin/model_wrapper_emu_dis.py``,
``EmuVLAModel_i_ia_dis.step``), and the attention mask of its model (``build_blockwise_attn_mask``
in ``reference/Emu3/emu3/mllm/modeling_emu3.py``).

The sampler generates the *whole* region after the prompt jointly: the future frames (a copy of the
observation's frame prompt with every token between ``<image start>`` and ``<image end>`` masked)
and the action region (``<boa>`` and 69 masks). Each step, in this order (the order of the random
draws matters: one seeded ``torch.Generator`` feeds both):

1. if the region holds an ``<eoa>``, every input position after the first one is masked again
   (``input_ids[:, -seq_len + e + 1:]``; at the region's last position that slice is the whole
   sequence, prompt included, a quirk kept here);
2. one forward over the whole sequence; logits at position ``p`` from position ``p - 1``; the last
   70 positions restricted to the FAST ids and ``<eoa>``, the others to the visual tokens,
   ``<image token>``, ``<eof>`` and the digits and ``*`` of ``1*25*25``/``1*10*10``;
3. ``torch.multinomial`` over the softmax of every position (one draw per position, masked or not);
4. ``mask_len = max(1, min(n_masked - 1, floor(seq_len * cos(pi/2 * (step+1)/steps))))`` positions
   are masked again: the lowest ``log p + T * Gumbel`` (``uniform_`` over ``[B, seq_len]``), with the
   temperature ``T`` multiplied by ``1 - ratio`` at every step *cumulatively* (the loop passes the
   returned temperature back in), so ``T = prod(1 - (i+1)/steps)``.

The sampler's output is the last step's *sampled* ids: after the last step one position is still
masked in its state (``mask_len`` is at least 1), and the sample drawn there is used.
"""
from __future__ import annotations

import math

import torch

from .ud_vla_tokens import BOA_ID, BOI_ID, BOV_ID, EOA_ID, EOF_ID, EOI_ID, IMG_ID, PAD_ID

ACTION_REGION = 70                 # <boa> + 69 generated action tokens (make_mask's new_action_len)
VISUAL_END = 184622                # denoise's image-region ids: range(151854, 184622), the 32,768 visual tokens
# denoise's image-region extras besides the visual tokens: the digits and "*" of "1*25*25" and "1*10*10"
IMAGE_REGION_TEXT_IDS = (16, 9, 15, 17, 20)


def make_mask(image_ids: torch.Tensor, mask_id: int, new_action_len: int = ACTION_REGION) -> torch.Tensor:
    """``[B, I]`` frame ids (ending with ``<boa>``) -> the generated region's start ``[B, I + 69]``:
    the tokens strictly inside each ``<image start>``..``<image end>`` masked, then 69 masks."""
    is_boi, is_eoi = image_ids == BOI_ID, image_ids == EOI_ID
    inside = (torch.cumsum(is_boi, dim=1) - torch.cumsum(is_eoi, dim=1) > 0) & ~is_boi & ~is_eoi
    masked = torch.where(inside, torch.full_like(image_ids, mask_id), image_ids)
    tail = torch.full((image_ids.shape[0], new_action_len - 1), mask_id, dtype=image_ids.dtype, device=image_ids.device)
    return torch.cat([masked, tail], dim=1)


def blockwise_attention(ids: torch.Tensor) -> torch.Tensor:
    """``build_blockwise_attn_mask`` as a boolean ``[B, 1, L, L]`` (True = may attend): ``<image
    start>``/``<boa>`` open and ``<image end>``/``<eoa>`` close a block; runs of block positions
    (boundaries included) attend bidirectionally within themselves, other runs ("text") causally;
    every run sees the runs before it; ``<pad>`` keys are hidden."""
    opens = (ids == BOI_ID) | (ids == BOA_ID)
    closes = (ids == EOI_ID) | (ids == EOA_ID)
    level = (torch.cumsum(opens, dim=1) - torch.cumsum(closes, dim=1)).clamp(min=0)
    image = (level > 0) | opens | closes
    previous = torch.zeros_like(image)
    previous[:, 1:] = image[:, :-1]
    run = torch.cumsum((image != previous).to(torch.int32), dim=1)
    allowed = run[:, None, :] <= run[:, :, None]
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device))
    allowed &= image[:, :, None] | causal[None]
    allowed &= (ids != PAD_ID)[:, None, :]
    return allowed[:, None]


def region_vocabularies(vocab_size: int, action_ids, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V]`` bool each: the ids ``denoise`` allows in the image region and in the action region."""
    image = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    image[BOV_ID:VISUAL_END] = True
    image[[IMG_ID, EOF_ID, *IMAGE_REGION_TEXT_IDS]] = True
    action = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    action[torch.as_tensor(list(action_ids), device=device)] = True
    return image, action


def cosine_schedule(t: torch.Tensor) -> torch.Tensor:
    return torch.cos(t * math.pi * 0.5)


def gumbel_noise(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.zeros_like(t).uniform_(0, 1, generator=generator)
    return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))


def mask_by_random_topk(mask_len: torch.Tensor, probs: torch.Tensor, temperature: float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """True at the ``mask_len`` positions (per row) of lowest ``log p + temperature * Gumbel``."""
    confidence = torch.log(probs.clamp(min=1e-20)) + temperature * gumbel_noise(probs, generator)
    cut_off = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
    return confidence < cut_off


def remask_eoa_tail(input_ids: torch.Tensor, gen: torch.Tensor, mask_id: int) -> None:
    """Step 1 of a step (in place): mask the inputs after each row's first ``<eoa>`` in the region
    (the original takes the first ``<eoa>`` of the flattened batch for every row; it runs one row)."""
    seq_len = gen.shape[1]
    for b in range(gen.shape[0]):
        where = (gen[b] == EOA_ID).nonzero()
        if where.numel():
            input_ids[b, -seq_len + int(where[0, 0]) + 1:] = mask_id


def denoise_step(logits_fn, input_ids: torch.Tensor, gen: torch.Tensor, generator: torch.Generator, ratio: float,
                 temperature: float, mask_id: int, image_vocab: torch.Tensor, action_vocab: torch.Tensor):
    """One call of the original's ``denoise`` (see the module docstring). ``logits_fn(input_ids)``
    returns the float32 logits ``[B, seq_len, V]`` that predict the region (already shifted).
    Updates ``input_ids`` in place; returns ``(input_ids, gen, temperature, sampled)``."""
    seq_len = gen.shape[1]
    remask_eoa_tail(input_ids, gen, mask_id)
    logits = logits_fn(input_ids)
    logits[:, :-ACTION_REGION].masked_fill_(~image_vocab, float("-inf"))
    logits[:, -ACTION_REGION:].masked_fill_(~action_vocab, float("-inf"))
    probs = logits.softmax(dim=-1)
    sampled = torch.multinomial(probs.reshape(-1, logits.size(-1)), 1, generator=generator)[:, 0]
    sampled = sampled.view(*logits.shape[:-1])
    unknown = gen == mask_id
    sampled = torch.where(unknown, sampled, gen)
    mask_ratio = cosine_schedule(torch.tensor(ratio))
    selected = torch.gather(probs, -1, sampled.long()[..., None]).squeeze(-1)
    selected = torch.where(unknown, selected, torch.finfo(selected.dtype).max)
    mask_len = (seq_len * mask_ratio).floor().unsqueeze(0).to(logits.device)
    mask_len = torch.max(torch.tensor([1], device=logits.device),
                         torch.min(unknown.sum(dim=-1, keepdim=True) - 1, mask_len))
    temperature = temperature * (1.0 - ratio)
    masking = mask_by_random_topk(mask_len, selected, temperature, generator)
    input_ids[:, -seq_len:] = torch.where(masking, mask_id, sampled)
    gen = torch.where(masking, mask_id, sampled)
    return input_ids, gen, temperature, sampled


def masked_after_steps(seq_len: int, n_masked: int, steps: int) -> list[int]:
    """Masked positions left after each step when no ``<eoa>`` intervenes (the schedule alone):
    ``max(1, min(n - 1, floor(seq_len * cos(pi/2 * (i+1)/steps))))`` in float32, like the original."""
    left = []
    for step in range(steps):
        ratio = cosine_schedule(torch.tensor((step + 1) / steps))
        n_masked = max(1, min(n_masked - 1, int((seq_len * ratio).floor())))
        left.append(n_masked)
    return left


@torch.no_grad()
def sample(logits_fn, input_ids: torch.Tensor, gen: torch.Tensor, steps: int, mask_id: int, image_vocab: torch.Tensor,
           action_vocab: torch.Tensor, seed: int = 42, history: list | None = None) -> torch.Tensor:
    """The step loop: ``steps`` calls of :func:`denoise_step` with ``ratio = (i+1)/steps``, a fresh
    ``torch.Generator(device).manual_seed(seed)`` and temperature 1. ``input_ids`` is the prompt
    followed by ``gen`` (the region, :func:`make_mask`'s output); neither is modified. ``history``:
    a list to append each step's region state to. Returns the last step's sampled ids
    ``[B, seq_len]`` (what the original decodes)."""
    input_ids = input_ids.clone()
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    temperature, sampled = 1, gen
    for step in range(steps):
        input_ids, gen, temperature, sampled = denoise_step(
            logits_fn, input_ids, gen, generator, 1.0 * (step + 1) / steps, temperature, mask_id, image_vocab,
            action_vocab)
        if history is not None:
            history.append(gen.clone())
    return sampled
