"""`bioclip-jax embed --pretrained SRC (--images SOURCE... | --text-file FILE) --output OUT`.

Images come from the same sources as `predict` (folders, CSV/TXT manifests of local or gs:// paths,
training shards, files), streamed, embedded on every local device and, under the launch scripts,
split among the processes. OUT is a folder of .npy shards with an index.csv (key, shard, row), or
FILE.npy ([N, D] float32) with FILE.keys.txt naming the input of each row. Either resumes: rerun
the same command after a crash (kill -9 included) and only what is not yet in a shard is embedded
again. Unreadable images are skipped and listed (OUT's skipped.csv). Features are raw, as
open_clip's `encode_image`/`encode_text` return them, unless --normalize is given.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bioclip_jax.cli.common import ArgumentParser, InputError, add_model_args, model_source, reading_inputs, run_cli

log = logging.getLogger(__spec__.name)  # not __name__: under `python -m` (the launch scripts) that is "__main__"


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax embed", description=__doc__, renamed={"--out": "--output"},
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files, folders, CSV/TXT manifests (local or gs://) and "
                        "training shards, as predict takes them")
    source.add_argument("--text-file", help="a text file, one text per line")
    parser.add_argument("--path-column", help="the column of a CSV manifest that holds the image paths")
    parser.add_argument("--output", required=True, help="a folder (.npy shards and index.csv), or FILE.npy "
                        "(with FILE.keys.txt); rerun the same command to continue an interrupted run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=-1,
                        help="image decoders (default -1: the usable CPUs less one)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _identity(model, args) -> dict:
    from bioclip_jax.archive import model_identity  # noqa: PLC0415 - jax: keep --help fast

    what = {"images": list(args.images)} if args.images else {"text_file": args.text_file}
    return {**model_identity(model, args.seed), "normalize": args.normalize, **what}


def _shards(model, args, process_index: int = 0, process_count: int = 1):
    from bioclip_jax.outputs import EmbeddingShards  # noqa: PLC0415 - numpy only, but kept with the lazy jax imports

    with reading_inputs():
        return EmbeddingShards(args.output, model.config.embed_dim, _identity(model, args),
                               process_index=process_index, process_count=process_count)


def embed_images(model, args):
    """Embeds the image sources into the resumable output; returns the run's summary."""
    import jax  # noqa: PLC0415 - jax: keep --help fast
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from bioclip_jax import archive  # noqa: PLC0415
    from bioclip_jax.data.image_inputs import ImageInputs, missing_sources  # noqa: PLC0415
    from bioclip_jax.inference import ImageEmbedder  # noqa: PLC0415
    from bioclip_jax.outputs import merge_embedding_parts  # noqa: PLC0415

    with reading_inputs():
        missing = missing_sources(args.images)
        if missing:
            raise FileNotFoundError(f"image source not found: {', '.join(missing)}")
        inputs = ImageInputs(args.images, path_column=args.path_column)
    embedder = ImageEmbedder(model, batch_size=args.batch_size, workers=args.workers, progress=False,
                             unit_length=args.normalize, devices=jax.local_devices())
    shards = _shards(model, args, jax.process_index(), jax.process_count())
    summary = archive.run_over_images(embedder, inputs, shards, shards.write, progress=not args.no_progress,
                                      desc="embedding")
    shards.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("embed: every part written")
        if jax.process_index() == 0:
            merge_embedding_parts(args.output)
    return summary


def embed_texts(model, args) -> int:
    """Embeds the lines of --text-file (keys: line numbers from 0); returns how many this run embedded."""
    import numpy as np  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from bioclip_jax.tokenizer import get_tokenizer  # noqa: PLC0415

    with reading_inputs(), open(args.text_file, encoding="utf-8") as handle:
        texts = [line.rstrip("\n") for line in handle]
        if not texts:
            raise ValueError(f"{args.text_file} holds no lines")
    tokenizer = get_tokenizer(context_length=model.config.text.context_length)
    shards = _shards(model, args)
    todo = [i for i in range(len(texts)) if str(i) not in shards.done]
    for start in tqdm(range(0, len(todo), args.batch_size), unit="batch", disable=args.no_progress, file=sys.stderr):
        rows = todo[start:start + args.batch_size]
        chunk = [texts[i] for i in rows] + [""] * (args.batch_size - len(rows))  # one batch shape for every chunk
        features = np.asarray(model.encode_text(tokenizer(chunk), normalize=args.normalize))[:len(rows)]
        shards.write([str(i) for i in rows], features)
    shards.close()
    return len(todo)


def _where(output: str) -> str:
    return f"{output} (row names in {output[:-4]}.keys.txt)" if output.endswith(".npy") else \
        f"{output} (index.csv names each row)"


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    with reading_inputs():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        source = model_source(args.pretrained, args.model)
    from bioclip_jax.pretrained import create_model  # noqa: PLC0415 - jax: keep --help fast
    from bioclip_jax.train.distributed import maybe_initialize_distributed  # noqa: PLC0415

    if maybe_initialize_distributed() and not args.images:
        raise InputError("several processes embed --images only; embed a --text-file in one process")
    model = create_model(*source, seed=args.seed)
    if args.text_file:
        log.info("embedded %d texts into %s", embed_texts(model, args), _where(args.output))
        return 0
    summary = embed_images(model, args)
    import jax  # noqa: PLC0415

    if jax.process_index() == 0:
        line = f"{summary.line('embedded')}; in {_where(args.output)}"
        log.warning(line) if summary.skipped else log.info(line)
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
