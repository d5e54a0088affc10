"""The ``adkit`` command line: a thin click layer over :mod:`adkit.api`.

Importing this module, ``adkit --help`` and ``adkit --version`` do not import torch: :mod:`adkit.api` is imported
by the commands that run, and plugins' components load on first use (adkit.core.plugins.Catalog)."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adkit.core.plugins import get_catalog
from adkit.run.config import RunConfig, build_config, load_config_file


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The grammar shared by run, train, test, predict and bench."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of these options."),
        click.option("--detector", "-d", multiple=True, help="Detector spec, name[:key=value,...]; repeat for an ensemble."),
        click.option("--loss", multiple=True, help="Loss spec added to the detector's defaults, e.g. color:weight=0.1."),
        click.option("--loss-only", is_flag=True, default=None, help="The --loss specs replace the detector's default losses."),
        click.option("--post", multiple=True, help="Post-processor spec; repeat to chain them in order."),
        click.option("--scorer", help="Scorer spec (map -> image score)."),
        click.option("--sampler", help="Sampler spec for energy-based detectors."),
        click.option("--backbone", help="Backbone spec for detectors on pretrained features, e.g. timm:model=resnet18,weights=r18.pth."),
        click.option("--ensemble", help="Ensemble scorer spec combining several detectors."),
        click.option("--data", help="Dataset name (default: synthetic)."),
        click.option("--category", multiple=True, help="Category or group (e.g. textures); repeatable."),
        click.option("--root", type=click.Path(), help="Dataset root folder."),
        click.option("--normal", type=click.Path(), help="folder data: your normal images (implies --data folder)."),
        click.option("--abnormal", type=click.Path(), help="folder data: your anomalous images."),
        click.option("--masks", type=click.Path(), help="folder data: masks of the anomalous images."),
        click.option("--preset", help="Preset: quick (CPU minutes) or paper (the paper's settings)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (auto: CUDA if present)."),
        click.option("--seed", type=int, help="Random seed (default 0)."),
        click.option("--out", type=click.Path(), help="Output folder (default runs/<detector>-<data>-<category>-<time>)."),
        click.option("--image-size", help="Input size: a side (256) or WIDTHxHEIGHT (512x256, with --tile); "
                                          "overrides the preset's."),
        click.option("--resize", type=click.Choice(["squash", "pad", "crop"]),
                     help="Images of another shape: squash to the input size, pad (keep the aspect ratio, repeat "
                          "the border) or crop (keep it, cut the centre). Default squash; with no geometry option at all, "
                          "images 1.5 times longer than wide (or wider than long) are tiled at their own aspect."),
        click.option("--tile", type=int, help="Cut the input into square tiles of this side for the detector; "
                                              "maps are stitched back (large images, small defects)."),
        click.option("--overlap", type=float, help="Fraction of a tile its neighbours share, in [0, 1) (default 0)."),
        click.option("--batch-size", type=int, help="Override the preset's batch size."),
        click.option("--steps", type=int, help="Override the preset's number of training steps."),
        click.option("--checkpoint-every", type=int, help="Write a checkpoint every N steps."),
        click.option("--anomaly-source", type=click.Path(), help="Texture folder (DTD layout) for anomaly synthesis."),
        click.option("--skip-bad", is_flag=True, default=None, help="Skip unreadable images (counted in the report)."),
        click.option("--compile", is_flag=True, default=None, help="torch.compile the training step and the detector's map (first steps are slower)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="bf16 autocast (auto: on GPUs; on a CPU with bf16 instructions, for the backbone of PatchCore and PaDiM where a check on the validation images allows it)."),
        click.option("--threshold", help="Decision threshold policy: fpr:RATE (default fpr:0.01, fitted on normal "
                                          "validation images), f1 (needs defective validation images) or value:X."),
        click.option("--pixel-map", type=click.Choice(["raw", "post"]), help="Pixel metrics on the raw or post-processed map."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(config_file: str | None, **flags: Any) -> Any:
        file_values = load_config_file(config_file) if config_file else {}
        names = set(RunConfig.__dataclass_fields__)
        config = build_config(file_values, {k: v for k, v in flags.items() if k in names})
        rest = {k: v for k, v in flags.items() if k not in names}
        return func(config=config, **rest)

    return wrapper


def warn_about_plugins() -> None:
    """One line on stderr per broken plugin and per plugin warning (a component dropped for a name clash)."""
    catalog = get_catalog()
    for record in catalog.broken():
        click.echo(f"warning: plugin {record.name} is broken ({record.error}); see `adkit plugins`", err=True)
    for record in catalog.plugins.values():
        for warning in record.warnings:
            click.echo(f"warning: {warning}", err=True)


class AdkitGroup(click.Group):
    """The root group: plugins' commands are added the first time the command list is needed."""

    _commands_from = None  # the catalog whose plugins added their commands

    def add_plugin_commands(self) -> None:
        """Let plugins add their commands (once per loaded catalog); a plugin whose command hook fails is marked
        broken."""
        catalog = get_catalog()
        if self._commands_from is not catalog:
            self._commands_from = catalog
            catalog.register_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.add_plugin_commands()
        warn_about_plugins()  # --help must not leave a broken plugin's command out silently
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self.add_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        if command is None and get_catalog().broken():
            names = "; ".join(f"plugin {r.name} is broken ({r.error})" for r in get_catalog().broken())
            raise click.UsageError(f"no command {cmd_name!r}; {names} and may be the one that provides it", ctx)
        return command


# the commands that build components: the catalog loads every plugin's components before they start
COMPONENT_COMMANDS = ("run", "train", "test", "predict", "bench", "export", "update")


@click.group(cls=AdkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads of this process (default: the cores "
                                                            "it may use, shared with the other adkit processes).")
@click.version_option(package_name="adkit")
@click.pass_context
def cli(ctx: click.Context, debug: bool, threads: int | None) -> None:
    """adkit: plugin-based industrial image anomaly detection."""
    import os

    ctx.obj = {"debug": debug}
    if threads is not None:
        os.environ["ADKIT_THREADS"] = str(threads)
    if ctx.invoked_subcommand in (*COMPONENT_COMMANDS, "synth"):
        from adkit.core import threads as shared

        shared.register()
    if ctx.invoked_subcommand in COMPONENT_COMMANDS:
        get_catalog().load_components()  # so that a component dropped for a clash is reported before the run
    if ctx.invoked_subcommand != "plugins":
        warn_about_plugins()


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also list every component's parameters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: plugins and components with their parameters.")
def plugins(show_all: bool, as_json: bool) -> None:
    """List plugins and the components they register: tables on a terminal, one tab-separated line each when
    piped (e.g. to grep)."""
    from adkit import api

    cli.add_plugin_commands()  # a plugin whose command hook fails shows as broken here too
    api.print_plugins(show_all=show_all, as_json=as_json)


@cli.command()
@run_options
@click.option("--workers", type=click.IntRange(min=1),
              help="Categories trained at once, each in its own process (default: one per CPU core; 1 on a GPU).")
def run(config: RunConfig) -> None:
    """Train, then test, a detector (or an ensemble) on a dataset."""
    from adkit import api

    api.run(config)


@cli.command()
@run_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def train(config: RunConfig, resume: bool) -> None:
    """Train a detector; writes checkpoints to --out."""
    from adkit import api

    api.train(config, resume=resume)


@cli.command()
@run_options
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Checkpoint from `adkit train`.")
def test(config: RunConfig, checkpoint: str) -> None:
    """Evaluate a trained checkpoint on a dataset's test split."""
    from adkit import api

    api.test(config, checkpoint=Path(checkpoint))


@cli.command()
@run_options
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint from `adkit train` or `adkit run`.")
@click.option("--model", type=click.Path(), help="A model `adkit export` wrote (its folder or file), instead of --checkpoint.")
@click.option("--save-maps", is_flag=True, help="Also write each image's anomaly map at its own size to maps/NAME.npy.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
def predict(config: RunConfig, checkpoint: str | None, model: str | None, save_maps: bool,
            inputs: tuple[str, ...]) -> None:
    """Score images (files or folders) without labels: scores.csv and heatmap overlays."""
    from adkit import api

    api.predict(config, checkpoint=Path(checkpoint) if checkpoint else None, inputs=[Path(p) for p in inputs],
                model=Path(model) if model else None, save_maps=save_maps)


@cli.command()
@run_options
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="The fitted model to add to.")
@click.option("--from-feedback", type=click.Path(file_okay=False),
              help="adkit serve's RESULTS_DIR/<product>: add the kept images the line reported as false alarms "
                   "(and, to a detector that learns from defects, those reported defective).")
@click.option("--defects", multiple=True, type=click.Path(),
              help="Labelled defective images (files or folders) for a detector that learns from them (patchcore).")
@click.argument("images", nargs=-1, type=click.Path())
def update(config: RunConfig, checkpoint: str, from_feedback: str | None, defects: tuple[str, ...],
           images: tuple[str, ...]) -> None:
    """Add good images (files or folders) to a fitted model without refitting it: a new version (checkpoint and
    threshold) beside the old one, or in --out, with its lineage."""
    from adkit import api
    from adkit.core.errors import AdkitError

    if not images and not from_feedback and not defects:
        raise AdkitError("update: give the good images to add (files or folders), --defects, or --from-feedback DIR")
    api.update(config, checkpoint=Path(checkpoint), images=[Path(p) for p in images],
               out=Path(config.out) if config.out else None,
               from_feedback=Path(from_feedback) if from_feedback else None, defects=[Path(p) for p in defects])


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Checkpoint to export.")
@click.option("--format", "fmt", required=True,
              help="A registered export format: onnx, torchscript, or a plugin's (adkit plugins lists them).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to create (default: export-FORMAT beside the checkpoint).")
@click.option("--post", multiple=True, help="Post-processors (default: the checkpoint's).")
@click.option("--scorer", help="Scorer (default: the checkpoint's); its threshold must have been fitted (adkit test).")
@click.option("--threshold", help="Threshold policy for model.json (default: the recorded one): fpr:RATE, f1 or "
                                  "value:X, fitted on the validation scores stored beside the checkpoint.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="int8: quantize the pretrained backbone (onnx), calibrated on training images; refused unless "
                   "the validation images' scores and decisions hold (docs/deploy.md).")
@click.option("--data", help="With --quantize: the dataset the checkpoint was trained on (default: the one it "
                             "records).")
@click.option("--root", type=click.Path(), help="With --quantize: that dataset's root folder.")
def export(checkpoint: str, fmt: str, out: str | None, post: tuple[str, ...], scorer: str | None,
           threshold: str | None, quantize: str, data: str | None, root: str | None) -> None:
    """Export a checkpoint's pipeline to one file of a registered format (ONNX, TorchScript or a plugin's: images,
    threshold -> map, score, decision), with its threshold and validation scores in model.json."""
    from adkit import api

    config = build_config({}, {"post": list(post), "scorer": scorer, "threshold": threshold, "data": data,
                               "root": root})
    api.export(config, checkpoint=Path(checkpoint), fmt=fmt, out=Path(out) if out else None, quantize=quantize)


@cli.command()
@click.argument("dataset")
@run_options
@click.option("--categories", "categories", multiple=True, help="Categories or groups (comma-separated or repeated).")
@click.option("--grid", multiple=True, help="Ablation axis KEY=v1,v2 (detector, loss, preset, seed, post, scorer), e.g. post=avgpool,freqmask or seed=0,1,2; repeatable.")
def bench(config: RunConfig, dataset: str, categories: tuple[str, ...], grid: tuple[str, ...]) -> None:
    """Run a configuration (or a grid) over the categories of a dataset and print the table."""
    from adkit import api

    cats = [c for item in categories for c in item.split(",") if c]
    api.bench(config.replace(data=dataset, category=list(config.category) + cats), grid=list(grid))


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (MVTec layout).")
@click.option("--category", multiple=True, help="Categories (default: all).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--size", default=256, show_default=True, type=int, help="Image side in pixels.")
@click.option("--train", "n_train", default=60, show_default=True, type=int, help="Normal training images per category.")
@click.option("--test", "n_test", default=40, show_default=True, type=int, help="Test images per category (half defective).")
def synth(out: str, category: tuple[str, ...], seed: int, size: int, n_train: int, n_test: int) -> None:
    """Write the built-in synthetic textures to disk in the MVTec AD layout."""
    from adkit import api

    api.synth(Path(out), categories=list(category), seed=seed, size=size, n_train=n_train, n_test=n_test)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--screenshot", type=click.Path(dir_okay=False), help="Also render the page in headless Chromium "
                                                                    "to this PNG (the top 1280 x 1800 px).")
def report(folder: str, screenshot: str | None) -> None:
    """Rebuild report.html in a run, test, bench or predict folder from the files there."""
    from adkit.outputs import pages, screenshots

    page = pages.build(Path(folder))
    click.echo(f"wrote {page}")
    if screenshot:
        seconds = screenshots.screenshot(page, Path(screenshot))
        click.echo(f"rendered it to {screenshot} in {seconds:.1f} s")


@cli.command()
@click.argument("models_dir", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (non-loopback needs --token-file).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token every request but /healthz and the page needs.")
@click.option("--results", "results_dir", type=click.Path(file_okay=False), help="Folder of the decision logs (default: serve-results beside MODELS_DIR).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024), help="Most images scored together.")
@click.option("--max-wait", default=0.0, show_default=True, type=click.FloatRange(0, 10), help="Seconds a batch waits for more requests (0: it takes what queued during the previous batch).")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(1, 100000), help="Requests queued per model before 503.")
@click.option("--max-request-mb", default=32, show_default=True, type=click.IntRange(1, 4096), help="Largest request body.")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(1), help="Largest image, in pixels.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1), help="Seconds before a request gives up (504).")
def serve(models_dir: str, host: str, port: int, token_file: str | None, results_dir: str | None, batch_size: int,
          max_wait: float, queue_size: int, max_request_mb: int, max_pixels: int, timeout: float) -> None:
    """Serve every model folder under MODELS_DIR (exports or checkpoints) over HTTP: docs/serve.md."""
    from adkit.serve import serve as run

    run(Path(models_dir), host, port, Path(token_file) if token_file else None,
        Path(results_dir) if results_dir else None, batch_size=batch_size, max_wait=max_wait,
        queue_size=queue_size, max_request_bytes=max_request_mb << 20, max_pixels=max_pixels, timeout=timeout)


@cli.command("new-plugin")
@click.argument("name")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              help="A component kind to include (repeatable): detector, postprocessor, scorer, loss, sampler, "
                   "backbone, ensemble, dataset, exporter, command. Default: detector, postprocessor, scorer, command.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write (default ./adkit-NAME); must not "
                                                              "hold files.")
def new_plugin(name: str, kinds: tuple[str, ...], out: str | None) -> None:
    """Write a plugin package: a working component of each kind, its entry point, and tests that pass."""
    from adkit.app.scaffold import new_plugin as write

    folder = write(name, [k for item in kinds for k in item.split(",") if k], Path(out) if out else None)
    click.echo(f"wrote {folder}; next: cd {folder} && pip install -e \".[test]\" && pytest")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit non-zero; --debug shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="adkit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
