"""The `crossprune` command line: compress, bench, inspect and demo.

Every failure the user can fix is one line on stderr and a documented exit code (see
`crossprune --help`); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
from pathlib import Path

import click

from pipeline.errors import EXIT_CODES, CrossPruneError, GateError, UsageError

EPILOG = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def guarded(fn):
    """Turn our errors into one line and an exit code; SIGTERM behaves like Ctrl-C."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return fn(*args, **kwargs)
        except CrossPruneError as exc:
            if debug:
                raise
            click.echo(f"crossprune: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("crossprune: interrupted; no output was written", err=True)
            # not sys.exit: an interrupt that passed through code compiled from a string (torch.fx's
            # generated forward) leaves Python to end by re-raising SIGINT, whatever the exit code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except BrokenPipeError:  # the reader stopped early (| head): not an error to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at interpreter exit
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports it
        except Exception as exc:
            if debug:
                raise
            from pipeline.runtime import first_line

            if type(exc).__name__ == "OutOfMemoryError":  # torch's, from a GPU too small for this model or data
                click.echo(f"crossprune: error: the GPU ran out of memory ({first_line(exc)}); nothing was written; "
                           f"run again with --device cpu", err=True)
                sys.exit(1)
            click.echo(f"crossprune: internal error: {type(exc).__name__}: {first_line(exc)} "
                       f"(run again with --debug for the traceback)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")(wrapper)


def _int_list(ctx, param, value: str, what: str = "batch sizes") -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None
    if not out or any(v < 1 for v in out):
        raise click.BadParameter(f"{what} must be positive integers")
    return out


def _shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
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


def _say(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: click.echo(f"  {msg}", err=True))


@click.group(epilog=EPILOG)
@click.version_option(package_name="crossprune")
def main() -> None:
    """Few-shot channel pruning of ONNX models by cross distillation.

    Give it a trained ONNX model and a handful of samples; get back a smaller ONNX model with
    the same inputs and outputs, verified against the pruned network it came from, and its
    latency per execution provider.
    """
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # its error lines repeat what our one-line errors say


def prune_options(fn):
    opts = [
        click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
                     show_default=True, help="Share of each prunable channel group's channels to KEEP."),
        click.option("--target-flops", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Instead of --ratio: keep at most this share of the model's FLOPs (e.g. 0.25 for 4x "
                     "fewer), from the widest one ratio for all within it, refined by local search on held-out "
                     "shots (--target-refine)."),
        click.option("--target-speedup", type=click.FloatRange(1, min_open=True),
                     help="Instead of --ratio: be this many times faster than the original, measured on "
                     "--target-provider at --target-batch. One ratio for all is found by timing against the "
                     "original (a cached per-layer latency table predicts where to start; 4 rounds at most), then "
                     "refined by local search (--target-refine); widths allocated from the solver's loss curves "
                     "are steered the same way and compete."),
        click.option("--target-latency-ms", type=click.FloatRange(0, min_open=True),
                     help="Like --target-speedup, with a latency in milliseconds as the goal."),
        click.option("--target-provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
                     show_default=True, help="Where a latency target is measured."),
        click.option("--target-batch", type=click.IntRange(1), default=1, show_default=True,
                     help="Batch size a latency target is measured at, on --threads intra-op threads: time "
                     "it as it will be served, since at batch 1 a small model can run faster on one thread than "
                     "on all (MobileNetV2 at 64x64, 2x at batch 1: 1-1.4 points lost on one thread, over 50 on two). "
                     "A target timed on all cores times the kept model on one thread too and says so where it runs "
                     "faster there."),
        click.option("--widths", type=click.Path(path_type=Path, dir_okay=False), metavar="REPORT",
                     help="Instead of --ratio: prune each channel group to the width it has in REPORT, an earlier "
                     "--report (groups matched by the layers that write them). A --target-speedup search is "
                     "steered by timings and differs from run to run; its widths, replayed with the same shots, "
                     "--seed and options, give the same model every time, with nothing timed."),
        click.option("--target-refine", type=click.IntRange(0), default=24, show_default=True,
                     help="Prunings on held-out shots spent refining a target's widths by local search from one "
                     "ratio for all (width moved to where narrowing hurts most per millisecond or FLOP saved); "
                     "0: none. A latency target also steers widths allocated where the solver's loss per "
                     "millisecond saved is lowest, kept only if they beat the rest on shots no score has seen; "
                     "--target-flops with 0 takes such widths (loss per FLOP) instead of one ratio for all."),
        click.option("--method", type=click.Choice(["cross", "layerwise", "soft", "l1", "auto"]), default="auto",
                     show_default=True, help="cross: mu*correction + (1-mu)*imitation (the paper); layerwise: "
                     "plain regression of the student on the teacher; soft: regression from a mix of "
                     "teacher and student inputs (mu = teacher share); l1: magnitude, no refit; auto (default): "
                     "the one whose student stays closest to the teacher on a quarter of the shots held out "
                     "(on the paper-protocol tables never more than 0.3 points behind the best fixed choice)."),
        click.option("--mu", default="auto", show_default=True, callback=_mu,
                     help="Weight of the correction loss (cross) or of the teacher input (soft), or auto "
                     "(chosen like --method auto; a method given alone keeps its usual mu: 0.6 for cross, 0.3 for soft)."),
        click.option("--solver", type=click.Choice(["closed", "pgd"]), default="closed", show_default=True,
                     help="closed: exact least squares with greedy group-OBS selection; pgd: the paper's "
                     "Adam with a shrinking top-k proximal step."),
        click.option("--damp", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True,
                     help="Ridge added to each layer's Gram matrix, relative to its mean diagonal."),
        click.option("--scope", type=click.Choice(["internal", "all"]), default="internal", show_default=True,
                     help="internal: prune only channels written by one layer (as the paper did for "
                     "ResNets); all: also channels tied across layers by residual Adds, gating Muls and Concats."),
        click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Leave whole every channel group with a producer or consumer whose node name "
                     "matches this shell pattern (repeatable; `crossprune inspect` lists the names)."),
        click.option("--round-to", type=click.IntRange(0), default=0, show_default=True,
                     help="Round each group's kept channels to a multiple of this; 0: onnxruntime's CPU "
                     "channel block (16 on AVX-512 CPUs, else 8) for groups of four blocks or more, 8 for "
                     "groups of 32 or more, none for smaller ones (a width between two multiples runs as "
                     "slowly as the next). TensorRT in fp16/int8 prefers 16."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where torch runs the model's twin, the layer statistics and the solver (onnxruntime's "
                     "checks and timings are unaffected); auto: a CUDA GPU where torch sees one, else the CPU."),
        click.option("--pgd-iters", type=click.IntRange(1), default=3000, show_default=True),
        click.option("--pgd-lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling the shots."),
        click.option("--augment", default="flip,shift:2,mixup:0.5,cutmix:0.5", show_default=True,
                     help="Transforms that turn each shot into more inputs for the layer statistics: "
                     "flip, shift[:pixels], scale[:fraction], noise[:fraction of std], and blends of two "
                     "shots mixup[:max share] and cutmix[:max share of the area] (shares up to 0.5), "
                     "comma-separated, or none. Each is kept only if the teacher's answers on the shots "
                     "do not change under it (for a blend: stay one of the two shots' answers); flip, "
                     "shift, scale and cutmix only for NCHW images."),
        click.option("--augment-factor", default="auto", show_default=True, callback=_factor,
                     help="Inputs per shot, the shot itself included (1 turns augmentation off); auto aims "
                     "at about 80 inputs in all, at most 8 per shot."),
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
                     help="auto: symmetric int8 when the first --providers entry is cuda or tensorrt (what "
                          "TensorRT needs), else uint8 (onnxruntime's x86 CPU kernels are fastest with it)."),
        click.option("--max-quant-error", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True,
                     help="Relative output error against the float model allowed before layers stay in float."),
        click.option("--quant-speed-check/--no-quant-speed-check", default=True, show_default=True,
                     help="Time shallow layers (a stem conv over few channels, depthwise convs) in float vs "
                          "int8 on the first --providers entry at the largest --batch; keep them in float "
                          "where the whole model measures 5%+ faster. Off: the layers kept are reproducible."),
    ])


def gate_options(fn):
    return _decorate(fn, [
        click.option("--max-accuracy-drop", type=click.FloatRange(0), help="Gate: fail (exit 7) if top-1 "
                     "accuracy drops by more than this many points (needs labels)."),
        click.option("--min-fidelity", type=click.FloatRange(0, 1), help="Gate: fail (exit 7) if top-1 "
                     "agreement with the teacher is below this (no labels needed)."),
    ])


def _quant_config(quant_calibration: str, quant_activations: str, max_quant_error: float, quant_speed_check: bool):
    from pipeline.quantize import QuantConfig

    return QuantConfig(calibration=quant_calibration, activations=quant_activations, max_error=max_quant_error,
                       speed_provider=QuantConfig.speed_provider if quant_speed_check else None)


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise UsageError(f"-o {output}: file exists; pass --force to replace it")


def _finish(result, output: Path, report_path: Path | None, as_json: bool, text: str) -> None:
    """Print and save the report; a failed gate then ends the command with exit 7."""
    verdict = f"wrote {output}" if result.passed else f"gate failed, {output} not written"
    _emit(result.report, report_path, as_json, f"{text}\n\n{verdict}")
    if not result.passed:
        more = f" (and {len(result.failures) - 1} more)" if len(result.failures) > 1 else ""
        raise GateError(f"{result.failures[0]}{more}; {output} was not written"
                        + (f", report in {report_path}" if report_path else ""))


def _options(data, shots, samples, seed, augment, augment_factor, ratio, method, mu, solver, damp, scope, exclude, round_to,
             device,
             target_flops, target_speedup, target_latency_ms, target_provider, target_batch, target_refine, widths,
             pgd_iters, pgd_lr, max_accuracy_drop, min_fidelity, min_speedup,
             eval_data, preprocess_file, size, channels, scale, mean, std, layout, providers, batches,
             runs, threads, no_bench, max_memory):
    from pipeline.choose import usual_mu
    from pipeline.prune import PruneConfig
    from pipeline.target import LatencyTarget
    from pipeline.workflow import CompressOptions

    given = [f"--{n}" for n, v in (("target-flops", target_flops), ("target-speedup", target_speedup),
                                   ("target-latency-ms", target_latency_ms), ("widths", widths)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one target, not {' and '.join(given)}")
    target = None
    if target_speedup is not None or target_latency_ms is not None:
        target = LatencyTarget(target_speedup, target_latency_ms, target_provider, target_batch,
                               refine_evals=target_refine)

    overrides = {"size": size, "channels": channels, "scale": scale, "mean": mean, "std": std, "layout": layout}
    # "--method cross" alone means the usual cross (mu 0.6); mu is searched when asked for or with auto
    mu_default = click.get_current_context().get_parameter_source("mu") == click.core.ParameterSource.DEFAULT
    return CompressOptions(
        data=data, shots=shots, samples=samples, seed=seed,
        auto_method=method == "auto", auto_mu=mu is None and (method == "auto" or not mu_default),
        prune=PruneConfig(ratio=ratio, method="cross" if method == "auto" else method,
                          mu=usual_mu(method) if mu is None else mu, solver=solver, damp=damp,
                          round_to=round_to, scope=scope, exclude=tuple(exclude), pgd_iters=pgd_iters, pgd_lr=pgd_lr),
        max_accuracy_drop=max_accuracy_drop, min_fidelity=min_fidelity, min_speedup=min_speedup,
        eval_data=eval_data, preprocess_file=preprocess_file, preprocess=overrides,
        providers=[] if no_bench else providers, batches=batches, bench_runs=runs, threads=threads,
        max_memory=max_memory, augment=augment, augment_factor=augment_factor, target_flops=target_flops,
        flops_refine=target_refine,
        target=target, widths_from=widths, device=device)


def _emit(report: dict, report_path: Path | None, as_json: bool, text: str) -> None:
    from exporters.write import atomic_write
    from pipeline.report import dumps

    if report_path is not None:
        atomic_write(report_path, dumps(report).encode())
    click.echo(dumps(report) if as_json else text)


@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Folder of images in class subfolders (or flat, unlabeled), or an .npz with x (NCHW "
              "float32, preprocessed) and optional y.")
@output_options
@gate_options
@click.option("--min-speedup", type=click.FloatRange(0, min_open=True), help="Gate: fail (exit 7) if any timed "
              "provider and batch size is less than this many times faster.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="Quantize the slim model to INT8 (QDQ, per-channel weights), calibrated on the same shots.")
@click.option("--finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="After verification, Adam steps of end-to-end distillation of the slim model on the shots "
              "and their augmented variants (no labels; BatchNorm statistics frozen). 0: none.")
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of --finetune-steps.")
@quant_options
@memory_option
@prune_options
@data_options
@bench_options
@guarded
def compress(model, data, output, report_path, as_json, no_bench, force, quiet, max_memory, quantize,
             finetune_steps, finetune_lr, quant_calibration, quant_activations, max_quant_error,
             quant_speed_check, **kw):
    """Prune MODEL from a few samples and write a slim, verified ONNX model.

    \b
    Example:
      crossprune compress model.onnx --data shots/ --shots 5 --ratio 0.5 \\
          -o model.slim.onnx --report report.json
    """
    from pipeline.finetune import FinetuneConfig
    from pipeline.render import summary
    from pipeline.workflow import compress as run

    _check_output(output, force)
    options = _options(data, no_bench=no_bench, max_memory=max_memory, **kw)
    options.int8 = quantize == "int8"
    options.finetune = FinetuneConfig(steps=finetune_steps, lr=finetune_lr)
    options.quant = _quant_config(quant_calibration, quant_activations, max_quant_error, quant_speed_check)
    result = run(model, options, output, _say(quiet or as_json))
    result.report["options"] = _effective_options()
    _finish(result, output, report_path, as_json, summary(result.report))


def _effective_options() -> dict:
    """Every option's value as the command ran (command line over --config over defaults)."""
    ctx = click.get_current_context()
    values = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in ctx.params.items()}
    return {"config_file": ctx.meta.get("config_file"), **values}


@main.command("quantize", epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Calibration samples: a folder of images or an .npz (as for compress).")
@output_options
@click.option("--shots", type=click.IntRange(1), help="Calibration samples per class (labeled data).")
@click.option("--samples", type=click.IntRange(1), help="Calibration samples in total (unlabeled data).")
@click.option("--seed", type=int, default=0, show_default=True)
@quant_options
@gate_options
@memory_option
@data_options
@bench_options
@guarded
def quantize_cmd(model, data, output, report_path, as_json, no_bench, force, quiet, shots, samples, seed,
                 quant_calibration, quant_activations, max_quant_error, quant_speed_check, max_accuracy_drop,
                 min_fidelity, max_memory, eval_data, preprocess_file, size, channels, scale, mean, std, layout,
                 providers, batches, runs, threads):
    """INT8-quantize MODEL (no pruning), calibrated on a few samples, with sensitive layers kept in float.

    \b
    Example:
      crossprune quantize model.onnx --data shots/ --shots 10 -o model.int8.onnx
    """
    from pipeline.render import summary
    from pipeline.workflow import CompressOptions, quantize_only

    _check_output(output, force)
    options = CompressOptions(
        data=data, shots=shots, samples=samples, seed=seed, eval_data=eval_data, preprocess_file=preprocess_file,
        preprocess={"size": size, "channels": channels, "scale": scale, "mean": mean, "std": std, "layout": layout},
        providers=[] if no_bench else providers, batches=batches, bench_runs=runs, threads=threads,
        max_memory=max_memory, max_accuracy_drop=max_accuracy_drop, min_fidelity=min_fidelity,
        quant=_quant_config(quant_calibration, quant_activations, max_quant_error, quant_speed_check))
    result = quantize_only(model, options, output, _say(quiet or as_json))
    result.report["options"] = _effective_options()
    _finish(result, output, report_path, as_json, summary(result.report))


@main.command(epilog=EPILOG)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Models are timed in turn, this many rounds each, so drift hits all alike.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--shape", callback=_shape, metavar="C,H,W",
              help="One sample's shape, for models whose input leaves dimensions other than the batch symbolic "
                   "(e.g. an image size exported as dynamic).")
@memory_option
@bench_options
@guarded
def bench(models, warmup, rounds, report_path, as_json, shape, max_memory, providers, batches, runs, threads):
    """Time MODELS on each execution provider and batch size; speedups are against the first.

    \b
    Example:
      crossprune bench model.onnx model.slim.onnx --providers cpu,cuda --batch 1,32
    """
    from pipeline.bench import bench as run
    from pipeline.load import load_model
    from pipeline.render import latency_table

    loaded = [(str(m), load_model(m, normalise=False, max_tensor_bytes=max_memory).original)
              for m in models]
    result = run(loaded, providers, batches, runs=runs, warmup=warmup, rounds=rounds, threads=threads,
                 progress=_say(as_json), shape=shape)
    _emit({"latency": result.to_json()}, report_path, as_json, latency_table(result.to_json()))
    if not result.timings:  # a pipeline step asked for numbers and got none: say so, and fail
        raise UsageError(f"--providers {','.join(providers)}: nothing could be timed "
                         f"({'; '.join(result.unavailable.values())})")


@main.command("report", epilog=EPILOG)
@click.argument("report_json", metavar="REPORT", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "md", "html"]), default="md", show_default=True,
              help="md: Markdown for a CI job summary; html: one self-contained page with charts.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here instead of stdout.")
@guarded
def report_cmd(report_json, fmt, output):
    """Render a saved REPORT (from --report) as text, Markdown or HTML."""
    import json

    from exporters.write import atomic_write
    from pipeline import render

    try:
        saved = json.loads(report_json.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{report_json}: not a readable JSON report ({exc})") from exc
    if not isinstance(saved, dict) or not {"latency", "chain", "groups"} & saved.keys():
        raise UsageError(f"{report_json}: not a crossprune report (no groups, chain or latency)")
    text = {"text": render.summary, "md": render.markdown, "html": render.html}[fmt](saved)
    if output:
        atomic_write(output, text.encode())
    else:
        click.echo(text, nl=False)


@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@memory_option
@guarded
def inspect(model, as_json, max_memory):
    """List MODEL's channel groups, whether each can be pruned (and why not), and layer FLOPs."""
    from pipeline import analyze, flops
    from pipeline.graph import GraphView
    from pipeline.load import load_model
    from pipeline.render import table
    from pipeline.report import dumps

    loaded = load_model(model, max_tensor_bytes=max_memory)
    view = GraphView(loaded.proto)
    groups = analyze.find_groups(view)
    costs = flops.layer_costs(view)
    if as_json:
        click.echo(dumps({"groups": [g.to_json() for g in groups], "layers": [c.to_json() for c in costs],
                          "normalisation": loaded.notes}))
        return
    click.echo(table(["group", "producers", "channels", "consumers", "prunable"],
                      [[str(g.id), _names(g.producers), str(g.channels) + (f" ({g.size}x{g.unit})" if g.unit > 1 else ""),
                        _names([c.node for c in g.consumers]), _prunable(g)] for g in groups]))
    prunable = sum(g.channels for g in groups if g.prunable)
    internal = sum(g.channels for g in groups if g.prunable and not g.coupling)
    total = sum(g.channels for g in groups)
    click.echo(f"\nchannels prunable: {internal} of {total} with --scope internal, {prunable} with --scope all")
    click.echo()
    click.echo(table(["layer", "op", "MFLOPs", "params"],
                      [[c.node, c.op, f"{c.flops / 1e6:.2f}", str(c.params)] for c in costs]))


def _names(names: list[str], show: int = 3) -> str:
    return ", ".join(names[:show]) + (f" +{len(names) - show}" if len(names) > show else "") if names else "-"


def _prunable(group) -> str:
    if not group.prunable:
        return f"no: {group.reason}"
    return "yes" if not group.coupling else "with --scope all (coupled)"


@main.command(epilog=EPILOG)
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Where to write the slim demo model (default: a temporary folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of tables.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--shots", type=click.IntRange(1, 10), default=5, show_default=True)
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Share of channels kept.")
@click.option("--method", type=click.Choice(["auto", "cross", "layerwise", "soft", "l1"]), default="auto",
              show_default=True, help="auto: chosen (with mu) on a quarter of the shots held out, as in compress.")
@click.option("--seed", type=int, default=0, show_default=True)
@guarded
def demo(output, as_json, quiet, shots, ratio, method, seed):
    """Compress the embedded Fashion-MNIST VGG-style teacher from a few shots per class.

    Prints accuracy before and after on held-out test images, FLOPs and parameters before and
    after, and CPU latency before and after.
    """
    from pipeline.workflow import CompressOptions
    from pipeline.workflow import compress as run
    from pipeline.choose import usual_mu
    from pipeline.prune import PruneConfig
    from pipeline.render import summary

    folder = Path(__file__).resolve().parent / "assets"
    with tempfile.TemporaryDirectory() as tmp:
        target = output or Path(tmp) / "demo_vgg.slim.onnx"
        options = CompressOptions(data=folder / "demo_shots", shots=shots, seed=seed,
                                  prune=PruneConfig(ratio=ratio, method="cross" if method == "auto" else method,
                                                    mu=usual_mu(method)),
                                  auto_method=method == "auto", auto_mu=method == "auto",
                                  eval_data=folder / "demo_eval.npz")
        result = run(folder / "demo_vgg.onnx", options, target, _say(quiet or as_json))
        _emit(result.report, None, as_json, summary(result.report) +
              (f"\n\nwrote {target}" if output else ""))
