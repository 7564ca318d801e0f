"""Training settings, read from YAML, validated."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import yaml

from ..model import ModelConfig
from ..schema import ConfigError, check_at_least, check_choice, check_fields, from_mapping, shown

STAGES = ("teacher", "distill")
STUDENTS = ("lora", "full")
LOSSES = ("asymmetric", "block_diffusion")
INITS = ("teacher", "scratch")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    stage: str = "teacher"
    data: str | list[str] = ""      # episodes directory, or a list of them
    out: str = ""                   # run directory: checkpoint, logs, exported policy
    model: dict = field(default_factory=dict)   # ModelConfig overrides (teacher stage)
    teacher: str = ""               # teacher policy directory (distill stage)
    student: str = "lora"           # lora | full
    loss: str = "asymmetric"        # asymmetric | block_diffusion
    init: str = "teacher"           # student initialisation: teacher | scratch
    lora_rank: int = 32
    # distill stage: share of samples whose trailing blocks are all [MASK] (noise.mask_tails; 0 = D2F's scheme)
    masked_tail_prob: float = 0.0
    # distill stage: mask ratios p -> 1 - (1 - p)^(1 + bias), toward all-[MASK] blocks (noise.bias_to_high_noise;
    # 0 = D2F's ratios), for a student meant to decode in few forwards
    high_noise_bias: float = 0.0
    # distill stage: tokens per block of the student (default: the teacher's, the action dim); a
    # multiple of the action dim lets a block hold several timesteps decoded jointly (docs/design.md#sequence-layout-and-tokens)
    student_block_size: int | None = None
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: str = "cosine"        # cosine | constant
    grad_clip: float = 1.0
    seed: int = 0
    gripper_dims: list[int] = field(default_factory=lambda: [6])
    # state entries the policy never reads (teacher stage; a student keeps its teacher's)
    state_ignore: list[int] = field(default_factory=list)
    init_from: str = ""             # teacher stage: start from this policy's weights (fine-tuning)
    # parameters kept as they are (names or name prefixes, e.g. lm_head) when weights train in full
    # (teacher stage, student: full); a LoRA student trains only its adapter anyway
    freeze: list[str] = field(default_factory=list)
    max_episodes: int | None = None
    log_every: int = 10
    save_every: int = 200
    threads: int | None = None      # torch threads per process

    def __post_init__(self):
        """Every field checked by type and range; a bad one raises ``ConfigError`` (a ``ValueError``)
        naming it. A setting that only the other stage reads is refused rather than ignored."""
        check_fields(self)
        check_choice(self.stage, STAGES, "stage", "training stage")
        self._check_directories()
        if self.stage == "distill":
            self._check_distillation()
        self._check_stage_only_settings()
        self._check_model_overrides()
        self._check_optimisation()

    def _check_directories(self) -> None:
        if not self.data or (isinstance(self.data, list) and not all(self.data)):
            raise ConfigError("'data' (an episodes directory, or a list of them) is required", "data")
        if not self.out:
            raise ConfigError("'out' (a run directory) is required", "out")

    def _check_distillation(self) -> None:
        check_choice(self.student, STUDENTS, "student", "a distilled student")
        check_choice(self.loss, LOSSES, "loss", "distillation loss")
        check_choice(self.init, INITS, "init", "student initialisation")
        if not self.teacher:
            raise ConfigError("distillation needs 'teacher' (a teacher policy directory)", "teacher")
        if self.init == "scratch" and self.student == "lora":
            raise ConfigError("a LoRA student starts from the teacher's weights; use student: full with init: scratch",
                              "init")

    def _check_stage_only_settings(self) -> None:
        distill_only = {"masked_tail_prob": "the teacher's noise covers every ratio",
                        "high_noise_bias": "the teacher's noise covers every ratio",
                        "student_block_size": "a teacher attends bidirectionally"}
        teacher_only = {"init_from": "a student starts from its 'teacher'",
                        "model": "a student takes its teacher's model",
                        "state_ignore": "a student keeps its teacher's"}
        for stage, settings in (("distill", distill_only), ("teacher", teacher_only)):
            for name, why in settings.items():
                if self.stage != stage and getattr(self, name):  # set: not None, 0, "" or empty
                    raise ConfigError(f"applies to the {stage} stage ({why})", name)
        if self.model and self.init_from:
            raise ConfigError("overrides cannot apply when init_from gives the model", "model")
        if self.freeze and self.stage == "distill" and self.student == "lora":
            raise ConfigError("a LoRA student trains only its adapter; freeze applies to weights trained in full "
                              "(the teacher stage, student: full)", "freeze")
        if any(not name for name in self.freeze):
            raise ConfigError("expected parameter names or name prefixes, got an empty one", "freeze")

    def _check_model_overrides(self) -> None:
        try:
            ModelConfig.from_dict(self.model)
        except ConfigError as e:
            raise e.within(parent="model") from None

    def _check_optimisation(self) -> None:
        check_at_least(self, ("steps", "batch_size", "log_every", "save_every", "lora_rank", "student_block_size",
                              "max_episodes", "threads"), 1)
        check_at_least(self, ("warmup_steps", "seed"), 0)
        if not 0.0 <= self.masked_tail_prob <= 1.0:
            raise ConfigError(f"expected a number in [0, 1], got {self.masked_tail_prob!r}", "masked_tail_prob")
        if isinstance(self.high_noise_bias, bool) or not (isinstance(self.high_noise_bias, (int, float)) and 0.0 <= self.high_noise_bias <= 50.0):
            raise ConfigError(f"expected a number in [0, 50] (0: off), got {self.high_noise_bias!r}", "high_noise_bias")
        if not self.lr > 0:
            raise ConfigError(f"expected a number > 0, got {self.lr!r}", "lr")
        for name in ("weight_decay", "grad_clip"):  # grad_clip 0: no clipping
            if getattr(self, name) < 0:
                raise ConfigError(f"expected a number >= 0, got {getattr(self, name)!r}", name)
        check_choice(self.schedule, SCHEDULES, "schedule", "learning-rate schedule")
        for name in ("gripper_dims", "state_ignore"):
            if any(i < 0 for i in getattr(self, name)):
                raise ConfigError(f"expected action or state indices >= 0, got {getattr(self, name)!r}", name)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Settings by field name; an unknown name is refused, naming the nearest field."""
        return from_mapping(cls, d)

    @classmethod
    def load(cls, path: str, overrides: list[str] = ()) -> "TrainConfig":
        """The YAML file at ``path`` with ``overrides`` (``key=value``, ``model.num_layers=2``) on top;
        an error names the file and the key."""
        d = read_yaml(path)
        try:
            for item in overrides:
                apply_override(d, item)
            return cls.from_dict(d)
        except ConfigError as e:
            raise e.within(path) from None

    def to_dict(self) -> dict:
        return asdict(self)


def read_yaml(path: str) -> dict:
    """The mapping in the YAML file at ``path`` (an empty file: no settings); a file that does not
    parse, or holds something else, is a ``ConfigError`` naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML ({e})", file=path) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"expected a mapping of settings, got {shown(d)}", file=path)
    return d


def apply_override(d: dict, item: str) -> None:
    """Sets ``key=value`` (``value`` read as YAML; ``a.b=value`` sets key ``b`` of mapping ``a``) in ``d``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    target = d
    *parents, leaf = key.split(".")
    for depth, parent in enumerate(parents):
        target = target.setdefault(parent, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {item!r} sets a key inside {shown(target)}, which is not a mapping",
                              ".".join(parents[: depth + 1]))
    target[leaf] = yaml.safe_load(value)
