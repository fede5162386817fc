"""Bytes moved by the memory-bound operations of one guided Stage C and Stage B pass, eager mode, counted without a GPU.

`python scripts/memory_traffic.py [--family big] [--size 1024] [--batch 4]`

A guided pass (conditional and unconditional in one batch of 2 x batch) runs on the `meta` device (shapes only,
no memory, nothing computed) under a dispatch mode that sees every ATen operation. Matrix products, dense
convolutions and attention are the compute-bound work (cascade/flops.py counts their FLOPs); every other operation
is memory-bound in eager mode, and this adds up the bytes of its inputs and outputs (views, and casts to the same
dtype, are free). Over the device's memory bandwidth that is the least time those operations take unfused
(an H200 moves about 4.8 TB/s), which a profile's "elementwise" time can be held against. It prints the total and
the heaviest operations, once with GRN's norm as one reduction (a GPU's default, cascade.blocks.hw_l2_norm) and
once as the float32 sum of squares (a CPU's, and a GPU's before 2026-11-28).
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cascade.blocks import GlobalResponseNorm
from cascade.geometry import OFFICIAL
from cascade.request import latent_sizes
from cascade.stage_b import STAGE_B_3B, STAGE_B_700M, STAGE_B_TINY, StageB
from cascade.stage_c import STAGE_C_1B, STAGE_C_3B, STAGE_C_TINY, StageC
from cascade.text import MAX_LENGTH
from jobs.argtypes import official_size, positive, rate

FAMILIES = {"big": (STAGE_C_3B, STAGE_B_3B), "lite": (STAGE_C_1B, STAGE_B_700M), "tiny": (STAGE_C_TINY, STAGE_B_TINY)}
COMPUTE = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "scaled_dot_product_attention", "_scaled_mm"}
# Operations that move no data: views, allocation, and dropout at inference (the identity).
FREE = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "t", "permute", "transpose", "expand", "unsqueeze",
        "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "detach", "alias", "as_strided",
        "contiguous", "empty", "empty_like", "zeros", "dropout", "lift_fresh"}  # fmt: skip


class Traffic(TorchDispatchMode):
    """Bytes in and out of each memory-bound operation, by operation name."""

    def __init__(self):
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.operations = 0  # every operation that is not a view: in eager mode, about one kernel each

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in FREE or (func.is_view and name != "to"):  # (`to` may alias; a new dtype is a copy)
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "to" and ins[0].dtype == outs[0].dtype:
            return out
        self.operations += 1
        if name in COMPUTE or (name in ("conv2d", "convolution") and args[1].shape[1] != 1):
            return out  # compute-bound (a depthwise convolution, one input channel per filter, is not)
        self.bytes[name] += sum(t.numel() * t.element_size() for t in ins + outs)
        return out


def guided_inputs(stage, batch: int, size: int, dtype: torch.dtype):
    """(x, r, the raw conditions) of one guided pass."""
    n, cfg = 2 * batch, stage.config
    z = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    shape_c, shape_b = latent_sizes(size, size, OFFICIAL)  # (every built-in family has the official geometry)
    if isinstance(stage, StageC):
        conditions = {
            "clip_text": z(n, MAX_LENGTH, cfg.c_clip_text),
            "clip_text_pooled": z(n, 1, cfg.c_clip_text_pooled),
            "clip_img": z(n, 1, cfg.c_clip_img),
        }
        return z(n, *shape_c), z(n), conditions
    return z(n, *shape_b), z(n), {"effnet": z(n, *shape_c), "clip": z(n, 1, cfg.c_clip)}


NORMS = {"one reduction": True, "sum of squares": False}  # GRN's norm: GlobalResponseNorm.fused


def count(stage, batch: int, size: int, dtype: torch.dtype, fused_norm: bool, raw: bool = False) -> Traffic:
    """The bytes by operation and the operations of one guided pass of `stage` (built on the meta device), GRN's norm
    as `fused_norm`, as a sampling run makes it: the conditions precomputed (once per run, not counted), or with
    `raw`, computed in the pass (as before 2026-11-29)."""
    x, r, conditions = guided_inputs(stage, batch, size, dtype)
    GlobalResponseNorm.fused = fused_norm
    try:
        with torch.inference_mode():
            prepared = conditions if raw else stage.precompute(x, **conditions)
            with Traffic() as traffic:
                stage(x, r, **prepared)
    finally:
        GlobalResponseNorm.fused = None
    return traffic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="big")
    p.add_argument("--size", type=official_size, default=1024)
    p.add_argument("--batch", type=positive, default=4, help="images per pass (the pass runs 2 x batch: guidance)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--bandwidth", type=rate, default=4.8, help="memory bandwidth in TB/s for the time (H200: 4.8)")
    p.add_argument("--top", type=positive, default=6)
    p.add_argument("--raw", action="store_true", help="the conditions computed in the pass (before 2026-11-29)")
    p.add_argument("--fp8", action="store_true", help="with float8 linear layers (cascade.float8): their scaling")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    with torch.device("meta"):
        stages = {"Stage C": StageC(FAMILIES[args.family][0]).to(dtype).eval(),
                  "Stage B": StageB(FAMILIES[args.family][1]).to(dtype).eval()}  # fmt: skip
        if args.fp8:
            from cascade.float8 import float8_linears

            for stage in stages.values():
                float8_linears(stage, check_device=False)
        for name, stage in stages.items():
            for norm, fused in NORMS.items():
                traffic = count(stage, args.batch, args.size, dtype, fused, raw=args.raw)
                moved = traffic.bytes
                total = sum(moved.values())
                heaviest = ", ".join(f"{op} {b / 1e9:.1f}" for op, b in moved.most_common(args.top))
                what = f"{name}, {args.family}, {args.size} px, batch {args.batch} guided, {args.dtype}"
                what += " + float8 layers" if args.fp8 else ""
                print(f"{what}, GRN norm as {norm}: {total / 1e9:.1f} GB ({total / args.bandwidth / 1e9:.1f} ms "
                      f"at {args.bandwidth:g} TB/s), {traffic.operations} operations; "
                      f"GB by operation: {heaviest}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
