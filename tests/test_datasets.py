import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SkippedFileWarning,
    digits_split,
    digits_test_set,
    load_image_folder,
    make_loader,
    synthetic_images,
    write_synthetic_images,
)


def _png(path, value=128, size=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def test_digits_test_set_is_shaped_for_the_builtin_model():
    data = digits_test_set()
    x, y = data.tensors
    assert x.shape == (360, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_shipped_digits_test_set_is_the_sklearn_split():
    pytest.importorskip("sklearn")
    _, _, test_images, test_labels = digits_split()
    x, y = digits_test_set().tensors
    from prunekit.datasets import preprocess_digits

    assert torch.equal(x, preprocess_digits(test_images))
    assert torch.equal(y, torch.as_tensor(test_labels, dtype=torch.int64))


def test_digits_test_set_missing_file_says_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_default_model.py"):
        digits_test_set(tmp_path / "absent.npz")


def test_image_folder_skips_corrupt_and_non_image_files_with_a_warning(tmp_path):
    write_synthetic_images(tmp_path, n=3, image_size=16)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(SkippedFileWarning) as record:
        data = load_image_folder(tmp_path, image_size=16)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert any("broken.jpg" in m and "unreadable" in m for m in messages)
    assert any("notes.txt" in m and "not an image" in m for m in messages)
    assert len(data) == 3 and data[0].shape == (3, 16, 16)


def test_image_folder_skips_a_truncated_image(tmp_path):
    good = write_synthetic_images(tmp_path, n=2, image_size=32)
    data = good[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.warns(SkippedFileWarning, match="truncated.png"):
        assert len(load_image_folder(tmp_path, image_size=32)) == 2


def test_image_folder_without_images_is_an_error_listing_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.warns(SkippedFileWarning), pytest.raises(ValueError, match=r"no readable image.*\.png"):
        load_image_folder(tmp_path, image_size=16)


def test_image_folder_missing_or_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "absent", image_size=16)
    with pytest.raises(NotADirectoryError, match="pass the folder"):
        load_image_folder(_png(tmp_path / "one.png"), image_size=16)


def test_image_folder_is_recursive_and_sorted(tmp_path):
    _png(tmp_path / "b.png", 10)
    _png(tmp_path / "sub" / "a.png", 20)
    _png(tmp_path / "a.png", 30)
    data = load_image_folder(tmp_path, image_size=8, normalize="none")
    assert [p.relative_to(tmp_path).as_posix() for p in data.files] == ["a.png", "b.png", "sub/a.png"]
    assert data[2].mean().item() == pytest.approx(20 / 255, abs=1e-6)


def test_labelled_folder_maps_sorted_subfolders_to_classes(tmp_path):
    _png(tmp_path / "dog" / "1.png")
    _png(tmp_path / "cat" / "1.png")
    _png(tmp_path / "cat" / "2.png")
    _png(tmp_path / "loose.png")
    with pytest.warns(SkippedFileWarning, match="loose.png"):
        data = load_image_folder(tmp_path, image_size=8, labelled=True)
    assert data.classes == ["cat", "dog"]
    assert data.targets == [0, 0, 1]
    image, label = data[2]
    assert image.shape == (3, 8, 8) and label == 1


def test_photo_is_resized_center_cropped_and_normalised(tmp_path):
    from matplotlib import cbook

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    shutil.copy(photo, tmp_path / "grace_hopper.jpg")
    raw = load_image_folder(tmp_path, image_size=40, normalize="none")[0]
    assert raw.shape == (3, 40, 40) and 0.0 <= raw.min() and raw.max() <= 1.0
    normalised = load_image_folder(tmp_path, image_size=40)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normalised, (raw - mean) / std, atol=1e-5)


def test_synthetic_images_are_deterministic_and_varied():
    a, b = synthetic_images(4, 24, seed=1), synthetic_images(4, 24, seed=1)
    assert torch.equal(a[3], b[3])
    assert not torch.equal(a[3], synthetic_images(4, 24, seed=2)[3])
    assert all(a[i].std() > 0.1 for i in range(4))


def test_written_synthetic_images_load_back_as_the_dataset(tmp_path):
    paths = write_synthetic_images(tmp_path, n=3, image_size=20, seed=5)
    assert [p.name for p in paths] == ["synthetic_0000.png", "synthetic_0001.png", "synthetic_0002.png"]
    folder = load_image_folder(tmp_path, image_size=20)
    generated = synthetic_images(3, 20, seed=5)
    assert torch.allclose(folder[1], generated[1], atol=1e-6)


def test_make_loader_keeps_order_and_last_batch():
    data = synthetic_images(5, 8)
    batches = list(make_loader(data, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(batches[2][0], data[4])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_make_loader_rejects_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        make_loader(synthetic_images(2, 8), bad)


def test_bad_image_size_and_normalization_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_image_folder(tmp_path, image_size=0)
    with pytest.raises(ValueError, match="imagenet, none"):
        load_image_folder(tmp_path, image_size=8, normalize="cifar")


def test_random_crops_are_seeded_crops_some_mirrored():
    from prunekit.datasets import random_crops

    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    first = random_crops(images, 8, count=6, batch_size=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, random_crops(images, 8, count=6, batch_size=4, seed=3)))
    windows = {(i, t, l): images[i, :, t:t + 8, l:l + 8] for i in range(2) for t in range(3) for l in range(5)}
    plain = mirrored = 0
    for crop in torch.cat(first):
        plain += any(torch.equal(crop, w) for w in windows.values())
        mirrored += any(torch.equal(crop, w.flip(-1)) for w in windows.values())
    assert plain + mirrored == 24 and plain > 0 and mirrored > 0  # every crop is a window, some mirrored
    with pytest.raises(ValueError, match="exceeds the images"):
        random_crops(images, 11, count=1, batch_size=1)
