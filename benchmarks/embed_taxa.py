"""Taxon names embedded per second (80-template ensemble), bioclip_jax vs open_clip, same architecture.

    python benchmarks/embed_taxa.py                    # ViT-B-16, 4 names timed after a warm-up chunk
    python benchmarks/embed_taxa.py --names 64 --batch-size 2560 --no-torch   # on an accelerator

Both sides use random weights (speed does not depend on them), the same taxon_com names,
the same chunking (batch-size prompts per forward pass) and float32. The first chunk of
each side is a warm-up (JAX compiles, PyTorch allocates) and is not timed.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import bioclip_jax
from bioclip_jax.taxonomy.templates import OPENAI_IMAGENET_TEMPLATES, fill_templates
from bioclip_jax.inference import TextEmbedder
from bioclip_jax.taxonomy import Taxon, class_name


def synthetic_names(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    syllables = ["ra", "ti", "lo", "cus", "pha", "ne", "mi", "dor", "ax", "ul", "bri", "so"]

    def word(parts: int) -> str:
        return "".join(rng.choice(syllables, parts))

    taxa = [Taxon.from_ranks(kingdom="Animalia", phylum=word(3), **{"class": word(3)}, order=word(4),
                             family=word(3) + "idae", genus=word(3), species=word(3), common=f"{word(2)} {word(2)}")
            for _ in range(count)]
    return [class_name(t, "taxon_com") for t in taxa]


def time_jax(model_name: str, names: list[str], batch_size: int) -> float:
    model = bioclip_jax.create_model(model_name, None)
    embedder = TextEmbedder(model, batch_size=batch_size)
    per_chunk = max(1, batch_size // len(OPENAI_IMAGENET_TEMPLATES))
    for _ in embedder.class_chunks(names[:per_chunk]):  # warm-up: compiles the one chunk shape
        pass
    start = time.perf_counter()
    for _ in embedder.class_chunks(names):
        pass
    return len(names) / (time.perf_counter() - start)


def time_torch(model_name: str, names: list[str], batch_size: int) -> float:
    import open_clip  # noqa: PLC0415 - the reference is optional
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_clip.create_model(model_name).to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    per_chunk = max(1, batch_size // len(OPENAI_IMAGENET_TEMPLATES))

    @torch.no_grad()
    def run(chunk_names):
        for i in range(0, len(chunk_names), per_chunk):
            chunk = chunk_names[i:i + per_chunk]
            tokens = tokenizer([p for n in chunk for p in fill_templates(n)]).to(device)
            feats = F.normalize(model.encode_text(tokens), dim=-1)
            feats = F.normalize(feats.reshape(len(chunk), len(OPENAI_IMAGENET_TEMPLATES), -1).mean(1), dim=-1)
            feats.cpu()

    run(names[:per_chunk])
    start = time.perf_counter()
    run(names)
    return len(names) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--names", type=int, default=4, help="names timed (after the warm-up chunk)")
    parser.add_argument("--batch-size", type=int, default=160, help="prompts per forward pass (80 per name)")
    parser.add_argument("--no-torch", action="store_true", help="skip the open_clip reference")
    args = parser.parse_args()
    names = synthetic_names(args.names)
    print(f"{args.model}, {args.names} names x {len(OPENAI_IMAGENET_TEMPLATES)} templates, "
          f"{args.batch_size} prompts per batch, jax on {jax.devices()[0].platform}")
    ours = time_jax(args.model, names, args.batch_size)
    print(f"bioclip_jax: {ours:.3f} names/s")
    if not args.no_torch:
        reference = time_torch(args.model, names, args.batch_size)
        print(f"open_clip:   {reference:.3f} names/s")
        print(f"ratio bioclip_jax / open_clip: {ours / reference:.2f}")


if __name__ == "__main__":
    main()
