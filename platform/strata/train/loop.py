"""The per-task training loop: plain PyTorch, one function, read it top to bottom.

It runs unchanged in a single process (tests) and inside each Ray Train worker (DDP over gloo
when the process group is up). Ray-specific reporting is passed in as a callback.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

from strata.adapters.lora import trainable_parameters
from strata.config import TrainConfig
from strata.data.collate import collate, encode_table
from strata.strategies.base import Strategy, TaskContext

Reporter = Callable[[dict, Path | None], None]  # (metrics, adapter checkpoint dir or None)


def step_indices(n_rows: int, cfg: TrainConfig, task_index: int) -> list[list[int]]:
    """Global batch indices for every step; seeded identically on every rank so shards agree."""
    rng = random.Random(f"{cfg.seed}:{task_index}")
    order: list[int] = []
    batches = []
    for _ in range(cfg.steps):
        while len(order) < cfg.batch_size:  # tasks smaller than a batch repeat rows
            epoch = list(range(n_rows))
            rng.shuffle(epoch)
            order += epoch
        batches.append(order[: cfg.batch_size])
        order = order[cfg.batch_size :]
    return batches


def train_task(
    backbone: torch.nn.Module,
    processor,
    strategy: Strategy,
    ctx: TaskContext,
    rows: pa.Table,
    cfg: TrainConfig,
    report: Reporter,
    log_every: int = 10,
) -> dict:
    """Train the strategy's adapter for one task and report the saved adapter; returns metrics."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(cfg.seed + ctx.index)

    model = strategy.before_task(backbone, processor, ctx)
    params = trainable_parameters(model)
    if not params:
        raise RuntimeError(f"strategy {strategy.name!r} left no trainable parameters for {ctx.name!r}")
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    enc = encode_table(processor, rows, with_answers=True)
    pad_id = processor.tokenizer.pad_token_id
    per_rank = cfg.batch_size // world
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )

    model.train()
    started = time.time()
    loss_ema = float("nan")
    for step, global_idx in enumerate(step_indices(len(enc), cfg, ctx.index), start=1):
        batch = collate(enc.select(global_idx[rank * per_rank : (rank + 1) * per_rank]), pad_id)
        # loss: mean CE over answer tokens only
        outputs = train_model(**batch, output_hidden_states=strategy.needs_hidden_states)
        loss = outputs.loss
        extra = strategy.loss(model, batch, outputs, step)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        strategy.after_backward(model, params, step)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
        if step % log_every == 0 or step == cfg.steps:
            metrics = {"task": ctx.name, "step": step, "loss": loss_ema, "lr": sched.get_last_lr()[0],
                       **strategy.metrics()}
            if rank == 0:
                print(f"[{strategy.name}] {ctx.name} step {step}/{cfg.steps} loss {loss_ema:.4f}", flush=True)
            if step < cfg.steps:
                report(metrics, None)

    model.eval()
    final = {
        "task": ctx.name,
        "step": cfg.steps,
        "loss": loss_ema,
        "train_seconds": time.time() - started,
        "trainable_params": n_trainable,
        "trainable_pct": 100.0 * n_trainable / n_total,
        **strategy.metrics(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            ckpt = strategy.save(model, ctx, Path(tmp) / "adapter")
        report(final, ckpt)
    return final
