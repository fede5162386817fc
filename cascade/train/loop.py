"""One training loop for every stage: AdamW with warm-up, gradient clipping, EMA, a progress bar, and checkpoints
that resume exactly (the same weights as an uninterrupted run, on the same machine).

A checkpoint is a folder: `{name}.step{n}.safetensors` and `{name}.ema.step{n}.safetensors` per trained module
(safetensors only, as every weight this project reads), and `state.pt` for the step n, the optimizer, the data
generator, the loss-weight buckets, the loss history and what the run was made from (loaded with
`weights_only=True`: tensors and plain containers, no code). A new checkpoint writes its weights under new names and
then replaces `state.pt` in one rename, so an interruption at any moment leaves a whole checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..weights import save_safetensors
from .objective import EMA, AdaptiveLossWeight

LOG_EVERY = 100  # steps between the plain progress lines printed when there is no progress bar


@dataclass
class RunConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0  # the reference clips at 1.0
    ema_beta: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; use 1 or more")
        for name in ("warmup", "weight_decay"):  # (written so that NaN fails too)
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; use 0 or more")
        for name in ("lr", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; use a finite number above 0")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta: {self.ema_beta} is not allowed; use a number from 0 up to (not including) 1")


@dataclass
class Trained:
    modules: dict[str, nn.Module]
    ema: dict[str, nn.Module]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _weights(checkpoint: Path, name: str, step: int) -> Path:
    """A module's weights at `step` (`name.ema` for its average): numbered, so that writing the next checkpoint never
    touches the files the current state.pt names. (Checkpoints before 2026-11-29 have unnumbered files.)"""
    numbered = checkpoint / f"{name}.step{step}.safetensors"
    return numbered if numbered.is_file() else checkpoint / f"{name}.safetensors"


def _save(checkpoint: Path, modules, emas, optimizer, step, generator, loss_weight, losses, seconds, run) -> None:
    checkpoint.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        for suffix, weights in (("", module.state_dict()), (".ema", emas[name].model.state_dict())):
            tensors = {k: v.detach().contiguous() for k, v in weights.items()}
            save_safetensors(tensors, checkpoint / f"{name}{suffix}.step{step}.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "loss_weight": loss_weight.state_dict() if loss_weight is not None else {},
        "ema_steps": {name: ema.steps for name, ema in emas.items()},
        "losses": losses,
        "seconds": seconds,
        "run": asdict(run),
    }
    tmp = checkpoint / "state.pt.tmp"
    torch.save(state, tmp)
    # The state names a complete set of weights (written above, under new names), or the previous one stays whole.
    os.replace(tmp, checkpoint / "state.pt")
    for old in checkpoint.glob("*.safetensors"):  # the sets before this one
        if not old.name.endswith(f".step{step}.safetensors"):
            old.unlink(missing_ok=True)


def _resumable(state: dict, run: RunConfig) -> str | None:
    """Why a checkpoint cannot continue this run (None when it can): made with other settings (all but the step
    count, which a run may raise), or already past this run's last step. (What the data and inputs were is the
    caller's to check: `cascade.train.demo` keeps it beside the checkpoint.)"""
    saved = {k: v for k, v in state["run"].items() if k not in ("steps", "checkpoint_every")}
    if saved != {k: v for k, v in asdict(run).items() if k not in ("steps", "checkpoint_every")}:
        return "it was made with other settings"
    if state["step"] > run.steps:
        return f"it is at step {state['step']}, past this run's {run.steps}"
    return None


def fit(
    modules: dict[str, nn.Module],
    step_fn: Callable[[torch.Generator, AdaptiveLossWeight | None], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    run: RunConfig,
    checkpoint: Path | None = None,
    loss_weight: AdaptiveLossWeight | None = None,
    description: str = "training",
    progress: bool = True,
) -> Trained:
    """Train `modules` (all their parameters) by minimising `step_fn(generator, loss_weight)`, which returns the loss
    to minimise, or (that loss, the loss to report): a diffusion stage minimises the adaptive-weighted loss, whose
    value tends to 1 by design, and reports the plain MSE of its epsilon prediction. Resume from
    `checkpoint` when it holds a state. The generator drives all of the step's randomness (data, noise, dropout
    choices), so a resumed run draws what an uninterrupted one would. A checkpoint made with other settings, or past
    this run's steps, is not resumed from: the run starts over, saying so."""
    torch.manual_seed(run.seed)
    generator = torch.Generator().manual_seed(run.seed)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        if step < run.warmup:
            return run.lr * (step + 1) / run.warmup
        progress_ = (step - run.warmup) / max(1, run.steps - run.warmup)
        return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    emas = {name: EMA(m, run.ema_beta) for name, m in modules.items()}
    step, losses, seconds = 0, [], 0.0
    state = None
    if checkpoint is not None and (checkpoint / "state.pt").is_file():
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        why = _resumable(state, run)
        if why is not None:
            print(f"{description}: not resuming from {checkpoint}: {why}; starting over", file=sys.stderr, flush=True)
            state = None
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(load_file(_weights(checkpoint, name, state["step"])))
            emas[name].model.load_state_dict(load_file(_weights(checkpoint, f"{name}.ema", state["step"])))
            emas[name].steps = state["ema_steps"][name]
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if loss_weight is not None and state["loss_weight"]:
            loss_weight.load_state_dict(state["loss_weight"])
        step, losses, seconds = state["step"], list(state["losses"]), state["seconds"]

    bar = None
    if progress and step < run.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.steps, initial=step, desc=description, unit="step", dynamic_ncols=True)
    for m in modules.values():
        m.train()
    started = time.perf_counter()
    while step < run.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = step_fn(generator, loss_weight)
        loss, shown = loss if isinstance(loss, tuple) else (loss, loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.grad_clip)
        optimizer.step()
        for name, module in modules.items():
            emas[name].update(module)
        losses.append(float(shown.detach()))
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        elif step % LOG_EVERY == 0 or step == run.steps:  # no bar (logs, CI): a plain line now and then
            elapsed = seconds + time.perf_counter() - started
            mean = sum(losses[-50:]) / len(losses[-50:])
            print(f"{description}: step {step}/{run.steps}, loss {mean:.4f}, {elapsed:.0f} s", flush=True)
        if checkpoint is not None and (step % run.checkpoint_every == 0 or step == run.steps):
            elapsed = seconds + time.perf_counter() - started
            _save(checkpoint, modules, emas, optimizer, step, generator, loss_weight, losses, elapsed, run)
    if bar is not None:
        bar.close()
    for m in modules.values():
        m.eval()
    seconds += time.perf_counter() - started
    return Trained(modules, {name: ema.model for name, ema in emas.items()}, losses, seconds, step)
