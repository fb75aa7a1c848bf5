"""Command-line interface: argument parsing only; each sub-command calls one function.

Every step of the pipeline is a sub-command (``segpipe <step> --help``). An option that is a
config setting (:func:`_setting`) takes its default from the config schema and is checked
against it (:mod:`segpipe.spec`), so a step run by hand does what the workflow's job does with
a config that leaves the setting out. A :class:`segpipe.SegpipeError` is printed as
``segpipe: error: <message>`` (exit code 1) instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from segpipe import SegpipeError, __version__
from segpipe.spec import check_setting, default
from segpipe.weights import IMAGENET_URLS


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as ``@path/to/file.json``."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text[1:]}: cannot read ({exc.strerror})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _json_list(text: str) -> list:
    """A JSON list given inline."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise argparse.ArgumentTypeError("not a valid JSON list") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("expected a JSON list")
    return value


def _cmd_synth(args: argparse.Namespace) -> None:
    from segpipe.data.synthetic import write_dataset

    write_dataset(args.output, count=args.count, seed=args.seed, size=tuple(args.size),
                  cracks=args.cracks)


def _cmd_rasterise(args: argparse.Namespace) -> None:
    from segpipe.data.cache import build_cache
    from segpipe.labels import Labels

    from segpipe.data.geometry import Geometry

    build_cache(
        args.input,
        args.output,
        Geometry(size=tuple(args.size)) if args.size else Geometry(scale=args.scale),
        labels=Labels.from_config(args.classes, args.foreground, args.background, args.ignore),
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        folds=args.folds,
        group=args.group,
        train_cache=args.train_cache,
        drop_duplicates=args.drop_duplicates,
        workers=args.workers,
    )


def _cmd_models(args: argparse.Namespace) -> None:
    from segpipe.models import print_model_table

    print_model_table(size=args.size, markdown=args.markdown)


def _cmd_fetch_weights(args: argparse.Namespace) -> None:
    from segpipe.weights import fetch_imagenet

    for encoder in args.encoder:
        logging.getLogger("segpipe").info("%s: %s", encoder, fetch_imagenet(encoder))


def _cmd_train(args: argparse.Namespace) -> None:
    from segpipe.train import train_run

    train_run(args.spec, cache=args.cache, out_dir=args.output_dir, device=args.device,
              num_workers=args.num_workers)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from segpipe.evaluate import evaluate_run

    evaluate_run(args.run_dir, cache=args.cache, threshold=args.threshold, n_examples=args.examples,
                 device=args.device)


def _cmd_predict(args: argparse.Namespace) -> None:
    from segpipe.data.labelme import Simplification
    from segpipe.predict import predict_folder

    predict_folder(args.checkpoint, args.input, args.output, threshold=args.threshold,
                   formats=args.format, tta=args.tta,
                   simplification=Simplification(args.tolerance, args.min_area),
                   embed_image=args.embed_image, device=args.device)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from segpipe.aggregate import aggregate_experiment

    aggregate_experiment(args.experiment, args.spec, args.output_dir)


def _cmd_summary(args: argparse.Namespace) -> None:
    from segpipe.summary import write_summary

    write_summary(args.experiments, args.output)


def _setting(parser: argparse.ArgumentParser, flag: str, path: str, help: str,
             **options: object) -> None:
    """Add the option ``flag`` for the config setting at ``path`` (e.g. ``evaluate.threshold``):
    its default is the schema's, and :func:`main` checks a given value against the schema."""
    value = default(path)
    shown = (" ".join(map(str, value)) or "none") if isinstance(value, list) else \
        "none" if value is None else value
    action = parser.add_argument(flag, default=value,
                                 help=f"{help} (default {shown}: config {path})", **options)
    settings = parser.get_default("settings") or {}
    parser.set_defaults(settings={**settings, action.dest: (flag, path)})


def _check_settings(args: argparse.Namespace) -> None:
    """Every option of :func:`_setting` against the schema, as the workflow checks the config."""
    for dest, (flag, path) in getattr(args, "settings", {}).items():
        value = getattr(args, dest)
        check_setting(path, list(value) if isinstance(value, tuple) else value, flag)


def _add_device(parser: argparse.ArgumentParser) -> None:
    _setting(parser, "--device", "resources.device", "auto: a free GPU when the job was given "
             "one, else the CPU", metavar="{auto,cpu,cuda}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segpipe", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"segpipe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="<step>")

    s = sub.add_parser("synth", help="write the synthetic demo dataset (JPEG + LabelMe JSON)")
    s.add_argument("--output", type=Path, required=True, help="folder to create")
    s.add_argument("--count", type=int, required=True, help="number of images")
    _setting(s, "--seed", "data.synthetic.seed", "seed of the images", type=int)
    _setting(s, "--size", "data.synthetic.size", "height and width of the photos", type=int,
             nargs=2, metavar=("H", "W"))
    s.add_argument("--cracks", action="store_true", default=default("data.synthetic.cracks"),
                   help="thin dark crack lines 2-4 px wide across each photo (config "
                        "data.synthetic.cracks)")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("rasterise", help="LabelMe folder -> HDF5 cache of images and masks")
    s.add_argument("--input", type=Path, required=True, help="LabelMe folder (JSON files)")
    s.add_argument("--output", type=Path, required=True, help="HDF5 file to write")
    at = s.add_mutually_exclusive_group(required=True)
    at.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="height and width every image is squashed to (config data.size)")
    at.add_argument("--scale", type=float, metavar="S",
                    help="each image at S times its own size, aspect kept (config data.scale)")
    _setting(s, "--foreground", "data.foreground", "labels drawn as foreground (none given: "
             "every label not in --background)", nargs="*", metavar="LABEL")
    _setting(s, "--background", "data.background", "labels that erase (drawn as background, "
             "in file order)", nargs="*", metavar="LABEL")
    _setting(s, "--classes", "data.classes", 'several classes: a JSON list of labels or '
             '{"name": [labels]}, e.g. \'["leaf", {"rock": ["stone", "pebble"]}]\'',
             type=_json_list, metavar="JSON")
    _setting(s, "--ignore", "data.ignore", "labels whose pixels no loss or metric counts",
             nargs="*", metavar="LABEL")
    s.add_argument("--val-fraction", type=float, default=None,
                   help="share of a training folder's images drawn as validation (default "
                        f"{default('data.val_fraction')}: config data.val_fraction); none with "
                        "--folds or --train-cache")
    _setting(s, "--folds", "data.folds", "assign the images to K cross-validation folds "
             "(instead of a validation split)", type=int, metavar="K")
    _setting(s, "--group", "data.group", "images whose names share the first capture group (or "
             "the match) of REGEX stay on one side of every split", metavar="REGEX")
    _setting(s, "--split-seed", "data.split_seed", "seed of the validation split or the folds",
             type=int)
    s.add_argument("--train-cache", type=Path, default=None, metavar="H5",
                   help="for a test folder: the training cache; an image of it is an error")
    _setting(s, "--workers", "resources.rasterise_threads", "threads that decode the photos "
             "(the cache is the same for any number)", type=int, metavar="N")
    s.add_argument("--drop-duplicates", action="store_true",
                   default=default("data.drop_test_duplicates"),
                   help="with --train-cache: leave those images out, with a warning (config "
                        "data.drop_test_duplicates)")
    s.set_defaults(func=_cmd_rasterise)

    s = sub.add_parser("models", help="list architectures x backbones with parameters and GFLOPs")
    s.add_argument("--size", type=int, default=256, help="input side for the GFLOPs count")
    s.add_argument("--markdown", action="store_true", help="a Markdown table (docs/models.md)")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("fetch-weights", help="download ImageNet weights into the torch hub cache")
    s.add_argument("--encoder", nargs="+", required=True, choices=sorted(IMAGENET_URLS),
                   help="the ResNets whose torchvision IMAGENET1K_V1 weights to fetch")
    s.set_defaults(func=_cmd_fetch_weights)

    s = sub.add_parser("train", help="train one run")
    s.add_argument("--cache", type=Path, required=True,
                   help="training HDF5 cache (with val split, or folds when the spec has a fold)")
    s.add_argument("--spec", type=_json_arg, required=True,
                   help="run specification: JSON object or @file.json")
    s.add_argument("--output-dir", type=Path, required=True, help="the run directory")
    _add_device(s)
    _setting(s, "--num-workers", "resources.num_workers", "DataLoader worker processes (0: load "
             "in this process)", type=int, metavar="N")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", help="score a trained run on its test images")
    s.add_argument("--run-dir", type=Path, required=True)
    s.add_argument("--cache", type=Path, required=True,
                   help="test HDF5 cache (the training cache for a run of a fold: its fold)")
    _setting(s, "--threshold", "evaluate.threshold", "a binary model's pixels of probability "
             ">= this are foreground", type=float)
    _setting(s, "--examples", "evaluate.examples", "test images in predictions.png and "
             "evolution.npz", type=int)
    _add_device(s)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("predict", help="masks or LabelMe files for a folder of images, by one "
                                       "model or an ensemble, and uncertainty.csv")
    s.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                   help="checkpoints (model.pt), run folders (every model.pt below: the folds) or "
                        "@FILE listing them; several predict as an ensemble")
    s.add_argument("--input", type=Path, required=True, help="folder of images")
    s.add_argument("--output", type=Path, required=True,
                   help="folder for the predictions and uncertainty.csv")
    s.add_argument("--format", nargs="+", choices=["png", "labelme"], default=["png"],
                   help="png masks and/or LabelMe JSON (both: in masks/ and labelme/)")
    _setting(s, "--threshold", "evaluate.threshold", "a binary model's pixels of probability "
             ">= this are foreground", type=float)
    _setting(s, "--tta", "predict.tta", "average each model over the image mirrored three ways "
             "(4 passes)", action=argparse.BooleanOptionalAction)
    _setting(s, "--tolerance", "predict.tolerance", "LabelMe polygons: the most they deviate "
             "from the outline, in pixels (less where IoU with the region < 0.99)", type=float,
             metavar="PIXELS")
    _setting(s, "--min-area", "predict.min_area", "LabelMe polygons: regions and holes of fewer "
             "pixels are left out", type=int, metavar="PIXELS")
    _setting(s, "--embed-image", "predict.embed_image", "LabelMe files carry the image "
             "(imageData), not only its path", action=argparse.BooleanOptionalAction)
    _add_device(s)
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("aggregate", help="tables and figures for one experiment")
    s.add_argument("--experiment", required=True, help="experiment name")
    s.add_argument("--spec", type=_json_arg, required=True,
                   help="experiment specification (axes, runs): JSON object or @file.json")
    s.add_argument("--output-dir", type=Path, required=True)
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("summary", help="results/summary.md across experiments")
    s.add_argument("--experiments", type=Path, nargs="+", required=True,
                   help="experiment folders holding summary.csv")
    s.add_argument("--output", type=Path, required=True)
    s.set_defaults(func=_cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Where the step ran: a cluster job's log then names its job.
    logging.getLogger("segpipe").info(
        "segpipe %s %s on %s, SLURM_JOB_ID=%s",
        __version__,
        args.command,
        socket.gethostname(),
        os.environ.get("SLURM_JOB_ID", "none"),
    )
    try:
        _check_settings(args)
        args.func(args)
    except SegpipeError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
