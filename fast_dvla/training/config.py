"""Training settings, read from YAML, validated."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import yaml

STAGES = ("teacher", "distill")
STUDENTS = ("lora", "full")
LOSSES = ("asymmetric", "block_diffusion")
INITS = ("teacher", "scratch")


@dataclass
class TrainConfig:
    stage: str = "teacher"
    data: str | list = ""           # episodes directory, or a list of them
    out: str = ""                   # run directory: checkpoint, logs, exported policy
    model: dict = field(default_factory=dict)   # ModelConfig overrides (teacher stage)
    teacher: str = ""               # teacher policy directory (distill stage)
    student: str = "lora"           # lora | full
    loss: str = "asymmetric"        # asymmetric | block_diffusion
    init: str = "teacher"           # student initialisation: teacher | scratch
    lora_rank: int = 32
    # distill stage: share of samples whose trailing blocks are all [MASK] (noise.mask_tails; 0 = D2F's scheme)
    masked_tail_prob: float = 0.0
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
    gripper_dims: list = field(default_factory=lambda: [6])
    # state entries the policy never reads (teacher stage; a student keeps its teacher's)
    state_ignore: list = field(default_factory=list)
    init_from: str = ""             # teacher stage: start from this policy's weights (fine-tuning)
    max_episodes: int | None = None
    log_every: int = 10
    save_every: int = 200
    threads: int | None = None      # torch threads per process

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"training config: {msg}")
        if self.stage not in STAGES:
            bad(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not self.data:
            bad("'data' (an episodes directory) is required")
        if not self.out:
            bad("'out' (a run directory) is required")
        if self.stage == "distill":
            if self.student not in STUDENTS:
                bad(f"student must be one of {STUDENTS}, got {self.student!r}")
            if self.loss not in LOSSES:
                bad(f"loss must be one of {LOSSES}, got {self.loss!r}")
            if self.init not in INITS:
                bad(f"init must be one of {INITS}, got {self.init!r}")
            if not self.teacher:
                bad("distillation needs 'teacher' (a teacher policy directory)")
            if self.init == "scratch" and self.student == "lora":
                bad("a LoRA student starts from the teacher's weights; use student: full with init: scratch")
        if not 0.0 <= self.masked_tail_prob <= 1.0:
            bad(f"masked_tail_prob must be in [0, 1], got {self.masked_tail_prob!r}")
        if self.masked_tail_prob and self.stage != "distill":
            bad("masked_tail_prob applies to the distill stage (the teacher's noise covers every ratio)")
        if self.student_block_size is not None:
            if not isinstance(self.student_block_size, int) or self.student_block_size < 1:
                bad(f"student_block_size must be a positive integer, got {self.student_block_size!r}")
            if self.stage != "distill":
                bad("student_block_size applies to the distill stage (a teacher attends bidirectionally)")
        if not all(isinstance(i, int) and i >= 0 for i in self.state_ignore):
            bad(f"state_ignore must be a list of state indices, got {self.state_ignore!r}")
        if self.init_from and self.stage != "teacher":
            bad("init_from applies to the teacher stage (a student starts from its 'teacher')")
        for name in ("steps", "batch_size", "log_every", "save_every", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0):
            bad(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "constant"):
            bad(f"schedule must be cosine or constant, got {self.schedule!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"training config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str, overrides: list[str] = ()) -> "TrainConfig":
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            target = d
            *parents, leaf = key.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = yaml.safe_load(value)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return asdict(self)
