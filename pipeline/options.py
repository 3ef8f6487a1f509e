"""The command line's options: parsers for their values, the groups the commands share, and the
headings `--help` lists them under."""
from __future__ import annotations

from pathlib import Path

import click

def _int_list(ctx, param, value: str, what: str = "batch sizes") -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter(f"{what} must be positive integers")
    return out


def parse_shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(_int_list(ctx, param, value, "dimensions"))


def _providers(ctx, param, value: str) -> list[str]:
    from pipeline.runtime import PROVIDERS

    out = [v.strip().lower() for v in value.split(",") if v.strip()] if value else []
    for v in out:
        name, _, threads = v.partition(":")
        if name not in PROVIDERS or (threads and not threads.isdigit()):
            raise click.BadParameter(f"unknown provider '{v}' (choose from {', '.join(PROVIDERS)}; "
                                     f"NAME:N for N intra-op threads, e.g. cpu:1)")
    return out


def _floats(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{value}'") from None


def _auto_or(parse, valid, expected: str):
    """Callback for an option that takes 'auto' (given as None) or a value `valid` accepts."""
    def callback(ctx, param, value: str):
        if value == "auto":
            return None
        try:
            parsed = parse(value)
        except ValueError:
            parsed = None
        if parsed is None or not valid(parsed):
            raise click.BadParameter(f"expected auto or {expected}, got '{value}'")
        return parsed
    return callback


_mu = _auto_or(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_factor = _auto_or(int, lambda v: v >= 1, "a whole number from 1")


def _size(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 224x224, got '{value}'") from None
    return [h, w]


def _memory(ctx, param, value: str | None) -> int:
    from pipeline.limits import default_budget, parse_size

    if value is None:
        return default_budget()
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


memory_option = click.option(
    "--max-memory", callback=_memory, help="Refuse any tensor or data array declared larger than this "
    "(e.g. 2G), before reading it. Default: half of physical memory.")


# --help lists options under these headings, in the order a user meets them; unlisted ones come last
SECTIONS = {
    "Data and output": ["data", "shots", "samples", "seed", "eval_data", "output", "report_path", "as_json",
                        "force", "quiet", "config"],
    "What to prune": ["ratio", "target_flops", "target_speedup", "target_latency_ms", "widths", "scope", "uniform",
                      "exclude", "round_to"],
    "How": ["method", "mu", "augment", "augment_factor", "target_refine", "solver", "damp", "pgd_iters", "pgd_lr",
            "device"],
    "Quality gates (exit 7, nothing written)": ["max_accuracy_drop", "min_fidelity", "min_speedup"],
    "After pruning": ["finetune_steps", "finetune_lr", "quantize", "quant_calibration", "quant_activations",
                      "max_quant_error", "quant_speed_check"],
    "Timing": ["no_bench", "providers", "batches", "runs", "threads", "warmup", "rounds", "shape",
               "target_provider", "target_batch"],
    "Image preprocessing": ["preprocess_file", "size", "channels", "scale", "mean", "std", "layout"],
}


class Sectioned(click.Command):
    """A command whose --help groups its options under SECTIONS' headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)
                   if isinstance(p, click.Option)}  # arguments are in the usage line (click 8.5 lists them too)
        records = {name: rec for name, rec in records.items() if rec is not None}
        listed = {name for names in SECTIONS.values() for name in names}
        headings = [*SECTIONS.items(), ("Other options", [n for n in records if n not in listed])]
        for heading, names in headings:
            rows = [records[n] for n in names if n in records]
            if rows:
                with formatter.section(heading):
                    formatter.write_dl(rows)


def prune_options(fn):
    opts = [
        click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
                     show_default=True, help="Share of each prunable channel group's channels to KEEP."),
        click.option("--target-flops", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Instead of --ratio: keep at most this share of the model's FLOPs (e.g. 0.25 for 4x "
                     "fewer): the widest one ratio for all within it, refined by --target-refine."),
        click.option("--target-speedup", type=click.FloatRange(1, min_open=True),
                     help="Instead of --ratio: be this many times faster than the original, timed against it on "
                     "--target-provider at --target-batch (at most 4 prune-and-time rounds), refined by "
                     "--target-refine."),
        click.option("--target-latency-ms", type=click.FloatRange(0, min_open=True),
                     help="Like --target-speedup, with a latency in milliseconds as the goal."),
        click.option("--target-provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
                     show_default=True, help="Where a latency target is measured."),
        click.option("--target-batch", type=click.IntRange(1), default=1, show_default=True,
                     help="Batch size a latency target is timed at, on --threads threads: those the model is served "
                     "with."),
        click.option("--widths", type=click.Path(path_type=Path, dir_okay=False), metavar="REPORT",
                     help="Instead of --ratio: prune each channel group to its width in REPORT, an earlier --report "
                     "(groups matched by the layers that write them); replays a target's result, nothing timed."),
        click.option("--target-refine", type=click.IntRange(0), default=24, show_default=True,
                     help="Held-out prunings spent refining a target's widths by local search from one ratio for "
                     "all; 0: none (--target-flops then allocates widths from the solver's loss curves)."),
        click.option("--method", type=click.Choice(["cross", "layerwise", "soft", "l1", "auto"]), default="auto",
                     show_default=True, help="cross (the paper), layerwise, soft, l1 (magnitude, no refit), or "
                     "auto: the one that stays closest to the teacher on held-out shots (docs/design.md)."),
        click.option("--mu", default="auto", show_default=True, callback=_mu,
                     help="Weight of the teacher's input in cross and soft; auto: chosen with --method auto, else the "
                     "method's usual mu (cross 0.6, soft 0.3)."),
        click.option("--solver", type=click.Choice(["closed", "pgd"]), default="closed", show_default=True,
                     help="closed: exact least squares with greedy group-OBS selection; pgd: the paper's "
                     "Adam with a shrinking top-k proximal step."),
        click.option("--damp", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True,
                     help="Ridge added to each layer's Gram matrix, relative to its mean diagonal."),
        click.option("--scope", type=click.Choice(["internal", "all"]), default="internal", show_default=True,
                     help="internal: prune only channels written by one layer (as the paper did for "
                     "ResNets); all: also channels tied across layers by residual Adds, gating Muls and Concats, "
                     "with --ratio's FLOPs spread over the groups by their loss curves where held-out shots agree."),
        click.option("--uniform", is_flag=True,
                     help="With --scope all: every group at --ratio, its FLOPs not spread."),
        click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Leave whole every channel group with a producer or consumer whose node name "
                     "matches this shell pattern (repeatable; `crossprune inspect` lists the names)."),
        click.option("--round-to", type=click.IntRange(0), default=0, show_default=True,
                     help="Round kept channels to a multiple of this; 0: onnxruntime's CPU channel block (8 or 16) "
                     "for wide groups, none for narrow ones."),
    ]
    return _decorate(fn, opts)


def solver_options(fn):
    """Where and how the statistics are taken and solved: the device, the paper's PGD, the shots and their variants."""
    opts = [
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where torch computes the statistics and solves; auto: a CUDA GPU if torch sees one. "
                     "onnxruntime's checks and timings are unaffected."),
        click.option("--pgd-iters", type=click.IntRange(1), default=3000, show_default=True),
        click.option("--pgd-lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling the shots."),
        click.option("--augment", default="flip,shift:2,mixup:0.5,cutmix:0.5", show_default=True,
                     help="More inputs per shot for the statistics: flip, shift[:px], scale[:f], noise[:f], "
                     "mixup[:share], cutmix[:share], or none; each kept only if the teacher's answers survive it."),
        click.option("--augment-factor", default="auto", show_default=True, callback=_factor,
                     help="Inputs per shot, the shot included (1: no augmentation); auto: nearest to 80 inputs in "
                     "all, at most 8 per shot."),
        click.option("--shots", type=click.IntRange(1), help="Samples per class (labeled data)."),
        click.option("--samples", type=click.IntRange(1), help="Number of samples (unlabeled data)."),
    ]
    return _decorate(fn, opts)


def data_options(fn):
    opts = [
        click.option("--eval-data", type=click.Path(path_type=Path),
                     help="Separate labeled data for accuracy; default: the samples not drawn as shots."),
        click.option("--preprocess", "preprocess_file", type=click.Path(path_type=Path),
                     help="Preprocessing JSON (default: <model>.preprocess.json beside the model)."),
        click.option("--size", callback=_size, help="Resize images to HxW."),
        click.option("--channels", type=click.Choice(["gray", "rgb", "bgr"]), help="Channel order of images."),
        click.option("--scale", type=float, help="Pixels are divided by this first (default 255)."),
        click.option("--mean", callback=_floats, help="Per-channel mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", callback=_floats, help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Input layout of the model."),
    ]
    return _decorate(fn, opts)


def bench_options(fn):
    opts = [
        click.option("--providers", default="cpu", show_default=True, callback=_providers,
                     help="Execution providers to time: cpu, cuda, tensorrt (comma-separated); NAME:N runs it "
                     "on N intra-op threads, e.g. cpu,cpu:1 for all cores and one."),
        click.option("--batch", "batches", default="1,32", show_default=True, callback=_int_list,
                     help="Batch sizes to time (comma-separated)."),
        click.option("--runs", type=click.IntRange(1), default=50, show_default=True,
                     help="Timed runs per model, provider and batch size."),
        click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
                     help="Intra-op threads (0: onnxruntime's default, all cores)."),
    ]
    return _decorate(fn, opts)


def _decorate(fn, opts):
    """Apply click options so that they list in the order given."""
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _config(ctx: click.Context, _param, path: Path | None):
    """--config FILE: option values from TOML or YAML become the command's defaults, so that
    anything given on the command line still wins."""
    if path is None:
        return None
    try:
        text = path.read_text()
        if path.suffix.lower() == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise click.BadParameter(f"{path}: use a .toml, .yaml or .yml file")
    except click.BadParameter:
        raise
    except Exception as exc:  # unreadable file, syntax error: one line, naming the file
        from pipeline.runtime import first_line

        raise click.BadParameter(f"{path}: cannot read it ({first_line(exc)})") from exc
    if not isinstance(values, dict):
        raise click.BadParameter(f"{path}: expected a table of option = value")
    params = {p.name: p for p in ctx.command.params}
    flags = {opt.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for opt in p.opts}
    defaults = {}
    for key, value in values.items():
        name = flags.get(str(key).replace("-", "_"))
        if name is None or name == "config" or not isinstance(params[name], click.Option):
            raise click.BadParameter(f"{path}: '{key}' is not an option of `crossprune {ctx.command.name}`")
        if isinstance(value, list) and not params[name].multiple:
            value = ",".join(map(str, value))
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["config_file"] = str(path)
    return path


def output_options(fn):
    """Where results go, for the commands that write a model."""
    return _decorate(fn, [
        click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), is_eager=True,
                     expose_value=False, callback=_config,
                     help="TOML or YAML file of option values (e.g. ratio = 0.5); options given here win."),
        click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="ONNX model to write."),
        click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here."),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables."),
        click.option("--no-bench", is_flag=True, help="Skip the latency measurement."),
        click.option("--force", is_flag=True, help="Allow -o to replace an existing file (never the input model)."),
        click.option("--quiet", is_flag=True, help="No progress lines on stderr."),
    ])


def quant_options(fn):
    return _decorate(fn, [
        click.option("--quant-calibration", type=click.Choice(["minmax", "entropy", "percentile"]),
                     default="minmax", show_default=True),
        click.option("--quant-activations", type=click.Choice(["auto", "uint8", "int8"]), default="auto",
                     show_default=True,
                     help="auto: int8 when the first --providers entry is cuda or tensorrt, else uint8 (fastest "
                          "on x86 CPUs)."),
        click.option("--max-quant-error", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True,
                     help="Relative output error against the float model allowed before layers stay in float."),
        click.option("--quant-speed-check/--no-quant-speed-check", default=True, show_default=True,
                     help="Keep shallow layers (stem, depthwise) in float where timing says the model runs 5%+ "
                          "faster so; off: reproducible."),
    ])


def gate_options(fn):
    return _decorate(fn, [
        click.option("--max-accuracy-drop", type=click.FloatRange(0), help="Gate: fail (exit 7) if top-1 "
                     "accuracy drops by more than this many points (needs labels)."),
        click.option("--min-fidelity", type=click.FloatRange(0, 1), help="Gate: fail (exit 7) if top-1 "
                     "agreement with the teacher is below this. Unset: fail only on a collapse (agreement under "
                     "0.8 with labels, output error over 0.5); 0: never."),
    ])
