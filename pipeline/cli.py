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
from typing import TYPE_CHECKING, Any, Callable

import click

from pipeline.errors import EXIT_CODES, CrossPruneError, GateError, UsageError
from pipeline.options import (Sectioned, bench_options, data_options, gate_options, memory_option, output_options,
                              parse_shape, prune_options, quant_options, solver_options)

if TYPE_CHECKING:
    from pipeline.search import Mode
    from pipeline.workflow import CompressOptions

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


def _quant_config(quant_calibration: str, quant_activations: str, max_quant_error: float, quant_speed_check: bool):
    from pipeline.quantize import QuantConfig

    return QuantConfig(calibration=quant_calibration, activations=quant_activations, max_error=max_quant_error,
                       speed_provider=QuantConfig.speed_provider if quant_speed_check else None)


def _check_output(output: Path, force: bool, report_path: Path | None = None) -> None:
    """Before any work: the files can be written where they are asked for."""
    if output.exists() and not force:
        raise UsageError(f"-o {output}: file exists; pass --force to replace it")
    for option, path in (("-o", output), ("--report", report_path)):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{option} {path}: the folder {path.parent} does not exist; create it first")


def _finish(result, output: Path, report_path: Path | None, as_json: bool, text: str) -> None:
    """Print and save the report; a failed gate then ends the command with exit 7."""
    verdict = f"wrote {output}" if result.passed else f"gate failed, {output} not written"
    _emit(result.report, report_path, as_json, f"{text}\n\n{verdict}")
    if not result.passed:
        more = f" (and {len(result.failures) - 1} more)" if len(result.failures) > 1 else ""
        raise GateError(f"{result.failures[0]}{more}; {output} was not written"
                        + (f", report in {report_path}" if report_path else ""))


def _options(data: Path, no_bench: bool, max_memory: int, kw: dict[str, Any]) -> CompressOptions:
    """CompressOptions from the compress command's values: `kw` holds click's values by parameter
    name. The target, the pruning and the preprocessing are taken out of it by what builds them;
    the values left are CompressOptions' fields of the same names."""
    from pipeline.workflow import CompressOptions

    mode = _take(_mode, kw)  # first: two targets are refused before anything else is read
    pruning = _take(_pruning, kw)
    preprocess = {name: kw.pop(name) for name in ("size", "channels", "scale", "mean", "std", "layout")}
    providers, runs = kw.pop("providers"), kw.pop("runs")
    return CompressOptions(data=data, mode=mode, **pruning, preprocess=preprocess,
                           providers=[] if no_bench else providers, bench_runs=runs, max_memory=max_memory, **kw)


def _take(build: Callable[..., Any], kw: dict[str, Any]) -> Any:
    """`build` called with the values in `kw` that its parameters name, which leave `kw`."""
    from inspect import signature  # not at the top: the `inspect` command takes that name

    return build(**{name: kw.pop(name) for name in signature(build).parameters})


def _mode(target_flops: float | None, target_speedup: float | None, target_latency_ms: float | None,
          target_provider: str, target_batch: int, target_refine: int, widths: Path | None, uniform: bool) -> Mode:
    """The one target given, or the ratio; two are a UsageError naming both."""
    from pipeline.search import FlopsShare, LatencyTarget, Ratio, WidthsFrom, one

    latency = lambda **goal: LatencyTarget(**goal, provider=target_provider, batch=target_batch,
                                           refine_evals=target_refine)
    mode = one(None if target_flops is None else FlopsShare(target_flops, refine_evals=target_refine),
               None if target_speedup is None else latency(speedup=target_speedup),
               None if target_latency_ms is None else latency(latency_ms=target_latency_ms),
               None if widths is None else WidthsFrom(widths), ratio=Ratio(spread=not uniform))
    if uniform and not isinstance(mode, Ratio):
        raise UsageError(f"--uniform is about --ratio; {mode.given_as} chooses its own widths")
    return mode


def _pruning(ratio: float, method: str, mu: float | None, solver: str, damp: float, scope: str,
             exclude: tuple[str, ...], round_to: int, pgd_iters: int, pgd_lr: float) -> dict[str, Any]:
    """CompressOptions' prune, auto_method and auto_mu."""
    from pipeline.choose import usual_mu
    from pipeline.prune import PruneConfig

    # "--method cross" alone means the usual cross (mu 0.6); mu is searched when asked for or with auto
    mu_default = click.get_current_context().get_parameter_source("mu") == click.core.ParameterSource.DEFAULT
    return {"auto_method": method == "auto", "auto_mu": mu is None and (method == "auto" or not mu_default),
            "prune": PruneConfig(ratio=ratio, method="cross" if method == "auto" else method,
                                 mu=usual_mu(method) if mu is None else mu, solver=solver, damp=damp,
                                 round_to=round_to, scope=scope, exclude=tuple(exclude), pgd_iters=pgd_iters,
                                 pgd_lr=pgd_lr)}


def _emit(report: dict, report_path: Path | None, as_json: bool, text: str) -> None:
    from exporters.write import atomic_write
    from pipeline.report import dumps

    if report_path is not None:
        atomic_write(report_path, dumps(report).encode())
    click.echo(dumps(report) if as_json else text)


@main.command(cls=Sectioned, epilog=EPILOG)
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
              help="Adam steps of end-to-end distillation of the slim model on the shots after verification "
              "(no labels); 0: none.")
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of --finetune-steps.")
@quant_options
@memory_option
@prune_options
@solver_options
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

    _check_output(output, force, report_path)
    options = _options(data, no_bench, max_memory, kw)
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


@main.command("quantize", cls=Sectioned, epilog=EPILOG)
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

    _check_output(output, force, report_path)
    options = CompressOptions(
        data=data, shots=shots, samples=samples, seed=seed, eval_data=eval_data, preprocess_file=preprocess_file,
        preprocess={"size": size, "channels": channels, "scale": scale, "mean": mean, "std": std, "layout": layout},
        providers=[] if no_bench else providers, batches=batches, bench_runs=runs, threads=threads,
        max_memory=max_memory, max_accuracy_drop=max_accuracy_drop, min_fidelity=min_fidelity,
        quant=_quant_config(quant_calibration, quant_activations, max_quant_error, quant_speed_check))
    result = quantize_only(model, options, output, _say(quiet or as_json))
    result.report["options"] = _effective_options()
    _finish(result, output, report_path, as_json, summary(result.report))


@main.command(cls=Sectioned, epilog=EPILOG)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Models are timed in turn, this many rounds each, so drift hits all alike.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--shape", callback=parse_shape, metavar="C,H,W",
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
@click.option("--shape", "--input-shape", "shape", callback=parse_shape, metavar="C,H,W",
              help="One sample's shape, binding the input's free dimensions (FLOPs need them).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Samples (as for compress) whose shape binds the input's free dimensions.")
@memory_option
@guarded
def inspect(model, as_json, shape, data, max_memory):
    """List MODEL's channel groups, whether each can be pruned (and why not), and layer FLOPs."""
    from pipeline import analyze, flops
    from pipeline.graph import GraphView
    from pipeline.load import load_model, refuse_quantized, sized
    from pipeline.render import table
    from pipeline.report import dumps

    loaded = load_model(model, max_tensor_bytes=max_memory)
    refuse_quantized(model, loaded.proto, "inspect the float model it was made from")
    if shape is None and data is not None:
        from pipeline.data import load_samples, preprocess_for

        spec = loaded.inputs[0]
        shape = load_samples(data, spec, preprocess_for(model, spec)[0], max_memory).x.shape[1:]
    free = [i for i, d in enumerate(loaded.inputs[0].shape[1:]) if not isinstance(d, int)] if loaded.inputs else []
    if shape is not None and len(shape) + 1 != len(loaded.inputs[0].shape):
        raise UsageError(f"--shape {','.join(map(str, shape))}: {model}'s input has {len(loaded.inputs[0].shape) - 1} "
                         f"dimensions besides the batch")
    proto = sized(loaded.proto, tuple(shape)) if shape is not None else loaded.proto
    view = GraphView(proto)
    groups = analyze.find_groups(view)
    costs = flops.layer_costs(view)
    if as_json:
        click.echo(dumps({"groups": [g.to_json() for g in groups], "layers": [c.to_json() for c in costs],
                          "sample_shape": list(shape) if shape is not None else None,
                          "normalisation": loaded.notes}))
        return
    click.echo(table(["group", "producers", "channels", "consumers", "prunable"],
                      [[str(g.id), _names(g.producers),
                        str(g.channels) + (f" ({g.size}{' heads' if g.attention else ''}x{g.unit})"
                                           if g.unit > 1 else ""),
                        _names([c.node for c in g.consumers]), _prunable(g)] for g in groups]))
    prunable = sum(g.channels for g in groups if g.prunable)
    internal = sum(g.channels for g in groups if g.prunable and not g.coupling)
    total = sum(g.channels for g in groups)
    click.echo(f"\nchannels prunable: {internal} of {total} with --scope internal, {prunable} with --scope all")
    click.echo()
    click.echo(table(["layer", "op", "MFLOPs", "params"],
                      [[c.node, c.op, f"{c.flops / 1e6:.2f}", str(c.params)] for c in costs]))
    if shape is not None:
        click.echo(f"\nFLOPs per sample of shape {'x'.join(map(str, shape))}")
    elif free:
        click.echo(f"\nthe input leaves dimensions {', '.join(str(i + 1) for i in free)} free: FLOPs where they "
                   f"matter read 0; give --shape C,H,W or --data")


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
