"""Prove the slim model reproduces the masked student, and measure what pruning cost.

The equivalence check is the guard on the whole export: a channel sliced in the wrong place
shows up here as a large error and fails the command.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from pipeline import precision
from pipeline.convert import TorchModel, relative_error, run_torch
from pipeline.errors import VerificationError
from pipeline.runtime import AS_WRITTEN, make_session, run_batched

VERIFY_RTOL = 1e-4


def check_slim(slim: ModelProto, student: TorchModel, x: np.ndarray, output_names: list[str],
               reference: str = "the masked student") -> float:
    """Worst relative error of onnxruntime(slim) against the torch model it came from on `x`.

    A float16 slim model is checked twice: its float32-widened graph exactly against the student
    (a channel cut wrongly), then the file itself within float16's rounding of that graph (values
    the refit made too large for float16)."""
    exact = precision.widened(slim)
    computed = run_batched(make_session(exact, AS_WRITTEN), x)
    worst = _worst(run_torch(student, x), computed, output_names, VERIFY_RTOL, f"slim model differs from {reference}")
    if exact is not slim:
        _worst(computed, run_batched(make_session(slim, AS_WRITTEN), x), output_names, precision.HALF_RTOL,
               "the float16 slim model differs from its float32 computation")
    return worst


def _worst(ref: list[np.ndarray], got: list[np.ndarray], names: list[str], tolerance: float, what: str) -> float:
    worst = 0.0
    for name, r, g in zip(names, ref, got):
        if r.shape != g.shape:
            raise VerificationError(f"{what} on output '{name}' (shape {tuple(g.shape)}, not {tuple(r.shape)}); "
                                    f"nothing was written")
        err = relative_error(r, g)
        worst = max(worst, err)
        if not err <= tolerance:
            raise VerificationError(f"{what} on output '{name}' (relative error {err:.2e} > {tolerance:.0e}); "
                                    f"nothing was written")
    return worst


@dataclass
class Quality:
    """How the student compares with the teacher on a set of samples."""

    samples: int
    split: str  # where the samples came from: eval, holdout or calibration
    agreement: float  # share of samples where student and teacher pick the same class
    relative_error: float  # ||student - teacher|| / ||teacher|| over the first output
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.teacher_accuracy is None:
            return None
        return self.teacher_accuracy - self.student_accuracy

    def to_json(self) -> dict:
        return {"samples": self.samples, "split": self.split, "top1_agreement": self.agreement,
                "relative_error": self.relative_error, "teacher_accuracy": self.teacher_accuracy,
                "student_accuracy": self.student_accuracy, "accuracy_drop": self.accuracy_drop}


COLLAPSED_AGREEMENT = 0.8  # top-1 agreement with the teacher below which a labeled model counts as collapsed
COLLAPSED_ERROR = 0.5  # relative output error above which any model counts as collapsed


def collapse(quality: Quality) -> str:
    """Why the slim model counts as collapsed, or '': far from its teacher on the evaluation samples.
    Agreement is judged only where labels say the output is class scores (a detector's argmax
    means nothing); the relative error of the first output applies to every model."""
    where = f"on {quality.samples} {quality.split} samples"
    if quality.teacher_accuracy is not None and quality.agreement < COLLAPSED_AGREEMENT:
        return f"top-1 agreement with the teacher is {quality.agreement:.2f} {where} (floor {COLLAPSED_AGREEMENT})"
    if quality.relative_error > COLLAPSED_ERROR:
        return f"relative output error is {quality.relative_error:.2f} {where} (floor {COLLAPSED_ERROR})"
    return ""


def compare(teacher: ModelProto | bytes, student: ModelProto, x: np.ndarray, y: np.ndarray | None,
            split: str) -> Quality:
    """Fidelity (and accuracy where labels exist) of `student` to `teacher`, both in onnxruntime."""
    t = run_batched(make_session(teacher), x)[0]
    s = run_batched(make_session(student), x)[0]
    if t.shape != s.shape:
        raise VerificationError(f"the slim model's first output has shape {s.shape} where the teacher's has "
                                f"{t.shape} on the {split} samples; nothing was written")
    t2, s2 = t.reshape(len(t), -1), s.reshape(len(s), -1)
    agreement = float(np.mean(t2.argmax(1) == s2.argmax(1)))
    rel = float(np.linalg.norm(s2 - t2) / max(np.linalg.norm(t2), 1e-12))
    quality = Quality(len(x), split, agreement, rel)
    if y is not None and len(t2) == len(y) and t2.shape[1] > int(y.max()):
        quality.teacher_accuracy = float(np.mean(t2.argmax(1) == y))
        quality.student_accuracy = float(np.mean(s2.argmax(1) == y))
    return quality
