"""The per-task training loop: plain PyTorch, one function, read it top to bottom.

It runs unchanged in a single process (tests) and inside each Ray Train worker: DDP when the
process group is up, or a DeepSpeed ZeRO engine when the config asks for one (train/engine.py).
Ray-specific reporting is passed in as a callback.
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
from strata.hooks import Strategy, TaskContext
from strata.train.checkpoint import ADAPTER, RESUME, STATE, load_resume, save_resume
from strata.train.engine import make_engine

MAX_VAL_ROWS = 256  # val rows an early-stop check reads: enough for a stable loss, cheap every 25 steps
Reporter = Callable[[dict, Path | None], None]  # (metrics, checkpoint dir or None; see train/checkpoint.py)


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


def answer_tokens(batch: dict, distributed: bool) -> torch.Tensor:
    """Answer tokens in the global batch (summed over ranks), so every rank divides by the same count."""
    count = (batch["labels"][:, 1:] != -100).sum()
    if distributed:
        dist.all_reduce(count)
    return count


class EarlyStop:
    """Stop once `patience` val checks in a row gain less than 1% and less than MIN_GAIN nats, or at
    once when the val loss is under LEARNED.

    The absolute floor matters near zero: a val loss going 0.05 → 0.045 still gains 10%, but the
    answers it scores were already right. Under LEARNED nats per answer token the right answer
    already has about 99% of the probability on val, so more steps only sharpen it.
    """

    MIN_GAIN = 0.01  # nats per answer token
    LEARNED = 0.01

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.stale = patience, math.inf, 0

    def should_stop(self, loss: float) -> bool:
        if loss < self.LEARNED:
            return True
        if math.isinf(self.best) or self.best - loss > max(0.01 * self.best, self.MIN_GAIN):
            self.best, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@torch.no_grad()
def val_loss(engine, model: torch.nn.Module, val, pad_id: int, device: torch.device, batch_size: int = 64) -> float:
    """Mean cross-entropy per answer token on the val rows (every rank computes the same number)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), batch_size):
        idx = list(range(start, min(start + batch_size, len(val))))
        batch = {k: v.to(device) for k, v in collate(val.select(idx), pad_id).items()}
        n = answer_tokens(batch, distributed=False)
        with engine.autocast():
            total += engine.forward(batch, num_items_in_batch=n).loss.float().item() * n.item()
        count += n.item()
    model.train()
    return total / max(count, 1)


def train_task(
    backbone: torch.nn.Module,
    processor,
    strategy: Strategy,
    ctx: TaskContext,
    rows: pa.Table,
    cfg: TrainConfig,
    report: Reporter,
    log_every: int = 10,
    resume: Path | None = None,
    device: torch.device | None = None,
    task_rows: pa.Table | None = None,
    val_rows: pa.Table | None = None,
) -> dict:
    """Train the strategy's adapter for one task and report the saved adapter; returns metrics.

    Every step reports its metrics; every `cfg.checkpoint_every` steps the report carries a
    resumable checkpoint, and `resume` (a checkpoint's directory) continues from one. `task_rows`
    are the task's own train rows for `finish_task` (default: `rows`). With `val_rows` (the task's
    own) and `cfg.val_every`, training stops early once the val loss stops improving
    (`cfg.patience` checks); `cfg.steps` is then a cap.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed + ctx.index)
    if cfg.gradient_checkpointing:  # the frozen backbone recomputes activations in backward
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    model = strategy.before_task(backbone, processor, ctx)
    if any(p.device != device for p in model.parameters()):
        model.to(device)
    params = trainable_parameters(model)
    if not params:
        raise RuntimeError(f"strategy {strategy.name!r} left no trainable parameters for {ctx.name!r}")
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    enc = encode_table(processor, rows, with_answers=True)
    pad_id = processor.tokenizer.pad_token_id
    per_rank = cfg.batch_size // world
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    first, loss_ema = 1, float("nan")
    if resume is not None:
        done, loss_ema = load_resume(resume / RESUME, model, opt, strategy)
        for _ in range(done):
            sched.step()
        first = done + 1
        if rank == 0:
            print(f"[{strategy.name}] {ctx.name}: resumed from the checkpoint at step {done}", flush=True)
    engine = make_engine(model, params, opt, sched, cfg, device, distributed, per_rank)
    check_val = cfg.val_every > 0 and val_rows is not None and len(val_rows) > 0
    val = encode_table(processor, val_rows.slice(0, MAX_VAL_ROWS), with_answers=True) if check_val else None
    stopper, last_val = EarlyStop(cfg.patience), None  # None: not checked (JSON has no NaN)
    curve: list[list] = []  # a resumed task's curve starts at its checkpoint

    model.train()
    started = time.time()
    batches = step_indices(len(enc), cfg, ctx.index)
    step = first - 1
    for step in range(first, cfg.steps + 1):
        shard = batches[step - 1][rank * per_rank : (rank + 1) * per_rank]
        batch = {k: v.to(device) for k, v in collate(enc.select(shard), pad_id).items()}
        with engine.autocast():
            # Summed CE over answer tokens / the global count; DDP and ZeRO average over ranks, hence × world.
            outputs = engine.forward(batch, output_hidden_states=strategy.needs_hidden_states,
                                     num_items_in_batch=answer_tokens(batch, distributed))
            loss = outputs.loss.float() * world
            extra = strategy.loss(model, batch, outputs, step)
        if extra is not None:
            loss = loss + extra
        engine.backward(loss)
        grads = engine.grads()
        strategy.after_backward(model, grads, step)
        if cfg.max_grad_norm > 0:  # after ĝ, over this rank's (all-reduced) gradients
            grads.clip(cfg.max_grad_norm)
        engine.step()
        engine.zero_grad()

        value = outputs.loss.item() * world  # this rank's task CE (strategy terms not included)
        loss_ema = value if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * value
        stop = step == cfg.steps
        checked = val is not None and step % cfg.val_every == 0 and not stop
        if checked:
            last_val = val_loss(engine, model, val, pad_id, device)
            stop = stopper.should_stop(last_val)
        curve.append([step, loss_ema, last_val if checked else None])
        if rank == 0 and (step % log_every == 0 or stop):
            ended = f", stopped early (val loss {last_val:.4f})" if stop and step < cfg.steps else ""
            print(f"[{strategy.name}] {ctx.name} step {step}/{cfg.steps} loss {loss_ema:.4f}{ended}", flush=True)
        if stop:
            break
        metrics = {"task": ctx.name, "step": step, "loss": loss_ema, "lr": engine.lr(), "val_loss": last_val,
                   **strategy.metrics()}
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and engine.resumable:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_resume(Path(tmp) / RESUME, model, opt, strategy, step, loss_ema)
                report(metrics, Path(tmp) if rank == 0 else None)
        elif step % cfg.report_every == 0:
            report(metrics, None)

    model.eval()
    final = {
        "task": ctx.name,
        "step": step,
        "stopped_early": step < cfg.steps,
        "val_loss": last_val,
        "loss": loss_ema,
        "train_seconds": time.time() - started,
        "trainable_params": n_trainable,
        "trainable_pct": 100.0 * n_trainable / n_total,
        "resumed_from": first - 1,
        "curve": curve,  # [step, loss, val loss or None] per step: the driver writes it as TensorBoard scalars
        **strategy.metrics(),
    }
    with tempfile.TemporaryDirectory() as tmp, engine.whole():
        # Every rank runs finish_task (under ZeRO-3 a forward needs them all); rank 0's files are kept.
        strategy.finish_task(model, processor, ctx, rows if task_rows is None else task_rows, Path(tmp) / STATE)
        if rank == 0:
            strategy.save(model, ctx, Path(tmp) / ADAPTER)
        report(final, Path(tmp) if rank == 0 else None)
    return final
