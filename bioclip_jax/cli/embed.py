"""`bioclip-jax embed --pretrained SRC (--images PATH... | --text-file FILE) --output FILE.npy`.

Images are streamed in fixed-size batches (bounded memory for any number of files) and
written row by row into a memory-mapped .npy; `FILE.keys.txt` names the input of each
row. Unreadable images are skipped and listed. Features are raw, as open_clip's
`encode_image`/`encode_text` return them, unless --normalize is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from bioclip_jax.cli.common import ArgumentParser, add_model_args, model_source, reading_inputs, run_cli
from bioclip_jax.data.image_items import file_item, list_image_files
from bioclip_jax.tokenizer import get_tokenizer


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax embed", description=__doc__, renamed={"--out": "--output"},
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files and/or directories (searched recursively)")
    source.add_argument("--text-file", help="a text file, one text per line")
    parser.add_argument("--output", required=True, help="output .npy ([N, embed_dim] float32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="image decoding threads")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--no-progress", action="store_true")
    return parser


class RowWriter:
    """Writes [N, D] rows into FILE.npy.tmp (memory-mapped), renamed to FILE.npy when complete."""

    def __init__(self, path: str, rows: int, dim: int):
        self.path, self.tmp = path, path + ".tmp.npy"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        self.filled = 0

    def write(self, rows: np.ndarray) -> None:
        self.array[self.filled:self.filled + len(rows)] = rows
        self.filled += len(rows)

    def close(self) -> None:
        """Keeps only the rows written (fewer than planned when inputs were skipped)."""
        self.array.flush()
        if self.filled == len(self.array):
            del self.array
            os.replace(self.tmp, self.path)
            return
        final = np.lib.format.open_memmap(self.path + ".part.npy", mode="w+", dtype=np.float32,
                                          shape=(self.filled, self.array.shape[1]))
        for start in range(0, self.filled, 65536):
            stop = min(start + 65536, self.filled)
            final[start:stop] = self.array[start:stop]
        final.flush()
        del final, self.array
        os.remove(self.tmp)
        os.replace(self.path + ".part.npy", self.path)


def _keys_path(out: str) -> str:
    return (out[:-4] if out.endswith(".npy") else out) + ".keys.txt"


def embed_images(model, paths, args) -> int:
    from bioclip_jax.inference import ImageEmbedder, report_skipped  # noqa: PLC0415 - jax: keep --help fast
    files = list_image_files(paths)
    if not files:
        raise FileNotFoundError(f"no image files under {' '.join(paths)}")
    embedder = ImageEmbedder(model, batch_size=args.batch_size, workers=args.workers,
                             progress=not args.no_progress, unit_length=args.normalize)
    writer = RowWriter(args.output, len(files), model.config.embed_dim)
    with open(_keys_path(args.output), "w", encoding="utf-8") as keys:
        for features, items in embedder.stream((file_item(f) for f in files), total=len(files)):
            writer.write(features)
            keys.writelines(item.key + "\n" for item in items)
    writer.close()
    report_skipped(embedder.skipped)
    return writer.filled


def embed_texts(model, text_file: str, args) -> int:
    with open(text_file, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    if not texts:
        raise ValueError(f"{text_file} holds no lines")
    tokenizer = get_tokenizer(context_length=model.config.text.context_length)
    writer = RowWriter(args.output, len(texts), model.config.embed_dim)
    for start in tqdm(range(0, len(texts), args.batch_size), unit="batch", disable=args.no_progress,
                      file=sys.stderr):
        chunk = texts[start:start + args.batch_size]
        padded = chunk + [""] * (args.batch_size - len(chunk))  # one batch shape for every chunk
        writer.write(model.encode_text(tokenizer(padded), normalize=args.normalize)[:len(chunk)])
    writer.close()
    with open(_keys_path(args.output), "w", encoding="utf-8") as keys:
        keys.writelines(f"{i}\n" for i in range(len(texts)))
    return writer.filled


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    with reading_inputs():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        source = model_source(args.pretrained, args.model)
    from bioclip_jax.pretrained import create_model  # noqa: PLC0415 - jax: keep --help fast
    model = create_model(*source, seed=args.seed)
    rows = embed_images(model, args.images, args) if args.images else embed_texts(model, args.text_file, args)
    print(f"wrote {rows} embeddings to {args.output} (row names in {_keys_path(args.output)})")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
