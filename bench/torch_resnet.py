"""The PyTorch side of the speed table: the CIFAR ResNets of configs/, written in plain PyTorch.

What a user would reach for instead of this project: an eager PyTorch ResNet of the same
shape (depth 6n+2, width, option A or projection shortcuts, post- or pre-activation, the same
input and classes), trained with SGD on synthetic data already on the device, so only model
work is timed. ``torch_side.py`` imports this file (``--ref``) and times its rows; it exposes
what that script calls: ``ResNet``, ``train_rate``, ``eval_rate``, ``dev`` and ``sync``.

    python bench/torch_side.py --cpu --rows=train128_fp32      # beside bench/train_step.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
  torch.backends.cudnn.benchmark = True


def sync() -> None:
  if dev == "cuda":
    torch.cuda.synchronize()


class Block(nn.Module):
  """``y = shortcut(x) + keep * f(x)`` (pre-activation) or ``relu(...)`` (post-activation)."""

  def __init__(self, cin: int, cout: int, stride: int, preact: bool, shortcut: str):
    super().__init__()
    self.preact, self.stride, self.pad = preact, stride, cout - cin
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cin if preact else cout)
    self.b2 = nn.BatchNorm2d(cout)
    down = stride != 1 or cin != cout
    self.proj = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                 if down and shortcut == "projection" else None)

  def shortcut(self, x: torch.Tensor) -> torch.Tensor:
    if self.proj is not None:
      return self.proj(x)
    if self.stride == 1 and self.pad == 0:
      return x
    x = x[:, :, ::self.stride, ::self.stride]
    return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

  def forward(self, x: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
    if self.preact:  # the projection takes the pre-activated input, as in the JAX model
      h = F.relu(self.b1(x))
      s = self.shortcut(h) if self.proj is not None else self.shortcut(x)
      return s + keep * self.c2(F.relu(self.b2(self.c1(h))))
    r = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
    return F.relu(self.shortcut(x) + keep * r)


class ResNet(nn.Module):
  """CIFAR ResNet-(6n+2): a 3x3 stem, three stages of n blocks (widths w, 2w, 4w), a head.
  The defaults are the paper's ResNet-110 with option A, post-activation."""

  def __init__(self, n: int = 18, width: int = 16, in_channels: int = 3, num_classes: int = 10,
               preact: bool = False, shortcut: str = "zero_pad"):
    super().__init__()
    self.preact = preact
    self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(4 * width if preact else width)  # the final BN, or the stem's
    blocks, cin = [], width
    for i, c in enumerate((width, 2 * width, 4 * width)):
      for j in range(n):
        blocks.append(Block(cin, c, 2 if (j == 0 and i > 0) else 1, preact, shortcut))
        cin = c
    self.blocks = nn.ModuleList(blocks)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
    x = self.conv(x) if self.preact else F.relu(self.bn(self.conv(x)))
    for i, b in enumerate(self.blocks):
      x = b(x, 1.0 if mask is None else mask[i])
    if self.preact:
      x = F.relu(self.bn(x))
    return self.fc(x.mean((2, 3)))


def _inputs(model: ResNet, bs: int, image: int, cl: bool):
  x = torch.randn(bs, model.conv.in_channels, image, image, device=dev)
  y = torch.randint(0, model.fc.out_features, (bs,), device=dev)
  return (x.to(memory_format=torch.channels_last) if cl else x), y


def train_rate(model: ResNet, bs: int, amp: bool, cl: bool, steps: int = 40, warm: int = 10,
               image: int = 32) -> float:
  """Training images per second: SGD with momentum and weight decay, cross-entropy."""
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x, y = _inputs(model, bs, image, cl)

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  for _ in range(warm):
    step()
  sync()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return bs * steps / (time.perf_counter() - t)


def eval_rate(model: ResNet, bs: int, amp: bool, cl: bool, steps: int = 20,
              image: int = 32) -> float:
  """Inference images per second (BatchNorm in inference mode, no gradients)."""
  model = model.eval()
  x, _ = _inputs(model, bs, image, cl)
  with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
    model(x)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
      model(x)
    sync()
  return bs * steps / (time.perf_counter() - t)
