"""Resumable training checkpoints: the adapter and strategy state only, never the backbone.

A checkpoint directory holds `adapter/` and `state/` (the strategy's saved adapter and the files
its `finish_task` wrote, on the final report) and `resume/`: the trainable tensors by name, the optimizer's moments, the strategy's per-task worker
state (DGG's Bernoulli stream, CMA's expert counts) and the step. Tensors are safetensors; the rest
is JSON, so resuming never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from strata.hooks import Strategy

ADAPTER = "adapter"
STATE = "state"
RESUME = "resume"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name (adapters of any kind, never frozen backbone weights)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_resume(dest: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, strategy: Strategy,
                step: int, loss_ema: float) -> None:
    """Write everything needed to continue this task from `step` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(dest / "trainable.safetensors"))
    opt_state = opt.state_dict()
    moments = {f"{i}.{k}": v.detach().contiguous() for i, s in opt_state["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor)}
    save_file(moments, str(dest / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in strategy.train_state().items()}, str(dest / "strategy.safetensors"))
    (dest / "progress.json").write_text(json.dumps({"step": step, "loss_ema": loss_ema}))


def load_resume(src: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, strategy: Strategy) -> tuple[int, float]:
    """Restore a `save_resume` directory into a freshly built model/optimizer; returns (step, loss_ema)."""
    saved = load_file(str(src / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(saved) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise RuntimeError(f"checkpoint {src} does not match the model's trainable parameters: {missing[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    moments = load_file(str(src / "optimizer.safetensors"))
    state = opt.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    state["state"] = per_param
    opt.load_state_dict(state)
    strategy.load_train_state(load_file(str(src / "strategy.safetensors")))
    progress = json.loads((src / "progress.json").read_text())
    return int(progress["step"]), float(progress["loss_ema"])
