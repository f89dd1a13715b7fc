"""Memory-efficient BN-ReLU-Conv chains for DenseNet (Pleiss et al., 2017), pure torch.

A dense layer is a chain of stages, each BN-ReLU-Conv(-dropout): one stage in a DenseNet, two with
the bottleneck (DenseNet-B); a transition is one stage. Plain autograd keeps, for every stage, the
concatenation of all earlier feature maps, its BN output and its ReLU output: memory that grows
quadratically with depth. `bn_relu_conv_chain` keeps only what grows linearly: each stage's input
past the first (the previous conv's output, small: 4k maps), the batch statistics (two numbers a
channel) and dropout masks; the inputs of the first stage are the block's feature maps, which the
block keeps anyway. The backward rebuilds each concatenation and BN-ReLU output from those, one
stage at a time, normalising with the saved statistics (no second reduction, running statistics
updated once), and calls the aten backward kernels autograd would: the same gradients, and no
convolution runs twice. As in Pleiss et al.'s implementation, the concatenation and the BN-ReLU output
are written into two scratch tensors shared by every layer (per thread, device and dtype; grown to
the largest layer and kept): they are needed one layer at a time, and on a CPU a fresh allocation
of that size is a fresh mmap whose every page faults in again, which costs more than the arithmetic.

Assumes what DenseNet's modules are: BatchNorm2d with affine weights and running statistics,
Conv2d without bias. Under autocast each convolution runs in the dtype autocast chose in the forward.

Measured gain (benchmarks/model_step.py, interleaved rounds in one run, 2-core CPU, fp32; ratios to
our plain mode, torchvision's memory-efficient mode beside it):

    workload                          ours memory-efficient       torchvision memory-efficient
                                      step time   peak RSS        step time   peak RSS
    DenseNet-121, 224x224, batch 16     1.20x      0.54x            1.24x      0.63x
    DenseNet-BC-100 k=12, 32x32, b 64   1.07x      0.45x            1.24x      0.53x

so against torchvision's memory-efficient mode: 0.97x / 0.86x the step time and 0.86x / 0.85x the
peak memory. Re-measure with `python benchmarks/model_step.py --variants ours ours-memeff torchvision-memeff`.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

aten = torch.ops.aten
_scratch = threading.local()


class Stage:
    """BN-ReLU-Conv, then dropout with probability p while training."""

    def __init__(self, norm: nn.BatchNorm2d, conv: nn.Conv2d, drop_rate: float = 0.0) -> None:
        self.norm, self.conv, self.drop_rate = norm, conv, float(drop_rate)

    def params(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.norm.weight, self.norm.bias, self.conv.weight


def bn_relu_conv_chain(stages: list[Stage], features: list[Tensor]) -> Tensor:
    """The stages applied to torch.cat(features, 1), keeping for backward what grows linearly."""
    params = [p for stage in stages for p in stage.params()]
    return _Chain.apply(stages, len(features), *features, *params)


def _momentum(norm: nn.BatchNorm2d) -> float:
    """The running-statistics factor of nn.BatchNorm2d.forward, counting the batch as it does."""
    if not norm.training:
        return 0.0
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def _scratch_like(slot: str, like: Tensor, channels: int | None = None) -> Tensor:
    """An uninitialised tensor shaped, typed and laid out like `like` (with `channels` channels) on this
    thread's shared scratch storage for `slot`, valid until the next call for the same slot."""
    n, c, h, w = like.shape
    channels = channels or c
    size = n * channels * h * w
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (slot, like.device, like.dtype)
    if key not in buffers or buffers[key].numel() < size:
        buffers.pop(key, None)  # free the smaller one before allocating
        buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
    flat = buffers[key][:size]
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return flat.view(n, h, w, channels).permute(0, 3, 1, 2)
    return flat.view(n, channels, h, w)


def _concat(features: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    if len(features) == 1:
        return features[0]
    return torch.cat(features, 1, out=_scratch_like("concat", features[0], sum(f.shape[1] for f in features)))


def _bn_relu(norm: nn.BatchNorm2d, x: Tensor, mean: Tensor | None = None, invstd: Tensor | None = None):
    """ReLU(BN(x)) on scratch storage, with the batch's mean and 1/std; given them, normalises with
    them (nothing reduced, running statistics untouched)."""
    out = _scratch_like("bn_relu", x)
    channels = x.shape[1]
    if mean is None and norm.training:
        mean, invstd = x.new_empty(channels, dtype=norm.weight.dtype), x.new_empty(channels, dtype=norm.weight.dtype)
        aten.native_batch_norm.out(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, True,
                                   _momentum(norm), norm.eps, out=out, save_mean=mean, save_invstd=invstd)
        return out.relu_(), mean, invstd
    if mean is None:
        mean, invstd = norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)
    var = invstd.double().pow(-2).sub(norm.eps).to(invstd.dtype)  # what rsqrt(var + eps) inverts to
    empty = x.new_empty(0, dtype=norm.weight.dtype)
    aten.native_batch_norm.out(x, norm.weight, norm.bias, mean, var, False, 0.0, norm.eps, out=out,
                               save_mean=empty, save_invstd=empty.clone())
    return out.relu_(), mean, invstd


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stages: list[Stage], n_features: int, *tensors: Tensor) -> Tensor:
        features = tensors[:n_features]
        x = _concat(features)
        inputs, stats, masks, dtypes = [], [], [], []
        for i, stage in enumerate(stages):
            if i:
                inputs.append(x)
            y, mean, invstd = _bn_relu(stage.norm, x)
            out = _conv(stage.conv, y)
            dtypes.append(out.dtype)  # autocast's choice for this convolution
            if stage.drop_rate and stage.norm.training:
                out, mask = aten.native_dropout(out, stage.drop_rate, True)
                masks.append(mask)
            else:
                masks.append(None)
            stats += [mean, invstd]
            x = out
        ctx.stages, ctx.n_features, ctx.dtypes = stages, n_features, dtypes
        ctx.has_mask = [m is not None for m in masks]
        ctx.save_for_backward(*features, *inputs, *stats, *[m for m in masks if m is not None])
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        stages, n = ctx.stages, ctx.n_features
        saved = list(ctx.saved_tensors)
        features, saved = saved[:n], saved[n:]
        inputs, saved = saved[:len(stages) - 1], saved[len(stages) - 1:]
        stats, masks = saved[:2 * len(stages)], iter(saved[2 * len(stages):])
        masks = [next(masks) if has else None for has in ctx.has_mask]
        param_grads: list[Tensor] = []
        for i in reversed(range(len(stages))):
            stage, mean, invstd = stages[i], stats[2 * i], stats[2 * i + 1]
            x = inputs[i - 1] if i else _concat(features)
            if masks[i] is not None:
                grad = aten.native_dropout_backward(grad, masks[i], 1.0 / (1.0 - stage.drop_rate))
            y = _bn_relu(stage.norm, x, mean, invstd)[0]  # recomputed, as in the forward
            dtype, weight = ctx.dtypes[i], stage.conv.weight
            grad_y, grad_conv, _ = aten.convolution_backward(
                grad.to(dtype), y.to(dtype), weight.to(dtype), None, list(stage.conv.stride),
                list(stage.conv.padding), list(stage.conv.dilation), False, [0, 0], stage.conv.groups,
                [True, True, False])
            grad_y = grad_y.to(y.dtype)
            aten.threshold_backward.grad_input(grad_y, y, 0, grad_input=grad_y)
            grad, grad_w, grad_b = aten.native_batch_norm_backward(
                grad_y, x, stage.norm.weight, stage.norm.running_mean, stage.norm.running_var, mean, invstd,
                stage.norm.training, stage.norm.eps, [True, True, True])
            param_grads[:0] = [grad_w, grad_b, grad_conv]
        sizes = [f.shape[1] for f in features]
        feature_grads = grad.split(sizes, 1) if n > 1 else (grad,)
        return None, None, *feature_grads, *param_grads
