"""One training loop for both stages: the teacher's masked diffusion and the
student's distillation (or the block-diffusion ablation).

Resumable: a checkpoint holds the weights, optimizer, scheduler, step and
every random state (data order, noise, torch/numpy/python), so an
interrupted run resumed from it ends with the same weights as one that never
stopped. Under torchrun the loss module runs in DistributedDataParallel and
each rank takes its slice of every global batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import random
import time
from dataclasses import MISSING, fields, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..backbone import DVLAModel
from ..config import DecodeConfig
from ..model import ModelConfig, ReferenceDVLA
from ..policy import FastDVLAPolicy
from ..policy_model import PolicyModel
from .config import TrainConfig
from .dataset import ChunkDataset, ObservationChunkDataset, batch_prefixes
from .distributed import DistInfo, barrier
from .lora import adapter_disabled, adapter_state_dict, add_lora, merged_model
from .losses import block_diffusion_loss, distillation_loss, teacher_entropy, teacher_logits_for, teacher_loss
from .noise import student_noise, teacher_noise

CHECKPOINT = "checkpoint.pt"


class StageLoss(nn.Module):
    """The loss of one stage as a module, so DDP can wrap it.

    Prefixes come from :func:`batch_prefixes`: one group for the reference model's batches; for a
    model that owns its processing, one group per prefix length (Dream-VLA's prompt length depends
    on the instruction). Each group's loss is taken over its rows alone and weighted by its share
    of the batch, so the total is the batch's loss, each row computed exactly as if alone."""

    def __init__(self, config: TrainConfig, model: DVLAModel, teacher: DVLAModel | None):
        super().__init__()
        self.config, self.model = config, model
        self.teacher = [teacher]  # a list: not a submodule, so DDP neither syncs nor trains it
        self.metrics: dict[str, float] = {}  # of the last forward, besides the loss (distillation: "kl")

    def forward(self, batch: dict, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        model, cfg = self.model, self.config
        tokens = batch["tokens"]
        groups = batch_prefixes(model, batch)
        t_logits = None
        if cfg.stage == "distill" and cfg.loss == "asymmetric":
            t_logits = self.teacher_logits(batch, tokens, mask)
        total = None
        for rows, prefix in groups:
            pick = (lambda t: t) if rows is None else (lambda t, r=torch.tensor(rows, device=tokens.device): t[r])
            args = (pick(tokens), pick(mask), pick(weight))
            if cfg.stage == "teacher":
                loss = teacher_loss(model, prefix, *args)[0]
            elif cfg.loss == "block_diffusion":
                loss = block_diffusion_loss(model, prefix, *args)[0]
            else:
                loss = distillation_loss(model, prefix, pick(t_logits), *args)[0]
            part = loss if rows is None else loss * (len(rows) / tokens.shape[0])
            total = part if total is None else total + part
        if t_logits is not None:  # logged beside the loss: the part of it the student can reduce
            self.metrics = {"kl": total.item() - teacher_entropy(t_logits, mask, weight).item()}
        return total

    def teacher_logits(self, batch: dict, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bidirectional teacher's logits ``[B, L, V]`` on the batch's noised chunk, without gradient:
        the LoRA student's own weights with the adapter off, or a frozen teacher model."""
        model, teacher = self.model, self.teacher[0]
        lora = teacher is model  # the LoRA student: the teacher is the same weights, adapter off
        with adapter_disabled(model) if lora else contextlib.nullcontext(), torch.no_grad():
            groups = batch_prefixes(teacher, batch)
            out = None
            for rows, t_prefix in groups:
                if rows is None:
                    return teacher_logits_for(teacher, t_prefix, tokens, mask)
                r = torch.tensor(rows, device=tokens.device)
                logits = teacher_logits_for(teacher, t_prefix, tokens[r], mask[r])
                if out is None:
                    out = logits.new_empty(tokens.shape[0], *logits.shape[1:])
                out[r] = logits
            return out


# settings a run may change when it is resumed (train longer, log differently, other cores, a moved directory)
RESUMABLE_CHANGES = ("out", "steps", "log_every", "save_every", "threads")


def set_block_size(model: DVLAModel, block_size: int) -> None:
    """Re-block ``model`` (weights do not depend on it); raises if it does not divide the chunk. A
    model whose config is a dataclass with ``block_size`` (the reference's) has it set there too."""
    if model.chunk_len % block_size:
        raise ValueError(f"block_size {block_size} does not divide the chunk of {model.chunk_len} tokens")
    if hasattr(model.config, "block_size") and not isinstance(model.config, dict):
        model.config = replace(model.config, block_size=block_size)
    model.block_size = block_size


def freeze_parameters(model: nn.Module, names: list[str]) -> None:
    """Stop training the parameters named, or under the module prefixes named, in ``names``
    (``lm_head``, ``visual.blocks.0``); a name that matches nothing is refused."""
    for name in names:
        hits = [p for n, p in model.named_parameters() if n == name or n.startswith(name + ".")]
        if not hits:
            raise ValueError(f"freeze: {name!r} names no parameter of {type(model).__name__}")
        for p in hits:
            p.requires_grad_(False)


def training_dataset(config: TrainConfig, model: DVLAModel, action_tokenizer=None, state_norm=None,
                     progress: bool = True):
    """The samples ``model`` trains on: the reference model's (its bins and state statistics fitted
    here unless given) or, for a model that owns its processing (a ``PolicyModel``), observations as
    its policy receives them with its own bins."""
    if isinstance(model, PolicyModel):
        if config.state_ignore:
            raise ValueError(f"state_ignore: {type(model).__name__} normalises its state itself (set it in the "
                             "model, not in the training config)")
        return ObservationChunkDataset(config.data, model, max_episodes=config.max_episodes, progress=progress)
    return ChunkDataset(config.data, model.config, action_tokenizer, state_norm, gripper_dims=config.gripper_dims,
                        max_episodes=config.max_episodes, progress=progress, state_ignore=config.state_ignore)


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Settings of ``current`` that differ from a checkpoint's ``saved`` config (a setting
    added since that checkpoint was written counts as its default there)."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(TrainConfig) if f.default is not MISSING or f.default_factory is not MISSING}
    saved = {**defaults, **saved}
    return sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))


def lr_lambda(config: TrainConfig):
    def f(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def numpy_rng_state() -> dict:
    """numpy's global random state as tensors and numbers, which the weights-only loader
    accepts (a numpy array it refuses)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state(("MT19937", state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["gauss"]))


def save_atomically(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: a run killed
    mid-write leaves the previous checkpoint whole (and a write that raises, Ctrl-C included,
    removes its temporary file)."""
    # beside it, so the rename stays on one filesystem (atomic); one fixed name, so a file a kill
    # left behind is overwritten by the next save rather than piling up
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unpickler_complaint(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what the file wanted to load."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")


def read_checkpoint(path: str) -> dict:
    """A training checkpoint, read with torch's weights-only loader: tensors and plain containers
    only, so a checkpoint from elsewhere cannot run code when it is loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load; a training checkpoint holds only tensors, numbers, strings "
                         f"and containers of them ({unpickler_complaint(e)})") from None
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable training checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{path}: not a training checkpoint; expected a mapping with a 'config' mapping")
    return state


class Trainer:
    def __init__(self, config: TrainConfig, dist: DistInfo | None = None, progress: bool = True,
                 dataset: ChunkDataset | ObservationChunkDataset | None = None):
        self.config, self.dist = config, dist or DistInfo()
        self.progress = progress and self.dist.is_main
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)  # model init is part of the seeded run
        self.teacher_policy = None
        if config.stage == "teacher":
            tokenizer = None
            if config.init_from:  # fine-tune: its architecture, weights and action bins; state statistics refit
                start = FastDVLAPolicy.from_pretrained(config.init_from)
                if config.model:
                    raise ValueError("training config: 'model' overrides cannot apply when init_from gives the model")
                self.model, tokenizer = start.model, start.action_tokenizer
            else:
                self.model = ReferenceDVLA(ModelConfig(**config.model))
            self.dataset = dataset or training_dataset(config, self.model, tokenizer, progress=self.progress)
            teacher = None
            freeze_parameters(self.model, config.freeze)
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            # a policy directory, or a checkpoint in a registered model's own format (Dream-VLA's)
            self.teacher_policy = FastDVLAPolicy.from_pretrained(config.teacher)
            tp = self.teacher_policy
            if config.student_block_size:
                # the teacher attends bidirectionally: its block size only shapes the student
                set_block_size(tp.model, config.student_block_size)
            if isinstance(tp.model, PolicyModel) and config.student == "full" and config.init == "scratch":
                raise ValueError(f"init: scratch builds a fresh reference model; a {type(tp.model).__name__} "
                                 "student starts from its teacher (init: teacher)")
            self.dataset = dataset or training_dataset(config, tp.model, tp.action_tokenizer, tp.state_norm,
                                                       progress=self.progress)
            if config.student == "lora":
                self.model = tp.model
                params = add_lora(self.model, config.lora_rank)
                teacher = self.model
            else:
                if config.init == "teacher":  # a trainable copy, with the teacher's frozen parameters still frozen
                    self.model = copy.deepcopy(tp.model).train()
                else:
                    self.model = ReferenceDVLA(copy.deepcopy(tp.model.config))
                teacher = tp.model.requires_grad_(False)
                freeze_parameters(self.model, config.freeze)
                params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.loss_module = StageLoss(config, self.model, teacher)
        if self.dist.world > 1:
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator().manual_seed(config.seed * 1000 + 1 + self.dist.rank)
        self.step = 0
        self.history: list[dict] = []
        self.pending_losses: list[float] = []  # since the last log entry: a resumed run averages the same ones
        self.pending_metrics: dict[str, list[float]] = {}  # the loss module's other numbers (distillation: kl)
        self.wall = 0.0
        if self.dist.world > 1 and config.batch_size % self.dist.world:
            raise ValueError(f"batch_size {config.batch_size} must divide by the {self.dist.world} ranks")

    # -- checkpoints ------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.out, CHECKPOINT)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "history": self.history,
                "pending_losses": self.pending_losses, "pending_metrics": self.pending_metrics,
                "wall": self.wall, "data_gen": self.data_gen.get_state(), "noise_gen": self.noise_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "numpy_rng": numpy_rng_state(),
                "python_rng": random.getstate(), "config": self.config.to_dict()}

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        os.makedirs(self.config.out, exist_ok=True)
        save_atomically(self.state(), self.checkpoint_path)
        self.write_logs()

    def resume(self) -> bool:
        """Load the run directory's checkpoint if there is one."""
        if not os.path.isfile(self.checkpoint_path):
            return False
        s = read_checkpoint(self.checkpoint_path)
        changed = changed_settings(s.get("config", {}), self.config.to_dict())
        if changed:  # resuming another run's weights under a new recipe would be silently wrong
            raise ValueError(f"{self.config.out} holds a run with other settings ({', '.join(changed)}); "
                             f"resume it with the same config or pick another 'out'")
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.step, self.history, self.wall = s["step"], s["history"], s["wall"]
        self.pending_losses = list(s.get("pending_losses", []))
        self.pending_metrics = {k: list(v) for k, v in s.get("pending_metrics", {}).items()}
        self.data_gen.set_state(s["data_gen"])
        self.noise_gen.set_state(s["noise_gen"])
        torch.set_rng_state(s["torch_rng"])
        set_numpy_rng_state(s["numpy_rng"])
        random.setstate(s["python_rng"])
        return True

    # -- the loop -----------------------------------------------------------------
    def train_step(self) -> float:
        cfg, model = self.config, self.model
        idx = torch.randint(len(self.dataset), (cfg.batch_size,), generator=self.data_gen)
        idx = idx[self.dist.rank::self.dist.world]  # every rank draws the same global batch, takes its slice
        batch = self.dataset.batch(idx)
        B, L = batch["tokens"].shape
        if cfg.stage == "teacher":
            mask, weight = teacher_noise(B, L, self.noise_gen)
        else:
            mask, weight = student_noise(B, model.num_blocks, model.block_size, self.noise_gen,
                                         masked_tail_prob=cfg.masked_tail_prob,
                                         high_noise_bias=cfg.high_noise_bias)
        loss = self.loss_module(batch, mask, weight)
        inner = self.loss_module.module if isinstance(self.loss_module, nn.parallel.DistributedDataParallel) \
            else self.loss_module
        for name, value in inner.metrics.items():
            self.pending_metrics.setdefault(name, []).append(value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def train(self, until: int | None = None, eval_fn=None, eval_every: int | None = None) -> list[dict]:
        """Train to ``until`` (default ``config.steps``) steps; ``eval_fn(model, step) -> dict`` is logged too."""
        cfg = self.config
        until = cfg.steps if until is None else until
        bar = tqdm(total=until, initial=self.step, desc=f"{cfg.stage}", disable=not self.progress)
        recent, t_last = self.pending_losses, time.perf_counter()
        while self.step < until:
            t0 = time.perf_counter()
            recent.append(self.train_step())
            self.wall += time.perf_counter() - t0
            if self.step % cfg.log_every == 0 or self.step == until:
                rate = len(recent) / (time.perf_counter() - t_last)
                entry = {"step": self.step, "loss": float(np.mean(recent)), "lr": self.scheduler.get_last_lr()[0],
                         "steps_per_s": rate, "wall_s": self.wall}
                entry.update({name: float(np.mean(values)) for name, values in self.pending_metrics.items() if values})
                self.pending_metrics.clear()
                if eval_fn is not None and eval_every and self.step % eval_every == 0:
                    self.model.eval()
                    entry.update(eval_fn(self.model, self.step))
                    self.model.train()
                self.history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", steps_per_s=f"{rate:.2f}")
                recent.clear()
                t_last = time.perf_counter()
            bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < until:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        barrier(self.dist)
        return self.history

    # -- outputs ------------------------------------------------------------------
    def write_logs(self) -> None:
        os.makedirs(self.config.out, exist_ok=True)
        with open(os.path.join(self.config.out, "log.json"), "w") as f:
            json.dump({"config": self.config.to_dict(), "history": self.history}, f, indent=2)
        if self.history:
            from .plots import plot_curves
            plot_curves({self.config.stage: self.history}, "loss", os.path.join(self.config.out, "loss.png"),
                        title=f"{self.config.stage} training loss")

    @property
    def is_lora(self) -> bool:
        return self.config.stage == "distill" and self.config.student == "lora"

    def policy(self) -> FastDVLAPolicy:
        """The model as it stands, as a policy (a copy; a LoRA adapter merged in)."""
        model = merged_model(self.model) if self.is_lora else copy.deepcopy(self.model)
        method = "vanilla" if self.config.stage == "teacher" else "fast_dvla"
        return FastDVLAPolicy(model.eval(), self.dataset.action_tokenizer, self.dataset.state_norm,
                              DecodeConfig(method=method))

    def export(self, path: str | None = None) -> str:
        """Write a FastDVLAPolicy directory (the LoRA adapter merged in; also saved on its own)."""
        path = path or os.path.join(self.config.out, "policy")
        if not self.dist.is_main:
            return path
        self.policy().save_pretrained(path)
        if self.is_lora:
            from safetensors.torch import save_file
            save_file(adapter_state_dict(self.model), os.path.join(path, "adapter.safetensors"))
        return path


def policy_from_run(run_dir: str) -> FastDVLAPolicy:
    """The policy of a training run's latest checkpoint (a run still in progress, say), built
    as the run itself would export it: same config, same data statistics."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CHECKPOINT} in {run_dir!r}: not a training run directory")
    config = TrainConfig.from_dict(read_checkpoint(path)["config"])
    trainer = Trainer(config, progress=False)
    trainer.resume()
    return trainer.policy()


def load_policy(path: str) -> FastDVLAPolicy:
    """A policy directory, or a training run directory (its latest checkpoint, exported in memory)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return FastDVLAPolicy.from_pretrained(path)
    return policy_from_run(path)
