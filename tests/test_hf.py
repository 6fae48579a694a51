"""Hub datasets through flwr-datasets, checked offline on in-memory ``datasets.Dataset`` tables.

Specification: the column names of mnist (image, label), fashion_mnist (image, label) and
cifar10 (img, label) are found; PIL images (grayscale and RGB) and nested pixel lists become
(C, H, W) float32 in [0, 1]; a ClassLabel's class count is used; a table without an image or a
label column is refused naming its columns; flwr-datasets' partitioners (the ones the hub path
uses) split an in-memory table of such images.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from client.hf import arrays_from_table, find_columns
from client.partition import _partitioner


def pil_images(n: int, mode: str, size: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return [PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]


@pytest.mark.parametrize("name, image_col, mode, size, channels", [
    ("mnist", "image", "L", 28, 1),
    ("fashion_mnist", "image", "L", 28, 1),
    ("cifar10", "img", "RGB", 32, 3),
])
def test_hub_image_tables_become_chw_float_arrays(name, image_col, mode, size, channels):
    features = Features({image_col: Image(), "label": ClassLabel(num_classes=10)})
    images = pil_images(12, mode, size)
    table = Dataset.from_dict({image_col: images, "label": [i % 10 for i in range(12)]}, features=features)
    data = arrays_from_table(table, f"hf:{name}")
    assert data.x.shape == (12, channels, size, size) and data.x.dtype == np.float32
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    assert data.image_shape == (channels, size, size) and data.num_classes == 10 and data.feature_range == (0.0, 1.0)
    first = np.asarray(images[0], dtype=np.float32) / 255.0
    expected = first[None] if channels == 1 else np.moveaxis(first, -1, 0)
    np.testing.assert_allclose(data.x[0], expected)


def test_nested_pixel_lists_and_plain_labels_work_too():
    table = Dataset.from_dict({"pixels": [[[0.0, 1.0], [0.5, 0.25]]] * 4, "target": [0, 1, 2, 1]},
                              features=Features({"pixels": [[Value("float32")]], "target": Value("int64")}))
    data = arrays_from_table(table)
    assert data.x.shape == (4, 1, 2, 2) and data.num_classes == 3  # no ClassLabel: largest label + 1


def test_a_table_without_image_or_label_is_refused_naming_its_columns():
    with pytest.raises(ValueError, match=r"found \['text', 'label'\]"):
        find_columns(["text", "label"], "hf:imdb")


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_flwr_datasets_partitioners_split_an_in_memory_image_table(kind):
    table = Dataset.from_dict({"image": pil_images(60, "L", 8), "label": [i % 3 for i in range(60)]},
                              features=Features({"image": Image(), "label": ClassLabel(num_classes=3)}))
    partitioner = _partitioner(kind, 3, 1.0, 0, 2, len(table))
    partitioner.dataset = table
    parts = [arrays_from_table(partitioner.load_partition(i), num_classes=3) for i in range(3)]
    assert all(p.x.shape[1:] == (1, 8, 8) for p in parts)
    if kind != "pathological":
        assert sum(len(p) for p in parts) == 60
