"""DeepSpeed ZeRO inside a Train worker: the engine, and where each rank's gradient fragments live.

Stages 1 and 2 partition the optimizer state and the averaged gradients; stage 3 also partitions
the parameters. DeepSpeed's own clipping is off (`gradient_clipping` 0; its default is 1.0), so the
loop clips after DGG has added ĝ. The fragment accessors are the ones DeepSpeed 0.19 exposes:
`_hp_mapping` for stages 1-2 (the public `safe_*_local_*` helpers are stage-3 only) and the
`safe_*_local_*` helpers for stage 3. DeepSpeed is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from strata.config import TrainConfig
from strata.grads import Fragment


def initialize(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, cfg: TrainConfig, per_rank: int):
    """Wrap model, client optimizer and scheduler in a DeepSpeed engine for cfg.zero_stage."""
    import deepspeed

    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        # Offload with the client AdamW instead of DeepSpeedCPUAdam (which JIT-compiles a C++ op).
        "zero_force_ds_cpu_optimizer": False,
    }
    if cfg.bf16:
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config,
                                           dist_init_required=False)
    return engine


def fragments(params: list[torch.nn.Parameter]) -> list[Fragment | None]:
    """This rank's piece of every trainable gradient and θ (fp32 master), between backward and step."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

    out: list[Fragment | None] = []
    for p in params:
        if hasattr(p, "ds_id"):  # stage 3: equal partitions, the tail of the last one is padding
            group = getattr(p, "ds_process_group", None)
            size = p.partition_numel()
            start = dist.get_rank(group=group) * size
            n = max(0, min(size, p.ds_numel - start))

            def write(new: torch.Tensor, p=p, size=size, n=n) -> None:
                buf = torch.zeros(size, dtype=torch.float32)
                buf[:n] = new
                safe_set_local_grad(p, buf)

            out.append(Fragment(safe_get_local_grad(p)[:n].float(), safe_get_local_fp32_param(p)[:n], start, n, write))
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no element of p lives on this rank
            out.append(None)
            continue
        address = mapping.lp_fragment_address
        grad = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
        if grad.numel() == p.numel() and address.numel != p.numel():  # BF16_Optimizer keeps the full grad
            grad = grad.narrow(0, address.start, address.numel)
        out.append(Fragment(grad, mapping.get_hp_fragment().view(-1), address.start, address.numel,
                            lambda new, grad=grad: grad.copy_(new)))
    return out


def gathered(params: list[torch.nn.Parameter], stage: int | None):
    """A context in which stage-3 parameters are whole on every rank (for saving); else nothing."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
