"""Keeping a chosen setting in a policy directory, as ``fast-dvla export --for-method`` does."""
from __future__ import annotations

from ..policy import FastDVLAPolicy


def apply_setting(path: str, method: str, config: dict) -> FastDVLAPolicy:
    """Save ``config`` (a ``DecodeConfig.to_dict()``) as ``method``'s settings in the policy at
    ``path``: the default's if ``method`` is its default decoder, else that decoder's
    ``method_settings``, only where it differs from what the policy does now. Only ``config.json`` is rewritten; the weights stay as they are."""
    policy = FastDVLAPolicy.from_pretrained(path)
    current = policy.decode_config_for(method).to_dict()
    changes = {k: v for k, v in config.items() if k != "method" and current.get(k) != v}
    policy.configure_decoding(changes, for_method=method)
    policy.save_config(path)
    return policy
