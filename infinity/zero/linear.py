"""A linear layer function whose backward reads the Parameter itself.

[Note: why not F.linear]
torch's linear saves weight.t() for backward, a view that keeps the weight's
storage alive after the coordinator released the parameter, so offloaded
weights would stay in memory until backward.  This function saves the
Parameter (a leaf), whose data the coordinator gathers again before the
module's backward, as DeepSpeed's stage-3 linear does.
"""
from __future__ import annotations

import torch


class ZeroLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)  # one fused GEMM with the bias (no graph: inside apply)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def zero_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return ZeroLinear.apply(x, module.weight, module.bias)
