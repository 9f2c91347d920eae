"""`bioclip-jax export --checkpoint CKPT --output DIR [--step N]`: an open_clip hf-hub folder (numpy + safetensors).

CKPT and DIR may be local or in a bucket (gs://bucket/run).
"""

from __future__ import annotations

import sys

from etils import epath

from bioclip_jax.cli.common import ArgumentParser, run_cli


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax export", description=__doc__, renamed={"--out": "--output"})
    parser.add_argument("--checkpoint", required=True,
                        help="bioclip_jax model directory or training workdir, "
                             "or any other pretrained source")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step of a training workdir (default: the latest finished one)")
    parser.add_argument("--model", default=None, help="architecture, if the source does not carry it")
    parser.add_argument("--output", required=True, help="output folder (open_clip_config.json + weights)")
    return parser


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    from bioclip_jax.checkpoint import model_dir  # noqa: PLC0415 - orbax: keep --help fast
    from bioclip_jax.data.replay import REPLAY_PROJECTOR_KEY  # noqa: PLC0415 - grain: keep --help fast
    from bioclip_jax.pretrained import create_model, export_open_clip  # noqa: PLC0415 - jax: keep --help fast
    step = args.step
    is_workdir = (model_dir.is_model_dir(args.checkpoint)
                  and not (epath.Path(args.checkpoint) / model_dir.PARAMS_DIR).is_dir())
    if step is None and is_workdir:
        steps = model_dir.finished_steps(args.checkpoint)
        step = steps[-1] if steps else None  # the one create_model picks: the latest finished step
    model = create_model(args.model, args.checkpoint, step=step)
    export_open_clip(model, args.output)
    of = f"step {step} of {args.checkpoint}" if step is not None else args.checkpoint
    print(f"wrote open_clip folder {args.output} from {of} (load with open_clip.create_model_and_transforms"
          f"('local-dir:{args.output}'))")
    if model_dir.is_model_dir(args.checkpoint) and REPLAY_PROJECTOR_KEY in model_dir.param_keys(args.checkpoint, step):
        print(f"note: the replay projector ({REPLAY_PROJECTOR_KEY}, used only for replay images in training) is "
              f"not part of an open_clip model; it stays in {args.checkpoint}")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
