"""Shared by the teacher-training scripts: a fixed-seed SGD loop and an ONNX export that keeps BatchNorm.

Training is a one-time step whose products (ONNX teachers) are committed; these helpers only exist
so that every committed teacher is reproducible from a script.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn


def augment(x: torch.Tensor, gen: torch.Generator, background: float, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts of up to `shift` pixels, padding with the background value."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (shift,) * 4, value=background)
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, background: float,
        batch: int = 128, max_lr: float = 0.1, adamw: bool = False) -> nn.Module:
    """SGD with Nesterov momentum (or AdamW, which transformers need) and a one-cycle schedule;
    prints one line per epoch."""
    torch.manual_seed(seed)
    steps = epochs * (len(x) // batch)
    opt = (torch.optim.AdamW(model.parameters(), lr=max_lr / 2, weight_decay=0.05) if adamw else
           torch.optim.SGD(model.parameters(), lr=max_lr / 2, momentum=0.9, nesterov=True, weight_decay=5e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        start, correct = time.time(), 0
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            out = model(augment(x[idx], gen, background))
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == y[idx]).sum())
        print(f"epoch {epoch + 1}/{epochs}: train acc {correct / (len(x) // batch * batch):.4f}, "
              f"{time.time() - start:.0f} s", flush=True)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def export(model: nn.Module, shape: tuple[int, ...], path: Path, opset: int = 17) -> None:
    """ONNX with BatchNormalization kept where the model has it: PRESERVE on an eval-mode model exports
    inference BN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not has_bn or any(n.op_type == "BatchNormalization" for n in proto.graph.node)
