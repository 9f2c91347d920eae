"""Our eval transform equals open_clip's on real-size images of odd sizes and modes."""

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from bioclip_jax import create_model, image_transform
from bioclip_jax.transforms import ImageTransform, PreprocessConfig


def _image(size, mode, fmt, seed):
    rng = np.random.default_rng(seed)
    width, height = size
    # Smooth gradients plus noise, like a photo, so resampling differences would show.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        image = image.convert("RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return Image.open(buffer)


CASES = [((1023, 767), "RGB", "JPEG"), ((641, 1299), "RGB", "JPEG"), ((333, 500), "L", "JPEG"),
         ((801, 603), "RGBA", "PNG"), ((517, 389), "P", "PNG"), ((150, 97), "RGB", "PNG"),
         ((224, 224), "RGB", "JPEG"), ((224, 391), "RGB", "JPEG")]


@pytest.mark.parametrize("size,mode,fmt", CASES)
def test_matches_open_clip_eval_transform(size, mode, fmt):
    _, _, reference = open_clip.create_model_and_transforms("ViT-B-16")
    image = _image(size, mode, fmt, seed=size[0])
    expected = reference(image).numpy().transpose(1, 2, 0)
    ours = image_transform("ViT-B-16")(image)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_preprocess_config_from_exported_folder(tmp_path):
    model = create_model("ViT-Tiny-8", seed=0)
    model.preprocess = PreprocessConfig(size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    from bioclip_jax import export_open_clip

    export_open_clip(model, str(tmp_path))
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    loaded = create_model(None, f"local-dir:{tmp_path}")
    image = _image((300, 200), "RGB", "JPEG", seed=1)
    np.testing.assert_array_equal(image_transform(loaded)(image), reference(image).numpy().transpose(1, 2, 0))


def test_unsupported_preprocess_is_an_error():
    with pytest.raises(ValueError, match="unsupported interpolation"):
        PreprocessConfig.from_open_clip({"interpolation": "box"}, 224)
    with pytest.raises(ValueError, match="expected images of shape"):
        create_model("ViT-Tiny-8").encode_image(np.zeros((1, 32, 32, 3), np.float32))
    assert isinstance(image_transform("ViT-B-32"), ImageTransform)
