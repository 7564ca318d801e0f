"""Validated decoding settings."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, replace

from .schema import ConfigError, check_at_least, check_choice, check_fields, from_mapping

METHODS = ("vanilla", "fast_dllm", "block_diffusion", "fast_dvla", "vanilla_cached")
STUDENT_METHODS = ("block_diffusion", "fast_dvla", "vanilla_cached")  # decoders of the block-causal student
SCHEDULES = ("cosine", "linear")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
TOKEN_RULES = ("argmax", "mean", "majority")
# what torch.Generator.manual_seed accepts
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)


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
    static_shapes: every forward of a decode has one of two fixed shapes
        (the first over ``[prefix | chunk]``, then the chunk alone over the
        cached prefix), with no host read inside a step but the loop's stopping
        test: what ``torch.compile`` and CUDA graphs need. The student's
        decoders then recompute complete blocks instead of reading them from
        the cache (the same tokens and logits, more query tokens); the
        teacher's decoders have fixed shapes either way
        (docs/design.md#static-shapes).
    compile: run each forward through ``torch.compile`` (needs
        ``static_shapes``, so that a decode compiles two graphs once).
    compile_mode: ``torch.compile``'s mode: ``default``, ``reduce-overhead``
        (CUDA graphs on a GPU: the step replayed with one launch) or
        ``max-autotune``.
    seed: seeds sampling when temperature > 0 (an integer a torch generator takes).

    Every field is checked on construction, by type (a bool is not a count, ``"0.5"`` is not a
    number, numbers are finite) and range; a bad one raises ``ConfigError`` (a ``ValueError``)
    naming it.
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
    static_shapes: bool = False
    compile: bool = False
    compile_mode: str = "default"

    def __post_init__(self):
        check_fields(self)
        check_choice(self.method, METHODS, "method", "decoding method")
        for name in ("tau_conf", "tau_add", "tau_act"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"expected a number in [0, 1], got {getattr(self, name)!r}", name)
        check_at_least(self, ("fallback_n", "vanilla_steps", "fast_dllm_block_size"), 1)
        check_choice(self.schedule, SCHEDULES, "schedule", "vanilla schedule")
        if self.temperature < 0.0:
            raise ConfigError(f"expected a number >= 0 (0: greedy), got {self.temperature!r}", "temperature")
        check_choice(self.token_rule, TOKEN_RULES, "token_rule", "token rule")
        if self.token_rule != "argmax" and self.temperature > 0:
            raise ConfigError(f"{self.token_rule!r} is a greedy rule: it needs temperature 0", "token_rule")
        check_at_least(self, ("near_bins",), 0)
        if self.near_bins and self.temperature > 0:
            raise ConfigError("near_bins scores the committed bin's neighbourhood: it needs greedy decoding "
                              "(temperature 0)", "near_bins")
        check_choice(self.compile_mode, COMPILE_MODES, "compile_mode", "torch.compile mode")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode {self.compile_mode!r} needs compile=True", "compile_mode")
        if self.compile and not self.static_shapes:
            raise ConfigError("compile needs static_shapes=True (otherwise every new window shape recompiles)",
                              "compile")
        if self.static_shapes and self.temperature > 0 and self.method in STUDENT_METHODS:
            raise ConfigError(f"static_shapes with {self.method!r} needs greedy decoding (temperature 0): its "
                              "fixed window samples every slot, so the draws would differ from the dynamic "
                              "decode's", "static_shapes")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"expected null or an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (what a torch "
                              f"generator takes), got {self.seed!r}", "seed")

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
        """Settings by field name (a saved config's ``"decode"``); an unknown name is refused, naming
        the nearest field."""
        return from_mapping(cls, d)


def check_method_settings(method_settings: dict, default: DecodeConfig) -> dict:
    """Settings a policy keeps for decoders other than its default, used when one is asked for by
    name (``{"fast_dvla": {"token_rule": "mean", "near_bins": 3}}``): a student may decode best with
    the teacher's schedule by default and still want Fast-dVLA's rule tuned for it. Checked here,
    when the policy is built, so a bad entry fails at load time, naming itself."""
    tunable = [name for name, _, _ in TUNABLE_SETTINGS]
    if not isinstance(method_settings, dict):
        raise ConfigError(f"expected a mapping {{decoder: settings}}, got {method_settings!r}", "method_settings")
    checked = {}
    for method, settings in method_settings.items():
        if method not in METHODS:
            raise ConfigError(f"unknown decoder {method!r}{_nearest([method], METHODS)}; expected some of {METHODS}",
                              "method_settings")
        where = f"method_settings[{method!r}]"
        if method == default.method:
            raise ConfigError(f"{method!r} is the default decoder; its settings are the policy's decode settings",
                              where)
        if not isinstance(settings, dict):
            raise ConfigError(f"expected a mapping of settings, got {settings!r}", where)
        unknown = sorted(set(settings) - set(tunable))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}{_nearest(unknown, tunable)}; expected some of "
                              f"{sorted(tunable)}", where)
        try:
            default.replace(method=method, **settings)
        except ConfigError as e:
            raise ConfigError(str(e), where) from None
        checked[method] = dict(settings)
    return checked


def _nearest(names, known) -> str:
    """`` (did you mean 'x'?)`` for the first of ``names`` close to one of ``known``."""
    for name in names:
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""
