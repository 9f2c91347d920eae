"""`bioclip predict` (pybioclip) against `bioclip-jax predict`, timed as whole processes.

    python benchmarks/predict.py                       # random 224-px ViT-B-16, 64 JPEGs of 500x375
    python benchmarks/predict.py --quick               # a tiny 224-px model and 8 images: a smoke run
    python benchmarks/predict.py --archive 2000        # a folder of 2,000 640x480 JPEGs, tree of life
    python benchmarks/predict.py --archive 4000 --archive-size 224x224 --arch ViT-L-14 --batch 128 \
        --without-pybioclip --workers 1,15              # the GPU figure (benchmarks/gpu_check.sh --parts archive)

Both commands read the same model, from the same offline Hugging Face cache (written here in
huggingface_hub's layout, as `hf-hub:imageomics/bioclip-2` with its tree-of-life embeddings
in `imageomics/TreeOfLife-200M`), so they run exactly as a user types them: start-up,
model loading, decoding, both towers and writing the CSV are all inside the timing. Two modes:
custom labels (--cls, 4 labels) and the tree of life (the default, --rank species).
Ratios are pybioclip time / bioclip_jax time (> 1: bioclip_jax is faster); the issue's
target is 1.5x on CPU.

--archive N (issue 21) times a folder of N camera-sized JPEGs (640x480) in the tree-of-life
mode three ways: (a) the bare image tower, the same model and batch size compiled once and
run here over pre-decoded batches; (b) `bioclip-jax predict` over the folder, writing CSV to
a file; (c) pybioclip's `bioclip predict` over the same files. Each command runs twice per
round, over the first `2 * batch` files and over all N, so start-up, model loading and
compilation (the same in both runs) cancel: the steady rate is (N - n) / (T_N - T_n). Both
the steady and the whole-process rates are printed, and the ratios (b)/(a) (target >= 0.9:
decoding, reading and writing hidden behind the tower) and (b)/(c).

`--workers 1,15` times our predict once per decoder count. One decoder's rate, when it is below
the tower's, is what one CPU core decodes, so tower / that rate estimates the cores one device
needs to be fed (printed as "cores to feed the tower").

On a GPU this process (the bare tower) and the predict commands share the card, so none of them
preallocates its memory (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the environment sets it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import _timing

# Before jax is imported (prepare() builds the model): the card is shared with the timed commands.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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


def prepare(root: Path, arch: str, images: int, size: tuple[int, int] = (500, 375)) -> tuple[Path, list[str]]:
    """The offline HF cache and the JPEGs (`size` = width, height)."""
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
        path = root / "images" / f"{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return hf_home, paths


ARCHIVE_IMAGE_SIZE = (640, 480)  # a camera's VGA frame: decoding and resizing cost what they do on real photos
ARCHIVE_BATCH = 32


def bare_tower(root: Path, batch: int):
    """(a): the compiled image tower alone, as predict runs it, over pre-decoded batches."""
    import jax  # noqa: PLC0415 - imported after the subprocesses' environment is set up

    from bioclip_jax import create_model, inference, transforms  # noqa: PLC0415

    model = create_model(f"local-dir:{root / 'model'}")
    model.preprocess = transforms.PYBIOCLIP_TREE_OF_LIFE  # what predict uses for hf-hub:imageomics/bioclip-2
    embedder = inference.ImageEmbedder(model, batch_size=batch, progress=False, decoders="threads")
    paths = sorted((root / "images").iterdir())[:batch]
    pixels = np.stack([embedder.transform.pixels(transforms.open_rgb(p)) for p in paths])
    jax.block_until_ready(embedder._run(pixels))  # the bare tower, as the embedder calls it

    def run(images: int) -> None:
        outputs = [embedder._run(pixels) for _ in range(-(-images // batch))]
        jax.block_until_ready(outputs)
    return run


def steady_rate(seconds_all: float, seconds_few: float, images: int, few: int) -> float:
    """Images/s with what both runs share (start-up, loading, compiling) taken out."""
    return (images - few) / max(seconds_all - seconds_few, 1e-9)


def archive(args, root: Path, env: dict, images: list[str]) -> dict:
    """The three archive rates (see the module docstring), each round ours, pybioclip's, the tower."""
    few = 2 * args.batch
    if len(images) <= few:
        raise ValueError(f"--archive needs more than {few} images (twice the batch), got {len(images)}")
    few_dir = root / "few_images"
    few_dir.mkdir()
    for path in images[:few]:
        (few_dir / Path(path).name).symlink_to(path)

    def ours(folder: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "bioclip_jax.cli.main", "predict", str(folder), "--batch-size", str(args.batch),
                "--workers", str(workers), "--no-progress", "--output", str(root / "ours.csv")]

    def theirs(files: list[str]) -> list[str]:
        return [sys.executable, "-m", "bioclip", "predict", *files, "--batch-size", str(args.batch),
                "--output", str(root / "theirs.csv")]

    def timed(argv: list[str]) -> float:
        for previous in [*root.glob("ours.csv*"), *root.glob("theirs.csv*")]:
            previous.unlink()  # predict resumes an output it finds: every run starts from nothing
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{done.stderr[-2000:]}")
        return time.perf_counter() - start

    tower = bare_tower(root, args.batch)
    commands = {ours_name(workers, args.workers): (ours(few_dir, workers), ours(root / "images", workers))
                for workers in args.workers}
    if not args.without_pybioclip:
        commands["pybioclip"] = (theirs(images[:few]), theirs(images))
    for name, (argv_few, _) in commands.items():
        if name == ours_name(args.workers[0], args.workers) or not name.startswith(_timing.OURS):
            timed(argv_few)  # warm-up, once per program: compilation caches, page cache
    samples: dict[str, dict[str, list[float]]] = {name: {"few_s": [], "all_s": []} for name in commands}
    samples["tower"] = {"all_s": []}
    for _ in range(args.repeats):
        for name, (argv_few, argv_all) in commands.items():
            samples[name]["few_s"].append(timed(argv_few))
            samples[name]["all_s"].append(timed(argv_all))
        start = time.perf_counter()
        tower(len(images))
        samples["tower"]["all_s"].append(time.perf_counter() - start)
    rates = {}
    for name, seconds in samples.items():
        whole = [len(images) / s for s in seconds["all_s"]]
        steady = ([steady_rate(a, f, len(images), few) for a, f in zip(seconds["all_s"], seconds["few_s"])]
                  if "few_s" in seconds else whole)
        rates[name] = {**seconds, "whole_images_per_s": whole, "steady_images_per_s": steady}
    return rates


def ours_name(workers: int, all_workers: list[int]) -> str:
    return _timing.OURS if len(all_workers) == 1 else f"{_timing.OURS} workers={workers}"


def archive_figures(rates: dict) -> dict:
    """Ours / tower (median steady rates) per decoder count, the best of them, and the cores one device needs."""
    tower = statistics.median(rates["tower"]["steady_images_per_s"])
    ours = {name: statistics.median(rate["steady_images_per_s"]) / tower
            for name, rate in rates.items() if name.startswith(_timing.OURS)}
    one = next((rates[name] for name in rates if name.endswith("workers=1")), None)
    one_rate = statistics.median(one["steady_images_per_s"]) if one else None
    return {"ours_vs_tower": ours, "best_ours_vs_tower": max(ours.values()), "tower_images_per_s": tower,
            "cores_to_feed_the_tower": tower / one_rate if one_rate and one_rate < 0.9 * tower else None}


def print_archive(rates: dict, images: int, size: tuple[int, int], machine: dict) -> None:
    print(f"archive: {images} JPEGs of {size[0]}x{size[1]}, tree of life (species), "
          f"{machine['cpu']}, {machine['logical_cores']} cores, load {machine['load_average'][0]:.2f}")
    print(f"{'images/s':28} {'steady best':>12} {'median':>8} {'whole best':>11} {'median':>8}")
    for name, rate in rates.items():
        steady, whole = rate["steady_images_per_s"], rate["whole_images_per_s"]
        print(f"{name:28} {max(steady):12.2f} {statistics.median(steady):8.2f} {max(whole):11.2f} "
              f"{statistics.median(whole):8.2f}")
    for name in (name for name in rates if name.startswith(_timing.OURS)):
        for other, target in (("tower", 0.9), ("pybioclip", None)):
            if other not in rates:
                continue
            best = max(rates[name]["steady_images_per_s"]) / max(rates[other]["steady_images_per_s"])
            median = (statistics.median(rates[name]["steady_images_per_s"])
                      / statistics.median(rates[other]["steady_images_per_s"]))
            whole = (statistics.median(rates[name]["whole_images_per_s"])
                     / statistics.median(rates[other]["whole_images_per_s"]))
            verdict = "" if target is None else ("  meets" if median >= target else f"  below {target}")
            print(f"{name} / {other:14} steady {best:.3f} (best) {median:.3f} (median), whole {whole:.3f} "
                  f"(median){verdict}")
    cores = archive_figures(rates)["cores_to_feed_the_tower"]
    if cores is not None:
        print(f"cores to feed the tower: {cores:.1f} (the tower's rate / one decoder's)")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, e.g. 224x224, not {text!r}")
    return int(width), int(height)


def _counts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"decoder counts are integers separated by commas, not {text!r}") from None


def _device_kind() -> str:
    import jax  # noqa: PLC0415

    return jax.devices()[0].device_kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16", help="architecture of the random model (default ViT-B-16)")
    parser.add_argument("--images", type=int, default=64, help="JPEGs of 500x375 (default 64)")
    parser.add_argument("--archive", type=int, nargs="?", const=2000, default=0, metavar="N",
                        help="time a folder of N (default 2000) 640x480 JPEGs instead: tower, ours, pybioclip")
    parser.add_argument("--without-pybioclip", action="store_true",
                        help="--archive: time the tower and ours only (pybioclip's side takes as long as ours)")
    parser.add_argument("--batch", type=int, default=ARCHIVE_BATCH, help="--archive's batch size (default 32)")
    parser.add_argument("--archive-size", type=_size, default=ARCHIVE_IMAGE_SIZE, metavar="WxH",
                        help="--archive's JPEG size (default 640x480, a camera's frame)")
    parser.add_argument("--workers", type=_counts, default=[-1],
                        help="--archive: our predict's --workers, or a comma list to time each "
                             "(default -1: one decoder per spare CPU)")
    _timing.add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    if args.quick:
        args.arch, args.images, args.repeats = "tiny", 8, min(args.repeats, 2)
        args.archive, args.batch = min(args.archive, 24), min(args.batch, 8)
    with tempfile.TemporaryDirectory(prefix="bioclip_predict_bench_") as tmp:
        root = Path(tmp)
        if args.archive:
            hf_home, images = prepare(root, args.arch, args.archive, args.archive_size)
        else:
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

        if args.archive:
            machine = _timing.machine_info(args.threads or None)
            rates = archive(args, root, env, images)
            print_archive(rates, len(images), args.archive_size, machine)
            _timing.write_json(args.out, {"benchmark": "predict --archive", "arch": args.arch, "images": len(images),
                                          "image_size": args.archive_size, "batch": args.batch,
                                          "workers": args.workers, "device": _device_kind(), "machine": machine,
                                          "rates": rates, "figures": archive_figures(rates)})
            return 0
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
