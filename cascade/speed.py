"""Optional `torch.compile` of the generators' blocks ("regional" compilation).

Stage B and Stage C are long stacks of a few block kinds (ResBlock, TimestepBlock, AttnBlock) repeated at a few
widths. Compiling each block, rather than the whole U-Net, lets Dynamo reuse one compiled graph for every instance
of a block kind at one width and batch shape, so compilation takes seconds per distinct (kind, width, shape)
instead of minutes for one giant unrolled graph, and the fused kernels (the LayerNorm permutes, GRN's reductions,
GELU, the modulation and the residual adds, which are memory-bound in eager mode) are the same. The parameters and
their key names are untouched: loading and LoRA see the same modules.

Each batch size and latent size (bucket) is its own static shape; compiled code is cached per shape in the process,
so a pool actor compiles a bucket once, on its first batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import AttnBlock, ResBlock, TimestepBlock

# Distinct shapes one block's code may be compiled for (Dynamo's default, 8, would fall back to eager after a few
# widths x batch sizes x buckets).
RECOMPILE_LIMIT = 256


def allow_recompiles() -> None:
    """Raise Dynamo's recompile limits to RECOMPILE_LIMIT in the calling thread. In torch 2.13 (earlier releases
    not checked) a setting of `torch._dynamo.config` holds only in the thread that made it (a ContextVar), so every
    thread that runs compiled blocks must call this: Ray Data builds an actor on its main thread but calls it on a
    thread pool's, where the limit was Dynamo's 8 and the blocks of a ninth shape (another bucket, a last partial
    batch) ran eagerly."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; set whichever exists
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def compile_blocks(model: nn.Module, mode: str | None = None, options: dict | None = None) -> int:
    """Compile every ResBlock, TimestepBlock and AttnBlock of a Stage B or Stage C in place; returns how many.

    mode: torch.compile's mode (None: the default, which fuses kernels without CUDA graphs); options: Inductor's
    settings instead of a mode (torch.compile takes one or the other)."""
    allow_recompiles()  # here; and the threads that run the blocks, if others (workers.stages)
    count = 0
    for module in model.modules():
        if isinstance(module, (ResBlock, TimestepBlock, AttnBlock)):
            module.compile(mode=mode, options=options, dynamic=False)
            count += 1
    return count


class CudaGraphed:
    """Replays one CUDA graph per input shape instead of launching a forward pass's kernels one by one from Python.

    Wraps a stage's `forward(x, r, **conditions)`: the first call with a new set of shapes runs it twice on a side
    stream (warm-up: cuBLAS/cuDNN workspaces, torch.compile's first compilation) and captures a third run into a
    graph with static input buffers; every later call copies its inputs into those buffers, replays the graph and
    returns a copy of the output. The sampling loop makes no host-device synchronisation (cascade/gdf.py), so with
    the whole step on the device, launch overhead (a full-size Stage C pass is about 2,500 kernels) is gone. It
    bought 1 to 2 % on an H200 while each pass took over 100 ms (docs/PERFORMANCE.md), so it is a benchmark option
    for now. A forward pass that cannot be captured (it synchronises) is run eagerly from then on, with one warning.
    """

    def __init__(self, forward):
        self.forward = forward
        self.graphs: dict[tuple, tuple[dict, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs of one stage share their scratch memory (made on the first capture)
        self.failed: str | None = None

    def __call__(self, x: torch.Tensor, r: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = {"x": x, "r": r, **conditions}
        if self.failed or not x.is_cuda:
            return self.forward(x, r, **conditions)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(inputs)
            except RuntimeError as e:  # a synchronising op cannot be captured: stay correct, lose the speed
                import warnings

                self.failed = str(e).splitlines()[0]
                warnings.warn(f"CUDA graph capture failed, running eagerly: {self.failed}", stacklevel=2)
                return self.forward(x, r, **conditions)
        static, graph, out = entry
        for name, t in inputs.items():
            static[name].copy_(t)
        graph.replay()
        return out.clone()

    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {name: t.clone() for name, t in inputs.items()}
        conditions = {k: v for k, v in static.items() if k not in ("x", "r")}
        call = lambda: self.forward(static["x"], static["r"], **conditions)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = call()
        return static, graph, out


def cuda_graphs(model: nn.Module) -> None:
    """Make a Stage B or Stage C run its forward passes as CUDA graphs (CudaGraphed), in place. Parameters and
    their names are untouched; call it after loading, LoRA merging and compile_blocks."""
    if not isinstance(model.forward, CudaGraphed):
        model.forward = CudaGraphed(model.forward)


def channels_last(model: nn.Module) -> None:
    """Run a Stage B or Stage C with its feature maps channels-last (NHWC in memory), in place.

    The blocks work per pixel across channels: LayerNorm2d, the ResBlock's MLP and the attention's tokens all permute
    (B, C, H, W) to (B, H, W, C). On NCHW memory such a permute can cost a copy of the feature map (where an earlier
    op did not already leave it channels-last); on channels-last memory it is a view, and the convolutions (depthwise
    3x3, the 1x1 embeddings) run NHWC kernels. The values are the same; the parameters keep their names and shapes
    (conv weights change strides only). Off by default: whether it pays on a GPU is for the profile's `cl` variant
    to say (docs/PERFORMANCE.md). Call it after loading and LoRA merging, before cuda_graphs."""
    model.to(memory_format=torch.channels_last)
    forward = model.forward

    def channels_last_forward(x: torch.Tensor, r: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        return forward(x.contiguous(memory_format=torch.channels_last), r, **conditions)

    model.forward = channels_last_forward
