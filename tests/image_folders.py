"""Image folders in the layout users have (one subfolder per class), written by the tests from the embedded
digits as real PNG and JPEG files, plus the awkward files real photo collections hold."""

import io
import os

import numpy as np
from PIL import Image

VAL_SHARE = 0.2  # of each class, in val/ when the folder has train/ and val/


def digit_images(size: int = 32):
    """(uint8 size x size grey images, labels) of all 1797 digits, upscaled as raydist.data does."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = [np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR))
              for img in raw.images]
    return images, raw.target


def write_digits_folder(root, *, split_folders: bool = True, per_class: int = None) -> dict:
    """Every digit as a file of <root>[/train|/val]/digit_<d>/ (every 5th of a class in val/): even indices
    PNG, odd JPEG (quality 95).
    Returns split -> number of files written."""
    images, labels = digit_images()
    written, seen = {}, {}
    for i, (img, label) in enumerate(zip(images, labels)):
        seen[label] = seen.get(label, 0) + 1
        if per_class and seen[label] > per_class:
            continue
        split = ("val" if seen[label] % round(1 / VAL_SHARE) == 0 else "train") if split_folders else ""
        folder = os.path.join(str(root), split, f"digit_{label}")
        os.makedirs(folder, exist_ok=True)
        picture = Image.fromarray(img).convert("RGB")
        if i % 2:
            picture.save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
        else:
            picture.save(os.path.join(folder, f"{i:04d}.png"))
        written[split] = written.get(split, 0) + 1
    return written


def write_awkward_files(folder) -> dict:
    """Into one class folder: a corrupt JPEG, a CMYK JPEG, a palette PNG, a 16-bit grey PNG, an RGBA PNG and
    files that are not images (.DS_Store, Thumbs.db, notes.txt). Returns name -> what it is."""
    os.makedirs(folder, exist_ok=True)
    base = Image.fromarray(digit_images()[0][0]).convert("RGB")
    buffer = io.BytesIO()
    base.save(buffer, format="JPEG")
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as fh:
        fh.write(buffer.getvalue()[:200])  # the header, then nothing: truncated mid-scan
    base.convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
    base.convert("P", palette=Image.ADAPTIVE).save(os.path.join(folder, "palette.png"))
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # 0..65535
    Image.fromarray(grey16).save(os.path.join(folder, "grey16.png"))
    base.convert("RGBA").save(os.path.join(folder, "rgba.png"))
    for name in (".DS_Store", "Thumbs.db", "notes.txt"):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(b"\x00\x01 not an image")
    return {"corrupt.jpg": "bad", "cmyk.jpg": "image", "palette.png": "image", "grey16.png": "image",
            "rgba.png": "image", ".DS_Store": "ignored", "Thumbs.db": "ignored", "notes.txt": "ignored"}
