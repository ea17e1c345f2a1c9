"""The MLPs' forward pass at inference on CPU: each Linear and the activation after it as one
oneDNN call (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend emits
for the same pattern), in the autocast dtype when autocast is on.

Why: an eager `nn.Linear` on a (K, B, H) input is an `addmm` that first fills its output with the
broadcast bias, then runs the GEMM with beta = 1, and the ReLU is another pass over the result;
under bf16 autocast each call also converts its input and weight. On this project's CPU those
passes cost more than the GEMM itself (bench/notes/, "fused linear layers"). The fused call
adds the bias and applies the activation in the GEMM's epilogue while the tile is in cache.

The result is the same function (tests compare it with the eager layers); anything the fused path
does not cover runs the eager modules unchanged: gradients (training), CUDA, float64, a torch
build without oneDNN, bfloat16 on a CPU without bf16 instructions.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

# eager activation module -> oneDNN post-op (GELU also passes its `approximate`, "none" or "tanh")
_POST_OPS: dict[type, str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.SiLU: "swish", nn.GELU: "gelu"}
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run oneDNN's fused linear in `dtype` (x86 and Arm CPU
    builds do in float32; bfloat16 needs the CPU's bf16 instructions, e.g. AVX-512 BF16 or AMX:
    on an AVX2-only CPU oneDNN has no bf16 kernel and the call fails)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        ones = functools.partial(torch.ones, dtype=dtype)
        op(ones(2, 3), ones(4, 3), torch.zeros(4, dtype=dtype), "relu", [], "")
    except (AttributeError, RuntimeError):
        return False
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused pass over `x` runs in, or None when the eager layers must run: with
    gradients on, off the CPU, or in a dtype oneDNN does not multiply."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    dtype = _cpu_autocast_dtype() or x.dtype
    if x.dtype not in _DTYPES or dtype not in _DTYPES or not available(dtype):
        return None
    return dtype


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype when CPU autocast is on (torch >= 2.4 takes a device type; the
    older calls are the CPU-specific ones)."""
    if hasattr(torch, "get_autocast_dtype"):
        on = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if on else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, fused where `compute_dtype` allows, else `F.linear` (which autocast
    handles). (..., in) -> (..., out)"""
    dtype = compute_dtype(x)
    if dtype is None:
        return nn.functional.linear(x, weight, bias)
    return _fused(x, weight, bias, "none", "", dtype)


def cast(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param.to(dtype)`; at inference (no gradient) the converted copy is kept on the parameter
    and reused until the parameter changes (its version counter moves), so a bf16 step does not
    convert every weight again: on a 20-string, 1,000-value model those copies were a fifth of
    scoring's time."""
    if param.dtype == dtype or torch.is_grad_enabled() or param.is_inference():
        return param.to(dtype)
    key = (dtype, param._version, param.data_ptr(), param.device)
    cached = getattr(param, "_vaewatch_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, param.detach().to(dtype))
        param._vaewatch_cast = cached
    return cached[1]


def _fused(x, weight, bias, attr: str, algorithm: str, dtype: torch.dtype) -> torch.Tensor:
    bias = None if bias is None else cast(bias, dtype)
    if x.numel() == x.shape[-1]:
        # one row: oneDNN takes a matrix-vector kernel that sums in another order than its
        # GEMM (1e-7 apart on AVX2), so a record scored alone would differ from the same
        # record in a batch. The row is run as two, the same kernel as every other call.
        pair = x.reshape(1, -1).repeat(2, 1)
        out = _fused(pair, weight, bias, attr, algorithm, dtype)[:1]
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(
        x.to(dtype), cast(weight, dtype), bias, attr, [], algorithm
    )


def run(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`net(x)` for an MLP of Linear layers with an activation module after some of them
    (model/network/vae.py `mlp`), each Linear + activation as one fused call where possible. The
    output is in the compute dtype (bf16 under bf16 autocast), as the eager net's would be."""
    dtype = compute_dtype(x)
    if dtype is None:
        return net(x)
    layers = list(net)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if not isinstance(layer, nn.Linear):
            if type(layer) not in _POST_OPS:
                return nn.Sequential(*layers[i:])(x)  # a module the fused path does not know
            x = layer(x)  # an activation with no Linear before it in `net`
            i += 1
            continue
        attr, algorithm = "none", ""
        if i + 1 < len(layers) and type(layers[i + 1]) in _POST_OPS:
            activation = layers[i + 1]
            attr = _POST_OPS[type(activation)]
            algorithm = activation.approximate if isinstance(activation, nn.GELU) else ""
            i += 1
        x = _fused(x, layer.weight, layer.bias, attr, algorithm, dtype)
        i += 1
    return x
