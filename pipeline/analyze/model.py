"""The channel-group data model: what a group holds, where its channels sit in a tensor, and the
signals that stop (Frozen), restart (Repeat) or split (Divide) a trace."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamSlice:
    """Input `index` of `node` holds one entry (or `block` entries) per channel along `axis`,
    the group's channels starting at entry `offset` (after a Concat, other channels come first)."""

    node: str
    index: int
    axis: int
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class Consumer:
    """A linear layer reading the group: Conv (kind 'conv'), a ConvTranspose whose patches do not
    overlap (kind 'deconv'), Gemm/MatMul (kind 'gemm') or the input weights of an LSTM, GRU or
    RNN (kind 'rnn').

    `in_axis` is the axis of its ONNX weight that holds input channels, `block` how many
    consecutive input features one channel spans (H*W after a Flatten, else 1).
    """

    node: str
    kind: str
    in_axis: int
    block: int = 1
    offset: int = 0  # first input channel of the group (non-zero after a Concat)
    extra: tuple[int, ...] = ()  # further offsets where a Concat repeats the group (C2f, SPPF)

    @property
    def offsets(self) -> tuple[int, ...]:
        return (self.offset, *self.extra)


@dataclass(frozen=True)
class ShapeEdit:
    """Entry `position` of the constant shape at input `index` of `node` counts the group's
    channels `block` times each: it shrinks by `block` per channel dropped."""

    node: str
    index: int
    position: int
    block: int


@dataclass(frozen=True)
class Attention:
    """A multi-head attention block whose heads are a group: queries, keys and values written by
    linear layers (`q`, `k`, `v`: their output tensors, one tensor `fused` for all three), the heads
    merged into `merged`, which linear layer `out` reads. What the graph does in between was shown
    by a probe to be softmax(scale * Q K^T + mask) V over `heads` heads of `head_dim` channels with
    tokens on the axis `lead` says ("bt": batch, tokens, channels; "tb": tokens first)."""

    softmax: str
    q: str
    k: str
    v: str
    fused: bool
    out: str
    merged: str
    merged_rank: int
    heads: int
    head_dim: int
    scale: float
    mask: str  # tensor added to the scores, "" for none
    lead: str
    nan_guard: bool = False  # weights that come out NaN (rows masked whole) are set to zero


@dataclass
class ChannelGroup:
    """Channels shared by every tensor in `tensors`: sliced in each producer, refit in each consumer.

    `coupling` says why the group is not a plain chain (several producers joined by a residual
    Add or a gating Mul); such groups are pruned only with scope 'all', as the paper left the
    channels tied by ResNet shortcuts alone.
    """

    id: int
    producers: list[str]
    size: int
    tensors: list[str] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    group_attrs: list[str] = field(default_factory=list)  # depthwise or grouped Convs: `group` follows the width
    unit: int = 1  # channels removed together: a grouped Conv's group width (ResNeXt, RegNet), else 1
    coupling: str = ""
    reason: str = ""  # why it is frozen; empty when prunable
    attention: Attention | None = None  # the group is the heads of this block (unit: head_dim)
    follows: list[str] = field(default_factory=list)  # layers whose cost scales with the units kept

    @property
    def prunable(self) -> bool:
        return not self.reason

    @property
    def channels(self) -> int:
        """Channels in the group (`size` counts units of `unit` channels)."""
        return self.size * self.unit

    def to_json(self) -> dict:
        return {"id": self.id, "producers": self.producers, "channels": self.channels, "unit": self.unit,
                "consumers": [c.node for c in self.consumers], "prunable": self.prunable,
                "coupling": self.coupling or None, "reason": self.reason or None, "tensors": len(self.tensors),
                "heads": self.attention.softmax if self.attention else None}


@dataclass(frozen=True)
class Place:
    """Where the group's channels sit in a tensor: `block` features per channel, starting at
    channel `offset` of `width` (offset 0 and width = group size unless a Concat widened it)."""

    block: int
    offset: int
    width: int
    last: bool = False  # channels on the last axis (a MatMul over an N...C tensor), not axis 1
    also: tuple[int, ...] = ()  # further offsets of the same channels (a Concat that repeats them)


class Frozen(Exception):
    """Raised inside a trace to freeze the group; the message is the group's reason."""


class Repeat(Exception):
    """Raised when a Concat takes the group's channels more than once: trace again, knowing which
    of its inputs carry them (Concat name -> those inputs)."""

    def __init__(self, repeats: dict[str, list[str]]):
        super().__init__(repeats)
        self.repeats = repeats


class Divide(Exception):
    """Raised when a producer's channels reach a Split: trace one group per part instead."""

    def __init__(self, parts: list[tuple[int, int]]):
        super().__init__(parts)
        self.parts = parts  # (first channel, channels) of each part
