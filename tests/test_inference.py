"""Streaming image/text embedding: same numbers as the eager model calls, bounded look-ahead, skips."""

import functools
import os
import threading

import jax
import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax import inference
from bioclip_jax.data import image_items
from bioclip_jax.taxonomy.templates import fill_templates


@pytest.fixture(scope="module")
def model():
    return bioclip_jax.create_model("ViT-Tiny-8", seed=0)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate([(80, 64, "RGB"), (64, 100, "L"), (70, 70, "RGBA"), (90, 66, "RGB"),
                                      (64, 64, "P"), (100, 80, "RGB")]):
        array = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        path = root / f"{i}.png"
        Image.fromarray(array).convert(mode).save(path)
        paths.append(str(path))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    good.save(root / "truncated.jpg")
    data = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return paths, [str(root / "broken.jpg"), str(root / "truncated.jpg")]


def _reference(model, paths):
    transform = bioclip_jax.image_transform(model)
    batch = np.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(batch, normalize=True)


def test_image_stream_matches_eager_encode_and_skips_bad_files(model, image_files):
    good, bad = image_files
    files = good[:3] + [bad[0]] + good[3:] + [bad[1]]
    embedder = inference.ImageEmbedder(model, batch_size=4, workers=2, progress=False)
    out = embedder.embed_all([image_items.file_item(p, label=i) for i, p in enumerate(files)])
    assert out.keys == good  # order kept, unreadable files left out
    assert out.labels == [0, 1, 2, 4, 5, 6]
    assert [s.key for s in out.skipped] == bad
    assert all("Error" in s.reason for s in out.skipped)  # "OSError: Truncated File Read", ...
    np.testing.assert_allclose(out.features, _reference(model, good), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-5)


def test_stream_reads_a_bounded_window_ahead(model, image_files):
    good, _ = image_files
    opened = []

    def items():
        for i in range(40):
            opened.append(i)
            yield image_items.file_item(good[i % len(good)])

    embedder = inference.ImageEmbedder(model, batch_size=4, workers=2, prefetch=2, progress=False)
    seen = 0
    for features, batch in embedder.stream(items()):
        seen += len(batch)
        assert len(opened) - seen <= 4 * 2 + 4 + 1  # window + the batch being filled
        assert features.shape == (len(batch), model.config.embed_dim)
    assert seen == 40


def _open_labelled_by_process(path):
    """An image with the id of the process that opened it as its label."""
    return Image.open(path), os.getpid()


def test_decoding_processes_give_the_same_features_and_skips_as_threads(model, image_files):
    good, bad = image_files
    files = good[:2] + [bad[0]] + good[2:4] + [bad[1]]
    items = [image_items.ImageItem(p, functools.partial(_open_labelled_by_process, p)) for p in files]
    out = {kind: inference.ImageEmbedder(model, batch_size=4, workers=1, progress=False, decoders=kind).embed_all(items)
           for kind in ("processes", "threads")}
    assert out["processes"].keys == out["threads"].keys == good[:4]
    assert [vars(s) for s in out["processes"].skipped] == [vars(s) for s in out["threads"].skipped]
    assert [s.key for s in out["processes"].skipped] == bad
    np.testing.assert_array_equal(out["processes"].features, out["threads"].features)
    assert set(out["threads"].labels) == {os.getpid()}
    assert os.getpid() not in out["processes"].labels  # decoded elsewhere
    # items that cannot be pickled (a lambda) are decoded in threads instead of failing
    unpicklable = [image_items.ImageItem(p, lambda p=p: Image.open(p)) for p in good[:2]]
    embedder = inference.ImageEmbedder(model, batch_size=4, workers=2, progress=False, decoders="processes")
    np.testing.assert_array_equal(embedder.embed_all(unpicklable).features, out["threads"].features[:2])


def test_a_decoding_process_that_dies_ends_the_run_with_one_sentence(model, image_files):
    good, _ = image_files
    items = [image_items.file_item(good[0]), image_items.ImageItem("killer.jpg", functools.partial(os._exit, 3)),
             image_items.file_item(good[1])]
    embedder = inference.ImageEmbedder(model, batch_size=2, workers=1, progress=False, decoders="processes")
    errors = []

    def run():
        try:
            embedder.embed_all(items)
        except Exception as error:  # noqa: BLE001 - the test inspects whatever ended the run
            errors.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "the run hung after its decoding process died"
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "decoding process died" in str(errors[0]) and "\n" not in str(errors[0])


def test_decoder_count_sizes_from_usable_cpus(model, monkeypatch):
    monkeypatch.setattr(inference, "usable_cpus", lambda: 2)
    assert inference.decoder_count(-1) == 1  # one decoder beside the process that feeds the tower
    monkeypatch.setattr(inference, "usable_cpus", lambda: 1)
    assert inference.decoder_count(-1) == 1
    assert inference.decoder_count(3) == 3
    with pytest.raises(ValueError, match="image decoders"):
        inference.decoder_count(0)
    with pytest.raises(ValueError, match="decoders must be one of"):
        inference.ImageEmbedder(model, decoders="fibers")


def test_data_parallel_over_two_devices_gives_same_features(model, image_files):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests run with 8 simulated CPU devices from conftest.py)")
    good, _ = image_files
    embedder = inference.ImageEmbedder(model, batch_size=3, workers=2, progress=False, devices=jax.devices()[:2])
    assert embedder.batch_size == 4  # rounded up to a multiple of the device count
    out = embedder.embed_all(image_items.file_item(p) for p in good)
    np.testing.assert_allclose(out.features, _reference(model, good), atol=2e-5)


def test_text_embedder_template_means_match_eager(model):
    tokenizer = bioclip_jax.get_tokenizer("ViT-B-16")
    templates = ("a photo of a {}.", "a {} in the wild.", "itap of my {}.")
    names = ["Corvus corax", "house sparrow", "Rosa canina", "dog rose", "x"]
    embedder = inference.TextEmbedder(model, batch_size=6)  # 2 names per chunk: uneven last chunk
    got = embedder.classes(names, templates)
    expected = []
    for name in names:
        feats = model.encode_text(tokenizer(fill_templates(name, templates)), normalize=True)
        mean = feats.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(got, np.stack(expected), atol=2e-5)
    plain = embedder.texts(["a photo of a bird.", "a photo of a rose."])
    np.testing.assert_allclose(plain, model.encode_text(tokenizer(["a photo of a bird.", "a photo of a rose."]),
                                                        normalize=True), atol=2e-5)
    assert embedder.classes([], templates).shape == (0, model.config.embed_dim)


def test_list_image_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.JPG", "b/1.png", "b/notes.txt", "a.jpeg"):
        (tmp_path / name).write_bytes(b"")
    files = image_items.list_image_files([str(tmp_path / "b"), str(tmp_path / "a.jpeg")])
    assert files == [str(tmp_path / "b/1.png"), str(tmp_path / "b/2.JPG"), str(tmp_path / "a.jpeg")]
    with pytest.raises(FileNotFoundError, match="image path not found"):
        image_items.list_image_files([str(tmp_path / "missing.jpg")])


def test_sixteen_bit_images_are_scaled_before_embedding(model, tmp_path):
    """embed/eval/predict share the decoder: a 16-bit PNG embeds as its 8-bit version, not as white."""
    ramp = (np.arange(72 * 64, dtype=np.uint32).reshape(64, 72) * 14).astype(np.uint16)
    deep, shallow = tmp_path / "deep.png", tmp_path / "shallow.png"
    Image.fromarray(ramp).save(deep)
    Image.fromarray(np.round(ramp / 257.0).astype(np.uint8)).save(shallow)
    embedder = inference.ImageEmbedder(model, batch_size=2, workers=1, progress=False)
    out = embedder.embed_all([image_items.file_item(str(deep)), image_items.file_item(str(shallow))])
    np.testing.assert_allclose(out.features[0], out.features[1], atol=1e-5)
