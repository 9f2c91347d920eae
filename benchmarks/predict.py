"""`bioclip predict` (pybioclip) against `bioclip-jax predict`, timed as whole processes.

    python benchmarks/predict.py                       # random 224-px ViT-B-16, 64 JPEGs of 500x375
    python benchmarks/predict.py --quick               # a tiny 224-px model and 8 images: a smoke run

Both commands read the same model, from the same offline Hugging Face cache (written here in
huggingface_hub's layout, as `hf-hub:imageomics/bioclip-2` with its tree-of-life embeddings
in `imageomics/TreeOfLife-200M`), so they run exactly as a user types them: start-up,
model loading, decoding, both towers and writing the CSV are all inside the timing. Two modes:
custom labels (--cls, 4 labels) and the tree of life (the default, --rank species).
Ratios are pybioclip time / bioclip_jax time (> 1: bioclip_jax is faster); the issue's
target is 1.5x on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import _timing

CATALOG_ROWS = [("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", e, c)
                for e, c in [("corax", "common raven"), ("frugilegus", "rook"), ("monedula", "jackdaw")]] + [
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina", "dog rose")]
LABELS = "common raven,rook,jackdaw,dog rose"


def _add_repo(hf_home: Path, repo_id: str, files: dict[str, Path], repo_type: str) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    storage = hf_home / "hub" / "--".join([f"{repo_type}s", *repo_id.split("/")])
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, path in files.items():
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


def prepare(root: Path, arch: str, images: int) -> tuple[Path, list[str]]:
    """The offline HF cache and the JPEGs."""
    import bioclip_jax  # noqa: PLC0415
    from bioclip_jax.cli import embed_taxa  # noqa: PLC0415
    from bioclip_jax.models.clip import build_model  # noqa: PLC0415
    from bioclip_jax.models.config import from_open_clip, get_model_config, to_open_clip  # noqa: PLC0415

    cfg = to_open_clip(get_model_config("ViT-Tiny-8" if arch == "tiny" else arch))
    cfg["vision_cfg"].update(image_size=224, patch_size=32 if arch == "tiny" else cfg["vision_cfg"]["patch_size"])
    bioclip_jax.export_open_clip(build_model(from_open_clip(cfg), seed=0), str(root / "model"))
    (root / "catalog.csv").write_text("kingdom,phylum,class,order,family,genus,species,common\n" +
                                      "".join(",".join(r) + "\n" for r in CATALOG_ROWS))
    embed_taxa.main(["--taxa", str(root / "catalog.csv"), "--output", str(root / "tol"),
                     "--pretrained", f"local-dir:{root / 'model'}", "--no-progress"])
    hf_home = root / "hf_home"
    _add_repo(hf_home, "imageomics/bioclip-2", {p.name: p for p in (root / "model").iterdir()}, "model")
    _add_repo(hf_home, "imageomics/TreeOfLife-200M",
              {f"embeddings/{n}": root / "tol" / n for n in ("txt_emb_species.npy", "txt_emb_species.json")}, "dataset")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(images):
        path = root / "images" / f"{i:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return hf_home, paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16", help="architecture of the random model (default ViT-B-16)")
    parser.add_argument("--images", type=int, default=64, help="JPEGs of 500x375 (default 64)")
    _timing.add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    if args.quick:
        args.arch, args.images, args.repeats = "tiny", 8, min(args.repeats, 2)
    with tempfile.TemporaryDirectory(prefix="bioclip_predict_bench_") as tmp:
        root = Path(tmp)
        hf_home, images = prepare(root, args.arch, args.images)
        env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
                   BIOCLIP_JAX_CACHE=str(root / "bioclip_jax_cache"))
        env.pop("XLA_FLAGS", None)
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

        def command(argv: list[str]):
            def run() -> None:
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{done.stderr[-2000:]}")
            return run

        rows = []
        for label, flags in (("custom labels (--cls)", ["--cls", LABELS]), ("tree of life (species)", [])):
            ours = command([sys.executable, "-m", "bioclip_jax.cli.main", "predict", *images, *flags,
                            "--batch-size", "32", "--no-progress", "--output", str(root / "ours.csv")])
            theirs = command([sys.executable, "-m", "bioclip", "predict", *images, *flags, "--batch-size", "32",
                              "--output", str(root / "theirs.csv")])
            rows.append(_timing.side_by_side(label, ours, theirs, len(images), args.repeats, args.warmup,
                                             unit="images/s", sides=(_timing.OURS, "pybioclip")))
        _timing.print_rows(rows)
        _timing.write_json(args.out, {"benchmark": "predict", "arch": args.arch, "images": args.images,
                                      "machine": _timing.machine_info(args.threads or None), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
