"""The browser demo: zero-shot classification of an uploaded image (PNG, JPEG, TIFF or DICOM) with its explanation.

    ace-lora-app                                 # the released model; then open http://127.0.0.1:7860
    ace-lora-app --model path/to/ace-lora        # a model folder, Hub repo, training run or checkpoint

Built with Gradio: `pip install 'ace-lora-hf[app]'`. The model loads once; class embeddings are cached per label set
and template list.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .common import run_cli
from .options import add_device_options, add_model_options, add_option, command_parser


if TYPE_CHECKING:
    from ..sources.load import LoadedModel


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser("ace-lora-app", __doc__)
    add_model_options(parser)
    add_device_options(parser)
    add_option(parser, "--host", default="127.0.0.1", help="Address to serve on (default: %(default)s, this "
                                                           "machine only; 0.0.0.0 for the network).")
    add_option(parser, "--port", type=int, default=7860)
    add_option(parser, "--share", action="store_true", help="Also serve through a public Gradio share link.")
    add_option(parser, "--calibration", type=Path,
               help="Calibration file (ace-lora-evaluate --calibration-output): calibrated scores and decisions "
                    "when the page's labels and templates are the ones it was fitted for.")
    return parser.parse_args(argv)


def load_demo_model(args: argparse.Namespace) -> "LoadedModel":
    """The model of the command line's model options, LoRA merged, on its device (`build_demo(*loaded[:2])`)."""
    from .options import load_model, model_dtype, resolve_device

    device = resolve_device(args.device)
    return load_model(args, device, model_dtype(args.dtype, device))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from ..inference.demo import build_demo, import_gradio
    from .options import check_model_source

    from ..models.ace_lora.calibration import Calibration

    import_gradio()  # before the model loads
    calibration = Calibration.load(args.calibration) if args.calibration else None
    check_model_source(args)
    model, processor, _ = load_demo_model(args)
    build_demo(model, processor, calibration).launch(server_name=args.host, server_port=args.port, share=args.share)


def cli() -> None:
    """The `ace-lora-app` console script."""
    run_cli(main)


__all__ = ["cli", "load_demo_model", "main", "parse_args"]


if __name__ == "__main__":
    cli()
