"""`bioclip-jax embed`: streamed embeddings equal direct encode_image / encode_text."""

import csv

import numpy as np
from PIL import Image

from bioclip_jax import create_model, export_open_clip, get_tokenizer, image_transform
from bioclip_jax.cli import main as cli


def test_embed_images_and_texts(tmp_path, capsys):
    model = create_model("ViT-Tiny-8", seed=3)
    export_open_clip(model, str(tmp_path / "model"))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = images / ("sub" if i % 2 else "") / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (50 + i * 9, 70, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")

    out = tmp_path / "img.npy"
    assert cli.main(["embed", "--pretrained", f"local-dir:{tmp_path / 'model'}", "--images", str(images),
                     "--output", str(out), "--batch-size", "3", "--no-progress"]) == 0
    assert "broken.jpg" in capsys.readouterr().err
    features = np.load(out)
    keys = (tmp_path / "img.keys.txt").read_text().split()
    assert features.shape == (7, 128) and len(keys) == 7
    preprocess = image_transform(model)
    expected = model.encode_image(np.stack([preprocess(Image.open(k)) for k in keys]))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)

    texts = ["a photo of Corvus corax.", "Bewick's wren", "", "Épervier d'Europe"] * 3
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert cli.main(["embed", "--pretrained", f"local-dir:{tmp_path / 'model'}", "--text-file",
                     str(tmp_path / "texts.txt"), "--output", str(tmp_path / "txt.npy"), "--batch-size", "5",
                     "--normalize", "--no-progress"]) == 0
    text_features = np.load(tmp_path / "txt.npy")
    expected = model.encode_text(get_tokenizer()(texts), normalize=True)
    np.testing.assert_allclose(text_features, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_features, axis=1), 1.0, rtol=1e-5)


def test_embed_errors(tmp_path, capsys):
    assert cli.main(["embed", "--model", "ViT-Tiny-8", "--images", str(tmp_path / "nope"),
                     "--output", str(tmp_path / "x.npy")]) == 2  # a missing input is a usage or input error
    assert "not found" in capsys.readouterr().err


def test_embed_without_a_model_says_what_to_give(tmp_path, capsys):
    """No --pretrained and no --model: a non-zero status and a message naming the flag (it used to print nothing)."""
    assert cli.main(["embed", "--images", str(tmp_path), "--output", str(tmp_path / "x.npy")]) != 0
    assert "--pretrained" in capsys.readouterr().err


def test_embed_a_manifest_into_shards_resumes_and_refuses_another_model(tmp_path, capsys):
    """A folder output: .npy shards and index.csv; a rerun embeds nothing twice, another model is refused."""
    model = create_model("ViT-Tiny-8", seed=3)
    export_open_clip(model, str(tmp_path / "model"))
    rng = np.random.default_rng(1)
    names = [f"{i}.png" for i in range(5)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("# trap 7\n" + "\n".join(names + ["gone.png"]) + "\n")
    argv = ["embed", "--pretrained", f"local-dir:{tmp_path / 'model'}", "--images", str(tmp_path / "list.txt"),
            "--output", str(tmp_path / "emb"), "--batch-size", "2", "--no-progress", "--workers", "1"]
    assert cli.main(argv) == 0
    assert "5 images embedded, 1 skipped" in capsys.readouterr().err  # a skip makes the summary a warning
    with open(tmp_path / "emb" / "index.csv", newline="") as handle:
        index = list(csv.DictReader(handle))
    assert sorted(row["key"] for row in index) == sorted(str(tmp_path / n) for n in names)
    row = index[0]
    vector = np.load(tmp_path / "emb" / row["shard"])[int(row["row"])]
    preprocess = image_transform(model)
    np.testing.assert_allclose(vector, model.encode_image(preprocess(Image.open(row["key"]))[None])[0],
                               rtol=1e-4, atol=1e-5)
    assert cli.main(argv) == 0
    assert "0 images embedded, 0 skipped, 6 done by an earlier run" in capsys.readouterr().out
    assert cli.main(argv[:2] + ["random", "--model", "ViT-Tiny-8"] + argv[3:]) == 2
    assert "model" in capsys.readouterr().err
