"""Optional float8 matrix products for the generators' linear layers (an option, off by default: issue 6 keeps it
only where a GPU measurement says it pays, docs/PERFORMANCE.md).

Hopper (H100, H200) and Ada GPUs multiply float8 (e4m3) matrices at twice their bf16 rate. Most of Stage C's and
Stage B's FLOPs are linear layers on tokens: each ResBlock's channel MLP (c -> 4c -> c) and each attention block's
input and output projections. `float8_linears` swaps those for `Float8Linear`, which keeps its weight in e4m3 with
one scale per output row, and at each call scales every input row to e4m3's range by its own absolute maximum
("dynamic row-wise" scaling, as torchao's float8 inference) and multiplies with `torch._scaled_mm`, which applies
both scales and the bias and returns the layer's dtype. e4m3 keeps 3 mantissa bits: a product has about 3-4 %
relative error on random data, against bf16's 0.4 % (a tiny Stage C or Stage B pass: 3-5 % from bf16's).

What it costs besides the product: passes over the input for its row maxima and to scale and cast it (`scale_rows`:
9 bytes per bf16 element in eager mode). On an H200 (790 TFLOP/s bf16, 4.3 TB/s), for a layer of n outputs the float8
product saves about n / 790e12 s per input element and the passes cost about 2e-12 s: with Stage C's c = 2048, a
clear gain for the MLP's first layer (n = 4c) and the keys + values (2c), about even for the MLP's second layer and
the query and output projections (c), so compiled
blocks (`cascade.speed.compile_blocks`), which fuse the passes into the kernels that make the input, should gain
more. Apply it after loading and any LoRA merge, before compiling. The swapped
modules hold the weights in float8: a model converted is for sampling, not for saving or training.

On a CPU (torch 2.13 or later), `torch._scaled_mm` runs the same arithmetic (slowly): the tests check the numerics
there.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Attention2D, ResBlock

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): float8 tensor cores
# _scaled_mm wants the inner dimension and the weight's rows in multiples of 16; the number of input rows is free (its
# CUDA checks in ATen and the row-wise kernel's, and its shape checks under torch.compile, ask nothing of it)
ALIGN = 16
# The torch releases whose _scaled_mm takes one scale per row (as used here) on each device: Hopper from 2.5 (the
# project's floor), Ada from 2.7 (pytorch #144348), the CPU from 2.13 (pytorch #176266; 2.12 untested).
MIN_TORCH = {"cpu": (2, 13), "ada": (2, 7)}


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of torch's version string ("2.13.0+cpu" -> (2, 13))."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def float8_supported(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    capability: tuple[int, int] | None = None,
    version: str | None = None,
) -> str | None:
    """None where a model in `dtype` on `device` can run float8 products, else why not (for the error message).
    version: torch's (default: this one's)."""
    have_torch = torch_version(version)

    def too_old(where: str, need: tuple[int, int]) -> str:
        return (
            f"float8 products on {where} need torch {'.'.join(map(str, need))} or later (row-wise scaled products); "
            f"this is torch {version or torch.__version__}"
        )

    if device.type == "cpu":  # reference arithmetic, slow: for tests
        return too_old("a CPU", MIN_TORCH["cpu"]) if have_torch < MIN_TORCH["cpu"] else None
    if device.type != "cuda":
        return f"float8 products need an NVIDIA GPU; this device is {device.type}"
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        have, need = ".".join(map(str, capability)), ".".join(map(str, MIN_CAPABILITY))
        return f"float8 products need a GPU of compute capability {need} or later (Ada, Hopper); this one is {have}"
    if tuple(capability) == (8, 9) and have_torch < MIN_TORCH["ada"]:
        return too_old("an Ada GPU", MIN_TORCH["ada"])
    if dtype != torch.bfloat16:  # the GPU's row-wise scaled products return bfloat16 only
        return f"float8 products on a GPU need the model in bfloat16; this one is in {dtype}"
    return None


def scale_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> (its rows along the last dimension in e4m3, contiguous, each scaled so that its largest magnitude
    is E4M3_MAX; the (..., 1) float32 scales that undo it). A row of zeros stays zeros.

    Three passes over x in eager mode (its row maxima, the product by the factor in x's own dtype, the cast, which
    also lays the rows out contiguously where x is a permuted view, as a ResBlock's MLP input is): 9 bytes per bf16
    element where float32 arithmetic would move 25. The factor is rounded to x's dtype first and the scale returned
    is its exact inverse, so that the one rounding is e4m3's."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    factor = (E4M3_MAX / amax.clamp(min=1e-12)).to(x.dtype)  # 1e-12: a zero row times a finite factor
    return (x * factor).to(E4M3, memory_format=torch.contiguous_format), factor.float().reciprocal()


class Float8Linear(nn.Module):
    """y = x W^T + b with x and W in e4m3, one scale per row of each (W's once, x's per call)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % ALIGN or out_features % ALIGN:
            raise ValueError(f"Float8Linear: {in_features} -> {out_features} features; both must be multiples of 16")
        q, scale = scale_rows(weight.detach())
        self.in_features, self.out_features = in_features, out_features
        self.dtype = weight.dtype  # what the layer returns
        self.register_buffer("weight", q)  # (out, in), row-major: _scaled_mm takes its transpose, column-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = scale_rows(x)  # on x as it is laid out: no copy of a permuted input first
        q, scale = q.view(-1, self.in_features), scale.reshape(-1, 1).contiguous()  # (M, 1): as _scaled_mm wants
        y = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.dtype
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


class Float8InProjection(nn.Module):
    """An attention block's input projection in float8: queries from the image tokens, keys and values (one product)
    from the tokens attended to. `cascade.blocks.multihead_attention` uses it where an Attention2D has one."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        c, weight, bias = attn.embed_dim, attn.in_proj_weight, attn.in_proj_bias
        self.q = Float8Linear(weight[:c], None if bias is None else bias[:c])
        self.kv = Float8Linear(weight[c:], None if bias is None else bias[c:])


def _fits(*features: int) -> bool:
    return all(f % ALIGN == 0 for f in features)


def float8_linears(model: nn.Module, check_device: bool = True) -> int:
    """Swap a Stage B's or Stage C's token linear layers for float8 ones, in place; returns how many products.

    Each ResBlock's two MLP layers (`channelwise.0`, `channelwise.4`) and each attention block's input projection
    (as two products: queries, keys + values) and output projection. Layers whose sizes are not multiples of 16 stay
    as they are; so do the small rest (the TimestepBlocks' mappers, the condition mappings made once per sampling
    run, the convolutions). Layers already in float8 are left alone, so a second call changes nothing and returns
    0. check_device=False skips the device check: for counting on the meta device. model may be one block."""
    first = next(model.parameters())
    reason = float8_supported(first.device, first.dtype) if check_device else None
    if reason is not None:
        raise RuntimeError(reason)
    count = 0
    for module in list(model.modules()):
        if isinstance(module, ResBlock):
            for i in (0, 4):
                layer = module.channelwise[i]
                if isinstance(layer, nn.Linear) and _fits(layer.in_features, layer.out_features):
                    module.channelwise[i] = Float8Linear.from_linear(layer)
                    count += 1
        elif isinstance(module, Attention2D):
            attn = module.attn
            if hasattr(module, "float8_in_proj") or not _fits(attn.embed_dim):
                continue
            # Computed from the module's own parameters, so the float8 copy must be made after any LoRA merge.
            module.float8_in_proj = Float8InProjection(attn)
            attn.out_proj = Float8Linear.from_linear(attn.out_proj)
            del attn.in_proj_weight  # the float8 copy replaces it (and frees the bf16 one)
            attn.register_parameter("in_proj_weight", None)
            count += 3
    return count
