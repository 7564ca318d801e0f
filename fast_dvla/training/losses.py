"""Training losses: the teacher's masked diffusion, asymmetric distillation,
and the block-diffusion ablation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import DVLAModel
from ..masks import BIDIRECTIONAL, BLOCK_CAUSAL, AttentionLayout


def forward_full(model: DVLAModel, prefix: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Action logits ``[B, L, V]`` of one uncached forward over ``[prefix | tokens]`` under mask ``kind``."""
    B, P = prefix.shape[:2]
    L = tokens.shape[1]
    slots = torch.arange(L, device=tokens.device)
    embeds = torch.cat([prefix, model.embed_actions(tokens, slots)], dim=1)
    positions = torch.arange(P + L, device=tokens.device)
    layout = AttentionLayout.full(P, model.block_size, P + L, kind)
    hidden = model.backbone_forward(embeds, positions, layout, None)
    return model.action_logits(hidden[:, P:])


def _noised(model, tokens, mask):
    return torch.where(mask, torch.full_like(tokens, model.mask_token_id), tokens)


def _weighted_mean(per_token, mask, weight):
    # normalised by all positions (not only masked ones), as in masked-diffusion ELBOs
    return (per_token * mask * weight).sum() / mask.numel()


def teacher_loss(model, prefix, tokens, mask, weight):
    """Cross-entropy on masked positions, weighted ``1/t``, bidirectional attention."""
    logits = forward_full(model, prefix, _noised(model, tokens, mask), BIDIRECTIONAL)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    return _weighted_mean(ce, mask, weight), logits


def block_diffusion_loss(model, prefix, tokens, mask, weight):
    """Ground-truth cross-entropy under the block-causal mask, weighted ``1/p_b`` (the ablation)."""
    logits = forward_full(model, prefix, _noised(model, tokens, mask), BLOCK_CAUSAL)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    return _weighted_mean(ce, mask, weight), logits


def distillation_loss(student, student_prefix, teacher_logits, tokens, mask, weight):
    """Asymmetric distillation: soft-target cross-entropy from the teacher's
    distribution (bidirectional, computed by the caller without gradient on
    the same noised sequence) to the block-causal student, at masked
    positions, weighted ``1/p_b``. Equals KL(teacher || student) up to the
    teacher's entropy, a constant for the student."""
    logits = forward_full(student, student_prefix, _noised(student, tokens, mask), BLOCK_CAUSAL)
    target = torch.softmax(teacher_logits.float(), dim=-1)
    ce = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _weighted_mean(ce, mask, weight), logits


def teacher_entropy(teacher_logits, mask, weight) -> torch.Tensor:
    """The teacher's entropy at masked positions, weighted and normalised as the distillation loss:
    that loss minus this is ``KL(teacher || student)`` (0 when the student matches the teacher),
    the part of it the student can reduce."""
    with torch.no_grad():
        logp = torch.log_softmax(teacher_logits.float(), dim=-1)
        return _weighted_mean(-(logp.exp() * logp).sum(-1), mask, weight)


def teacher_logits_for(teacher, teacher_prefix, tokens, mask):
    with torch.no_grad():
        return forward_full(teacher, teacher_prefix, _noised(teacher, tokens, mask), BIDIRECTIONAL)
