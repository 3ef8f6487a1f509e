"""Few-shot data, read from an image folder or an .npz and shaped for the model.

Images are preprocessed the way the model expects (size, channels, scale, mean/std), taken
from options or a `<model>.preprocess.json` beside the model; a mismatch with the model's
input shape is an error here, not a crash in a later stage.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, UsageError
from pipeline.load import IOSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_LEADING_INT = re.compile(r"^(\d+)(?:$|[_\-. ])")


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs: x = (pixel / scale - mean) / std."""

    size: tuple[int, int] | None = None  # (height, width); None keeps the image's size
    channels: str = "rgb"  # gray | rgb | bgr
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # NCHW | NHWC

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Model-ready inputs with optional integer labels."""

    x: np.ndarray
    y: np.ndarray | None = None
    classes: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: np.ndarray) -> "Samples":
        return Samples(self.x[idx], None if self.y is None else self.y[idx], self.classes, self.source)


@dataclass
class FewShot:
    """The calibration shots and whatever was left over, kept for honest held-out checks."""

    calib: Samples
    holdout: Samples | None
    notes: list[str] = field(default_factory=list)


def preprocess_for(model_path: Path, spec: IOSpec, config: Path | None = None,
                   **overrides) -> tuple[Preprocess, list[str]]:
    """Preprocessing from (in order) defaults guessed from the input shape, the JSON, options."""
    notes: list[str] = []
    pre = _guess_from_shape(spec)
    config = config or model_path.with_suffix(".preprocess.json")
    if config.is_file():
        try:
            raw = json.loads(config.read_text())
            pre = _apply(pre, raw, str(config))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{config}: not a valid preprocessing JSON ({exc})") from exc
        notes.append(f"preprocessing from {config.name}")
    elif config != model_path.with_suffix(".preprocess.json"):
        raise DataError(f"{config}: no such preprocessing file")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        pre = _apply(pre, given, "command line")
    if pre.mean == (0.0,) and pre.std == (1.0,) and not config.is_file() and "mean" not in given:
        notes.append("no mean/std given: images are only divided by the scale; pass --mean/--std "
                     f"or write {model_path.with_suffix('.preprocess.json').name} if the model "
                     "was trained on normalised inputs")
    return pre, notes


def _guess_from_shape(spec: IOSpec) -> Preprocess:
    shape = spec.shape or ()
    scale = 1.0 if spec.takes_integers else Preprocess.scale  # a uint8 input takes pixels as they are
    if len(shape) == 4 and shape[1] in (1, 3):
        return Preprocess(size=_static_hw(shape[2], shape[3]), layout="NCHW",
                          channels="gray" if shape[1] == 1 else "rgb", scale=scale)
    if len(shape) == 4 and shape[3] in (1, 3):
        return Preprocess(size=_static_hw(shape[1], shape[2]), layout="NHWC",
                          channels="gray" if shape[3] == 1 else "rgb", scale=scale)
    return Preprocess(scale=scale)


def _static_hw(h, w) -> tuple[int, int] | None:
    return (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None


def _apply(pre: Preprocess, raw: dict, where: str) -> Preprocess:
    unknown = set(raw) - set(Preprocess.__dataclass_fields__)
    if unknown:
        raise DataError(f"{where}: unknown preprocessing keys {sorted(unknown)}; "
                        f"known: {sorted(Preprocess.__dataclass_fields__)}")
    out = replace(pre, **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if out.channels not in ("gray", "rgb", "bgr"):
        raise UsageError(f"{where}: channels must be gray, rgb or bgr, not '{out.channels}'")
    if out.layout not in ("NCHW", "NHWC"):
        raise UsageError(f"{where}: layout must be NCHW or NHWC, not '{out.layout}'")
    if any(s == 0 for s in out.std) or out.scale == 0:
        raise UsageError(f"{where}: std and scale must be non-zero")
    return out


def load_samples(path: str | Path, spec: IOSpec, pre: Preprocess, max_bytes: int | None = None) -> Samples:
    """Read a folder of images (class subfolders give labels) or an .npz with x and optional y."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        samples = _read_folder(path, pre)
    elif path.suffix == ".npz":
        samples = _read_npz(path, max_bytes, spec.takes_integers)
        _check_range(samples, pre)
    else:
        raise DataError(f"{path}: expected a folder of images or an .npz file")
    check_fits(samples, spec)
    return samples


def _read_folder(root: Path, pre: Preprocess) -> Samples:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        labels = _class_indices([d.name for d in subdirs])
        files, ys = [], []
        for d, label in zip(subdirs, labels):
            found = _images_in(d)
            if not found:
                raise DataError(f"{d}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
            ys += [label] * len(found)
        x = np.stack([_read_image(f, pre) for f in files])
        return Samples(x, np.asarray(ys, dtype=np.int64), [d.name for d in subdirs], str(root))
    files = _images_in(root)
    if not files:
        raise DataError(f"{root}: folder holds no images and no class subfolders")
    return Samples(np.stack([_read_image(f, pre) for f in files]), None, None, str(root))


def _class_indices(names: list[str]) -> list[int]:
    """Leading integers ('3_dress') are the class index; otherwise sorted order, as ImageFolder."""
    matches = [_LEADING_INT.match(n) for n in names]
    if all(matches):
        idx = [int(m.group(1)) for m in matches]
        if len(set(idx)) == len(idx):
            return idx
    return list(range(len(names)))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_image(file: Path, pre: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L" if pre.channels == "gray" else "RGB")
            if pre.size is not None and img.size != (pre.size[1], pre.size[0]):
                img = img.resize((pre.size[1], pre.size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DataError(f"{file}: unreadable image ({exc})") from exc
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if pre.channels == "bgr":
        arr = arr[:, :, ::-1]
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if mean.size not in (1, arr.shape[2]) or std.size not in (1, arr.shape[2]):
        raise DataError(f"mean/std have {mean.size}/{std.size} values for {arr.shape[2]} channels")
    arr = (arr / pre.scale - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if pre.layout == "NCHW" else arr)


def _read_npz(path: Path, max_bytes: int | None, integers: bool = False) -> Samples:
    """x as float32 for the torch engine; integer x only for a model that takes integers (raw
    pixels), whose values float32 holds exactly."""
    _check_declared_sizes(path, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{path}: .npz has no array 'x' (found: {', '.join(z.files) or 'none'})")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable .npz ({exc})") from exc
    if not np.issubdtype(x.dtype, np.floating) and not (integers and np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{path}: x has dtype {x.dtype}; expected preprocessed floats (NCHW float32)")
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    return Samples(x.astype(np.float32), y, None, str(path))


def _check_declared_sizes(path: Path, max_bytes: int | None) -> None:
    """Read each array's header, not its data, and refuse sizes over the memory budget."""
    if max_bytes is None:
        return
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if size > max_bytes:
                    raise DataError(f"{path}: array '{info.filename}' declares {size / 2**20:.0f} MiB, over "
                                    f"the memory budget of {max_bytes / 2**20:.0f} MiB (--max-memory)")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable .npz ({exc})") from exc


def _check_range(samples: Samples, pre: Preprocess) -> None:
    """Preprocessed inputs must lie where the model's preprocessing puts pixel values.

    Only checked when a mean/std is known: raw 0-255 pixels fed to a model trained on
    normalised inputs are the commonest silent mistake, and they sit far outside that range.
    """
    if pre.mean == (0.0,) and pre.std == (1.0,):
        return
    mean, std = np.asarray(pre.mean), np.asarray(pre.std)
    ends = np.stack([(0 - mean) / std, (255 / pre.scale - mean) / std])
    lo, hi = float(ends.min()), float(ends.max())
    margin = 0.5 * (hi - lo)
    got_lo, got_hi = float(samples.x.min(initial=0.0)), float(samples.x.max(initial=0.0))
    if got_lo < lo - margin or got_hi > hi + margin:
        raise DataError(f"{samples.source}: x ranges over [{got_lo:.3g}, {got_hi:.3g}] but the model's "
                        f"preprocessing maps pixels to [{lo:.3g}, {hi:.3g}]; is x preprocessed the same way?")


def check_fits(samples: Samples, spec: IOSpec) -> None:
    """Each sample must have the model's input shape (batch excluded) and finite values."""
    if len(samples) == 0:
        raise DataError(f"{samples.source}: no samples")
    shape = spec.shape
    if shape is not None:
        want = shape[1:]
        got = samples.x.shape[1:]
        if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g
                                        for w, g in zip(want, got)):
            want_s = "x".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in want)
            raise DataError(f"{samples.source}: samples have shape {'x'.join(map(str, got))} but input "
                            f"'{spec.name}' expects {want_s} (check --size/--channels/--layout)")
    bad = ~np.isfinite(samples.x).reshape(len(samples), -1).all(axis=1)
    if bad.any():
        raise DataError(f"{samples.source}: {int(bad.sum())} samples contain NaN or Inf "
                        f"(first at index {int(np.argmax(bad))})")


def draw_shots(samples: Samples, *, shots: int | None, count: int | None, seed: int) -> FewShot:
    """K per class when labels exist and --shots is given, else `count` samples at random."""
    rng = np.random.default_rng(seed)
    if shots is not None and samples.y is None:
        raise DataError(f"{samples.source}: --shots needs labels (class subfolders or y in the "
                        f".npz); use --samples N for unlabeled data")
    if shots is not None:
        chosen = []
        for label in np.unique(samples.y):
            idx = np.flatnonzero(samples.y == label)
            if len(idx) < shots:
                name = samples.classes[_class_pos(samples, label)] if samples.classes else str(label)
                raise DataError(f"{samples.source}: class '{name}' has {len(idx)} samples, fewer than "
                                f"--shots {shots}")
            chosen.append(rng.choice(idx, size=shots, replace=False))
        calib = np.sort(np.concatenate(chosen))
    else:
        n = len(samples) if count is None else count
        if n > len(samples):
            raise DataError(f"{samples.source}: --samples {n} asks for more than the {len(samples)} available")
        calib = np.sort(rng.choice(len(samples), size=n, replace=False))
    rest = np.setdiff1d(np.arange(len(samples)), calib)
    return FewShot(samples.subset(calib), samples.subset(rest) if len(rest) else None)


HOLD_OUT_SHARE = 0.2  # of the shots, set aside to measure fidelity where nothing else was left over
HOLD_OUT_FROM = 10  # unlabeled samples needed before any is set aside (per class: 5, so that 4 stay)


def set_aside(shots: FewShot, seed: int) -> tuple[FewShot, int]:
    """Where every sample became a shot, set HOLD_OUT_SHARE of them aside (per class where labeled)
    as the held-out set, so that fidelity is measured on inputs the solver did not see; too few
    shots are all kept for the statistics. Returns the new split and how many were set aside."""
    calib, rng = shots.calib, np.random.default_rng([seed, 7])
    if calib.y is not None:
        out = [rng.choice(idx, size=int(HOLD_OUT_SHARE * len(idx)), replace=False)
               for idx in (np.flatnonzero(calib.y == label) for label in np.unique(calib.y))]
        held = np.concatenate(out)
    else:
        held = rng.choice(len(calib), size=int(round(HOLD_OUT_SHARE * len(calib))), replace=False) \
            if len(calib) >= HOLD_OUT_FROM else np.array([], int)
    if not len(held):
        return shots, 0
    keep = np.setdiff1d(np.arange(len(calib)), held)
    return FewShot(calib.subset(keep), calib.subset(np.sort(held))), len(held)


def _class_pos(samples: Samples, label: int) -> int:
    labels = _class_indices(samples.classes or [])
    return labels.index(int(label)) if int(label) in labels else 0
