"""Optional stage after verification: a short end-to-end distillation of the slim model.

Layer-wise refitting leaves each layer as close to the teacher as its inputs allow, but the
errors of all layers still add up at the output. A few dozen steps of Adam on the slim model
itself (channels already removed, so no masks to keep), matching the teacher's outputs on the
few shots and their augmented variants, aim at that; no labels are used. It fits the shots, not
the task: on the paper-protocol nets it changes a refit student's accuracy by -1 to +0.3
points, so it is off unless asked for.

The torch twin of the slim model is trained (BatchNorm statistics frozen: a handful of
samples cannot estimate them) and its Conv, Gemm and BatchNormalization parameters are
written back into the ONNX initializers; the caller verifies the result against the twin.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import ModelProto, numpy_helper

from pipeline.augment import Augmenter
from pipeline.convert import TorchModel, run_torch, to_torch
from pipeline.graph import GraphView
from pipeline.prune import CONVS

POOL_BYTES = 256 << 20  # augmented inputs (and teacher outputs) kept for the whole fine-tune
POOL_INPUTS = 1024


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 0  # 0: no fine-tune
    lr: float = 1e-4
    batch: int = 32


@dataclass
class FinetuneResult:
    model: ModelProto
    twin: TorchModel  # the trained torch model the ONNX file must reproduce
    tuned: list[str]  # ONNX nodes whose parameters were trained
    loss_before: float  # the training loss on the shots, before and after
    loss_after: float
    inputs: int  # in the pool: the shots and their augmented variants
    seconds: float

    def to_json(self) -> dict:
        return {"tuned_nodes": len(self.tuned), "pool_inputs": self.inputs,
                "relative_squared_error_before": self.loss_before, "relative_squared_error_after": self.loss_after,
                "seconds": round(self.seconds, 3)}


def finetune(slim: ModelProto, teacher: TorchModel, x: np.ndarray, config: FinetuneConfig, seed: int,
             augmenter: Augmenter | None, progress=lambda _: None) -> FinetuneResult:
    start = time.perf_counter()
    pool = _pool(x, augmenter)
    targets = [torch.from_numpy(t).to(teacher.device) for t in run_torch(teacher, pool)]
    scales = [float(t.pow(2).mean().clamp_min(1e-30)) for t in targets]
    twin = to_torch(slim, "slim model", batch=teacher.batch, device=teacher.device)
    params, tuned = _trainable(slim, twin)
    if not params:
        progress("fine-tune: no Conv, Gemm or BatchNormalization layer with its own weights; skipped")
    twin.module.eval()  # BatchNorm uses its running statistics; Dropout is off
    opt = torch.optim.Adam(params, lr=config.lr) if params else None
    gen = torch.Generator().manual_seed(seed)
    pool_t = torch.from_numpy(pool).to(teacher.device)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(teacher.device)
        out = twin.forward(pool_t[idx])
        return sum(torch.mean((o - t[idx]) ** 2) / s for o, t, s in zip(out, targets, scales)) / len(out)

    shots = torch.arange(len(x))  # the pool starts with them; its variants would cost as much as the steps
    with torch.no_grad():
        before = float(loss_on(shots))
    for step in range(config.steps if params else 0):
        idx = torch.randperm(len(pool), generator=gen)[:config.batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, config.steps // 5) == 0:
            progress(f"fine-tune step {step + 1}/{config.steps}: relative squared error {float(loss.detach()):.4f}")
    with torch.no_grad():
        after = float(loss_on(shots))
    for p in params:
        p.requires_grad_(False)
    _round_to_file(slim, twin, tuned)
    return FinetuneResult(_write_back(slim, twin, tuned), twin, tuned, before, after, len(pool),
                          time.perf_counter() - start)


def _pool(x: np.ndarray, augmenter: Augmenter | None) -> np.ndarray:
    """The shots, then rounds of their augmented variants, up to a memory budget."""
    limit = max(len(x), min(POOL_INPUTS, POOL_BYTES // max(x[:1].nbytes, 1)))
    if augmenter is None or augmenter.factor == 1:
        return x
    parts, count, round_ = [], 0, 0
    while count < limit and round_ < 64:
        for variant in augmenter.variants(x, 10_000 + round_):
            parts.append(variant)
            count += len(variant)
        round_ += 1
    return np.concatenate(parts)[:limit]


_SLOTS = {"Conv": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2)}  # ONNX inputs that are trained


def _trainable(proto: ModelProto, twin: TorchModel) -> tuple[list[torch.nn.Parameter], list[str]]:
    """Parameters of layers whose weights are initializers used by that node alone."""
    view = GraphView(proto)
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for p in twin.module.parameters():
        p.requires_grad_(False)
    params, tuned = [], []
    for name, node in view.nodes.items():
        module = twin.modules_by_node.get(name)
        slots = _SLOTS.get(node.op_type)
        if slots is None or not isinstance(module, (*CONVS, torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            continue
        if any(i < len(node.input) and node.input[i] and (node.input[i] not in view.initializers
                                                          or uses[node.input[i]] > 1) for i in slots):
            continue
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
        tuned.append(name)
    return params, tuned


@torch.no_grad()
def _round_to_file(proto: ModelProto, twin: TorchModel, tuned: list[str]) -> None:
    """Trained parameters rounded as the file will store them (float16 models), so that the twin
    the written model is checked against is the model written."""
    view = GraphView(proto)
    for name in tuned:
        stored = view.const(view.nodes[name].input[1]).dtype
        for p in twin.modules_by_node[name].parameters():
            p.copy_(torch.from_numpy(p.cpu().numpy().astype(stored)))


def _write_back(proto: ModelProto, twin: TorchModel, tuned: list[str]) -> ModelProto:
    """The slim model with the trained parameters in ONNX layout."""
    out = ModelProto()
    out.CopyFrom(proto)
    view = GraphView(out)
    inits = {i.name: i for i in out.graph.initializer}
    for name in tuned:
        node, module = view.nodes[name], twin.modules_by_node[name]
        weight = module.weight.detach().cpu().numpy()
        bias = None if module.bias is None else module.bias.detach().cpu().numpy()
        if node.op_type == "Gemm":  # onnx2torch folded alpha, beta and transB into the Linear
            weight = weight / view.attr(node, "alpha", 1.0)
            weight = weight if view.attr(node, "transB", 0) else weight.T
            bias = None if bias is None else bias / (view.attr(node, "beta", 1.0) or 1.0)
        for index, value in ((1, weight), (2, bias)):
            if value is None or index >= len(node.input) or not node.input[index]:
                continue
            init = inits[node.input[index]]
            old = numpy_helper.to_array(init)
            inits[node.input[index]].CopyFrom(
                numpy_helper.from_array(value.reshape(old.shape).astype(old.dtype), init.name))
    onnx.checker.check_model(out)
    return out
