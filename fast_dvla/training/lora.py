"""The LoRA student: the teacher's own weights plus a low-rank adapter on the
backbone's linear layers (peft). With the adapter off the same module is the
teacher, so one copy of the weights serves both (docs/design.md#training)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, rank: int = 32, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Inject an adapter into ``model.lora_target()`` (the decoder stack: ``model.backbone.decoder`` for
    the reference model, the Qwen2 decoder for Dream-VLA), into its linear layers named in
    ``TARGETS``; freeze everything else. Returns the trainable (adapter) parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("the LoRA student needs peft: pip install peft (or fast-dvla[train])") from err
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=TARGETS)
    inject_adapter_in_model(config, model.lora_target())
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if p.requires_grad:
            params.append(p)
    return params


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapter_disabled(model):
    """Run the teacher: the same weights with the adapter switched off."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_model(model):
    """A copy of ``model`` with the adapter folded into the weights and the adapter layers replaced by
    the plain layers they wrap: the same class as before ``add_lora``, whatever the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for layer in _tuner_layers(merged):
        layer.merge()
    for parent in list(merged.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, name, child.get_base_layer())
    return merged


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" in n}
