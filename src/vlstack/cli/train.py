"""`vlstack train`: train the LoRA adapters of a jobs file, fused over one base."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the LoRA adapters of a jobs file, fused over one base")
    p.add_argument("jobs", help="YAML jobs file")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the jobs file's model)")
    p.add_argument("--sequential", action="store_true", help="train the jobs one by one (the baseline)")
    p.add_argument("--resume", action="store_true", help="continue each job from its last checkpoint")
    p.add_argument("--watch", action="store_true", help="jobs added to the file while training runs join the run")
    options.device(p, dtype_help="the frozen base's (default: float32 on a CPU, the checkpoint's on a GPU)")
    options.v2pe(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..api import load
    from ..train.jobs import PlanWatcher, read_plan
    from ..train.multi import train

    plan = read_plan(args.jobs)
    if args.watch and args.sequential:
        raise ConfigError("--watch adds jobs to a fused run; it does not go with --sequential")
    device, processes = args.device, int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # launched by torchrun: one process per device
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if plan.sharding and args.sequential:
        raise ConfigError("sharding: fsdp trains the jobs together; it does not go with --sequential")
    if plan.sharding and processes < 2:
        raise ConfigError(
            "sharding: fsdp splits the base over processes: run `torchrun --nproc-per-node N -m vlstack.cli train ...`"
        )
    where = "cpu" if plan.sharding else device  # (split on the host, each part then moved to its device)
    vlm = load(args.model or plan.model, device=where, dtype=args.dtype, v2pe_delta=args.v2pe_delta)  # (adapters:
    # float32 whatever the base is)
    options = {
        "parallel": plan.parallel,
        "sharding": plan.sharding,
        "device": device,
        "resume": args.resume,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "max_tokens": plan.max_tokens,
        "log_every": plan.log_every,
    }
    done = {}
    if args.sequential:  # the baseline: the same jobs one after another
        for job in plan.jobs:
            done.update(train(vlm, [job], plan.max_rows, **options))
    else:
        more = PlanWatcher(args.jobs, plan) if args.watch else None
        done = train(vlm, plan.jobs, plan.max_rows, more=more, **options)
    for r in done.values():
        print(f"{r.job.name}: {'model' if r.job.full else 'adapter'} written to {r.job.output}")
    if processes > 1:  # (every process done with the others: a clean exit)
        dist.barrier()
        dist.destroy_process_group()
