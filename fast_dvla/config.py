"""Validated decoding settings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

METHODS = ("vanilla", "fast_dllm", "block_diffusion", "fast_dvla", "vanilla_cached")
SCHEDULES = ("cosine", "linear")
TOKEN_RULES = ("argmax", "mean", "majority")


# the decoding settings a user picks for a policy (``fast-dvla export`` saves them) or forces on
# every decoder of a benchmark: (field, type or choices, what it sets). One list, so a new knob
# reaches every command that takes these flags.
TUNABLE_SETTINGS = (
    ("tau_conf", float, "confidence threshold for committing a token"),
    ("tau_add", float, "decoded fraction of the last block at which a new block is added"),
    ("tau_act", float, "decoded fraction of a block's predecessor at which it becomes fully activated"),
    ("vanilla_steps", int, "forwards of the vanilla schedules"),
    ("token_rule", TOKEN_RULES, "which token a greedy commit writes"),
    ("near_bins", int, "greedy decoding: an ordinal slot's confidence = probability within this many bins"),
)


def add_setting_arguments(parser, default: str) -> None:
    """``--tau-conf`` ... ``--near-bins`` on ``parser``, each unset (None) by default;
    ``default`` says what unset means to that command."""
    for name, kind, meaning in TUNABLE_SETTINGS:
        kind_arg = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        parser.add_argument(f"--{name.replace('_', '-')}", default=None, help=f"{meaning}; {default}", **kind_arg)


def _is_count(value) -> bool:
    """An int that is not a bool: ``near_bins=True`` is a mistake, not 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode an action chunk.

    method: ``vanilla`` (bidirectional teacher, MaskGIT-style, no cache),
        ``fast_dllm`` (teacher, approximate dual cache refreshed per block,
        confidence threshold), ``block_diffusion`` (student, blocks one after
        another, exact cache), ``fast_dvla`` (student, pipelined blocks,
        exact cache) or ``vanilla_cached`` (student, vanilla's schedule,
        exact cache of the prefix and leading complete blocks).
    tau_conf: confidence threshold for committing a token.
    tau_add: decoded fraction of the last block at which a new block is added.
    tau_act: decoded fraction of a block's predecessor at which it becomes
        fully activated (and so must commit at least ``max(1, floor(R / n))``
        of its ``R`` masked tokens per step).
    fallback_n: the ``n`` of that rule.
    vanilla_steps: forward passes of vanilla decoding (both kinds), at most
        one per action token (``min(vanilla_steps, chunk_len)``).
    schedule: how many tokens vanilla decoding commits per step.
    fast_dllm_block_size: block length for the Fast-dLLM baseline (default:
        the model's block size).
    temperature: 0 for greedy; > 0 samples and uses the sampled token's
        probability as its confidence.
    token_rule: which token a greedy commit writes. ``argmax``: the most
        probable bin. ``mean``: the bin nearest the expected bin, at slots
        whose bins are ordered values (every action dimension but a
        gripper's: the policy passes its tokenizer's categorical slots); the
        confidence is still the argmax's probability. An action clipped at
        its limit piles its mass on the end bin, so the argmax picks the
        limit while most of the mass says "slowing down"; committed early,
        it drags the rest of the chunk with it (ours;
        docs/design.md#token-rules). ``majority``:
        the argmax where it holds at least half the mass, else the mean's
        bin: a clipped action's end bin rarely holds half, while the
        expert's other spikes (its approach floor) do, and the mean smears
        them (ours).
    near_bins: with a greedy rule, the confidence of an ordinal slot
        is the probability within ``near_bins`` bins of the committed bin
        (0: the argmax's probability, as in the paper). A value spread over
        a few neighbouring bins is certain enough to commit though no single
        bin is likely, so the thresholds commit it sooner (ours).
    use_cache: False recomputes the whole sequence every forward (the exact
        reference the cached decoders are tested against).
    seed: seeds sampling when temperature > 0.
    """

    method: str = "fast_dvla"
    tau_conf: float = 0.5
    tau_add: float = 0.5
    tau_act: float = 0.7
    fallback_n: int = 2
    vanilla_steps: int = 12
    schedule: str = "cosine"
    fast_dllm_block_size: int | None = None
    temperature: float = 0.0
    token_rule: str = "argmax"
    near_bins: int = 0
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown decoding method {self.method!r}; expected one of {METHODS}")
        for name in ("tau_conf", "tau_add", "tau_act"):
            value = getattr(self, name)
            if not _is_number(value) or not (0.0 <= float(value) <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not _is_count(self.fallback_n) or self.fallback_n < 1:
            raise ValueError(f"fallback_n must be an integer >= 1, got {self.fallback_n!r}")
        if not _is_count(self.vanilla_steps) or self.vanilla_steps < 1:
            raise ValueError(f"vanilla_steps must be an integer >= 1, got {self.vanilla_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.fast_dllm_block_size is not None and (not _is_count(self.fast_dllm_block_size)
                                                      or self.fast_dllm_block_size < 1):
            raise ValueError(f"fast_dllm_block_size must be an integer >= 1, got {self.fast_dllm_block_size!r}")
        if not (self.temperature >= 0.0):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.token_rule not in TOKEN_RULES:
            raise ValueError(f"unknown token_rule {self.token_rule!r}; expected one of {TOKEN_RULES}")
        if self.token_rule != "argmax" and self.temperature > 0:
            raise ValueError(f"token_rule={self.token_rule!r} is a greedy rule: it needs temperature 0")
        if not _is_count(self.near_bins) or self.near_bins < 0:
            raise ValueError(f"near_bins must be an integer >= 0, got {self.near_bins!r}")
        if self.near_bins and self.temperature > 0:
            raise ValueError("near_bins scores the committed bin's neighbourhood: it needs greedy decoding "
                             "(temperature 0)")

    def replace(self, **changes) -> "DecodeConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def for_method(self, method: str, method_settings: dict | None = None) -> "DecodeConfig":
        """These settings with ``method`` swapped in and that decoder's own saved settings
        (``method_settings[method]``, see ``check_method_settings``) on top."""
        if method == self.method:
            return self
        return self.replace(method=method, **(method_settings or {}).get(method, {}))

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown decode settings: {sorted(unknown)}")
        return cls(**d)


def check_method_settings(method_settings: dict, default: DecodeConfig) -> dict:
    """Settings a policy keeps for decoders other than its default, used when one is asked for by
    name (``{"fast_dvla": {"token_rule": "mean", "near_bins": 3}}``): a student may decode best with
    the teacher's schedule by default and still want Fast-dVLA's rule tuned for it. Checked here,
    when the policy is built, so a bad entry fails at load time, naming itself."""
    tunable = {name for name, _, _ in TUNABLE_SETTINGS}
    checked = {}
    for method, settings in method_settings.items():
        if method not in METHODS:
            raise ValueError(f"method_settings: unknown decoder {method!r}; expected some of {METHODS}")
        if method == default.method:
            raise ValueError(f"method_settings: {method!r} is the default decoder; its settings are the policy's "
                             f"decode settings")
        unknown = sorted(set(settings) - tunable)
        if unknown:
            raise ValueError(f"method_settings[{method!r}]: unknown settings {unknown}; expected some of "
                             f"{sorted(tunable)}")
        try:
            default.replace(method=method, **settings)
        except ValueError as e:
            raise ValueError(f"method_settings[{method!r}]: {e}") from None
        checked[method] = dict(settings)
    return checked
