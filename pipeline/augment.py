"""Stage between data and pruning: more inputs from the same few shots, for the statistics only.

The layer objectives need no labels (the teacher gives every target), so each shot can be
turned into several nearby inputs. A transform is used only if the teacher is (nearly)
invariant to it on the shots themselves: a model that tells left from right keeps no flips.
Blends of two shots (mixup, cutmix) cannot keep both answers; they are kept if the teacher
answers a half-half blend like one of its two shots at least as often as not, so they fill
the space between the shots without leaving what the teacher knows. Variants are generated
chunk by chunk from a seed, so memory does not grow with the factor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError

IMAGE_ONLY = {"flip": 1.0, "shift": 2.0, "scale": 0.1, "cutmix": 0.5}  # name -> default amount
ANY_INPUT = {"noise": 0.02, "mixup": 0.5}
BLENDS = ("mixup", "cutmix")  # most share of the other shot: at most 0.5, so each blend has a main shot
DEFAULT_SPEC = "flip,shift:2,mixup:0.5,cutmix:0.5"
MIN_AGREEMENT = 0.9  # teacher top-1 agreement on transformed shots needed to keep a transform
MIN_BLEND_AGREEMENT = 0.5  # share of half-half blends the teacher must answer like one of their two shots
AUTO_INPUTS = 80  # the automatic factor aims at this many inputs in all, at most 8 per shot


def auto_factor(shots: int) -> int:
    """The factor that brings the inputs nearest to AUTO_INPUTS, at most 8: 8 per shot for 10
    shots, 2 for 50, none from 54 shots on."""
    return max(1, min(8, int(AUTO_INPUTS / max(shots, 1) + 0.5)))


@dataclass(frozen=True)
class Transform:
    name: str
    amount: float


@dataclass
class Check:
    transform: Transform
    agreement: float
    kept: bool
    reason: str

    def to_json(self) -> dict:
        return {"transform": self.transform.name, "amount": self.transform.amount,
                "teacher_agreement": self.agreement, "kept": self.kept, "reason": self.reason}


@dataclass
class Augmenter:
    """Yields each chunk as it is, then factor - 1 transformed copies of it."""

    transforms: list[Transform]
    factor: int
    seed: int
    layout: str = "NCHW"  # of the model's input: NHWC images are transformed in NCHW and turned back
    checks: list[Check] = field(default_factory=list)

    def variants(self, x: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        yield x
        if not self.transforms:
            return
        for r in range(1, self.factor):
            rng = np.random.default_rng([self.seed, chunk, r])
            yield apply(x, self.transforms, rng, layout=self.layout)

    def to_json(self) -> dict:
        return {"factor": self.factor if self.transforms else 1,
                "used": [f"{t.name}:{t.amount:g}" for t in self.transforms],
                "checks": [c.to_json() for c in self.checks]}


def parse(spec: str) -> list[Transform]:
    """'flip,shift:2,noise:0.02' -> transforms; 'none' -> []."""
    if spec.strip().lower() in ("none", ""):
        return []
    out = []
    for part in spec.split(","):
        name, _, amount = part.strip().partition(":")
        known = {**IMAGE_ONLY, **ANY_INPUT}
        if name not in known:
            raise UsageError(f"--augment: unknown transform '{name}' (choose from {', '.join(known)}, or none)")
        try:
            value = float(amount) if amount else known[name]
        except ValueError:
            raise UsageError(f"--augment: '{part}' needs a number after the colon") from None
        if value < 0 or (name in BLENDS and value > 0.5):
            raise UsageError(f"--augment: amount of '{name}' out of range ({value})")
        out.append(Transform(name, value))
    return out


def is_image(x: np.ndarray, layout: str = "NCHW") -> bool:
    return x.ndim == 4 and min(x.shape[1:3] if layout == "NHWC" else x.shape[2:]) >= 8


def build(spec: str, factor: int | None, seed: int, x: np.ndarray,
          teacher: Callable[[np.ndarray], np.ndarray], layout: str = "NCHW") -> Augmenter:
    """Keep the transforms of `spec` that suit the input and leave the teacher's answers alone.

    `factor` None picks one from the number of shots (auto_factor).
    """
    factor = auto_factor(len(x)) if factor is None else factor
    if factor < 1:
        raise UsageError("--augment-factor must be at least 1")
    aug = Augmenter([], factor, seed, layout)
    if factor == 1:
        return aug
    base = teacher(x).reshape(len(x), -1).argmax(1)
    for t in parse(spec):
        if t.name in IMAGE_ONLY and not is_image(x, layout):
            aug.checks.append(Check(t, float("nan"), False, f"input is not an {layout} image"))
            continue
        if t.name in BLENDS and len(x) < 2:
            aug.checks.append(Check(t, float("nan"), False, "a blend needs two shots"))
            continue
        rng = np.random.default_rng([seed, 1 << 20])
        got = teacher(apply(x, [t], rng, always=True, layout=layout)).reshape(len(x), -1).argmax(1)
        blend = t.name in BLENDS  # at full strength each shot is blended with the next one
        fine = (got == base) | (got == np.roll(base, -1)) if blend else got == base
        agreement = float(np.mean(fine))
        needed = MIN_BLEND_AGREEMENT if blend else MIN_AGREEMENT
        kept = agreement >= needed
        if blend:
            reason = (f"teacher answers like one of the two shots on {100 * agreement:.0f}% of blends" if kept else
                      f"teacher answers like neither shot on {100 * (1 - agreement):.0f}% of blends "
                      f"(needs <= {100 * (1 - needed):.0f}%)")
        else:
            reason = (f"teacher keeps its answer on {100 * agreement:.0f}% of transformed shots" if kept else
                      f"teacher changes its answer on {100 * (1 - agreement):.0f}% of transformed shots "
                      f"(needs <= {100 * (1 - needed):.0f}%)")
        aug.checks.append(Check(t, agreement, kept, reason))
        if kept:
            aug.transforms.append(t)
    return aug


def apply(x: np.ndarray, transforms: list[Transform], rng: np.random.Generator,
          always: bool = False, layout: str = "NCHW") -> np.ndarray:
    """One random draw of every transform; `always` applies each at full strength and blends each
    input with the next one (for checks, which need to know the partner)."""
    out = torch.from_numpy(np.ascontiguousarray(x))
    if layout == "NHWC":
        out = out.permute(0, 3, 1, 2)
    n = len(out)
    names = {t.name: t.amount for t in transforms}
    if "flip" in names:
        flip = np.ones(n, bool) if always else rng.random(n) < 0.5
        out = torch.where(torch.from_numpy(flip)[:, None, None, None], out.flip(3), out)
    if "shift" in names or "scale" in names:
        out = _affine(out, names.get("shift", 0.0), names.get("scale", 0.0), rng, always)
    partner = lambda: torch.from_numpy(np.roll(np.arange(n), -1) if always else rng.permutation(n))
    if "mixup" in names and n > 1:
        lam = np.full(n, names["mixup"]) if always else rng.uniform(0, names["mixup"], n)
        lam_t = torch.from_numpy(lam.astype(np.float32)).reshape(-1, *([1] * (out.dim() - 1)))
        out = (1 - lam_t) * out + lam_t * out[partner()]
    if "cutmix" in names and n > 1:
        out = torch.where(torch.from_numpy(_box(out.shape, names["cutmix"], rng, always)), out[partner()], out)
    if "noise" in names:
        std = float(out.std()) * names["noise"]
        out = out + torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32)) * std
    if layout == "NHWC":
        out = out.permute(0, 2, 3, 1).contiguous()
    return out.numpy().astype(x.dtype, copy=False)


def _box(shape: tuple, share: float, rng: np.random.Generator, always: bool) -> np.ndarray:
    """Per image a random box of up to `share` of its area, as a mask broadcastable over channels."""
    n, _, h, w = shape
    area = np.full(n, share) if always else rng.uniform(0, share, n)
    bh, bw = np.round(h * np.sqrt(area)).astype(int), np.round(w * np.sqrt(area)).astype(int)
    top, left = (rng.random(n) * (h - bh + 1)).astype(int), (rng.random(n) * (w - bw + 1)).astype(int)
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
    return inside[:, None]


def _affine(x: torch.Tensor, shift: float, scale: float, rng: np.random.Generator, always: bool) -> torch.Tensor:
    """Shift by up to `shift` pixels and zoom by up to `scale`, edges repeated (no new content)."""
    n, _, h, w = x.shape
    if always:
        dx = np.full(n, shift) * rng.choice([-1, 1], n)
        dy = np.full(n, shift) * rng.choice([-1, 1], n)
        zoom = 1 + scale * rng.choice([-1, 1], n)
    else:
        dx, dy = rng.integers(-int(shift), int(shift) + 1, (2, n)) if shift >= 1 else np.zeros((2, n))
        zoom = 1 + rng.uniform(-scale, scale, n)
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, 0, 2] = -2 * dx / w
    theta[:, 1, 2] = -2 * dy / h
    grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
