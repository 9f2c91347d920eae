"""`bioclip-jax embed`: streamed embeddings equal direct encode_image / encode_text."""

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
