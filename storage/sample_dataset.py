"""A sample dataset made in code: a few dozen small captioned images of coloured shapes, so a new
user can go from `make serve` to a training run without bringing images.

    python -m storage.sample_dataset --root var/storage            # creates "sample-shapes"
    python -m storage.sample_dataset --root var/storage --count 48 --name shapes48

Each image is a shape (circle, square, triangle or diamond) of one colour on a background of
another, drawn with PIL, with a caption that says so ("a red circle on a light blue background,
sks shapes"). The images and captions are the same on every run (fixed seed), so adding them twice
adds nothing (the dataset dedupes by content hash).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys

from PIL import Image, ImageDraw

from storage.datasets import DatasetExistsError, DatasetStore, ImageItem
from storage.fs import Storage

SAMPLE_NAME = "sample-shapes"
TRIGGER = "sks shapes"
COLOURS = {"red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (240, 210, 40), "green": (40, 170, 70),
           "blue": (40, 90, 220), "purple": (140, 60, 190), "black": (20, 20, 20), "white": (245, 245, 245)}
BACKGROUNDS = {"light blue": (200, 225, 250), "pale yellow": (250, 245, 200), "grey": (150, 150, 150),
               "dark green": (20, 70, 40), "pink": (250, 200, 215)}
SHAPES = ("circle", "square", "triangle", "diamond")


def _draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int,
          rng: random.Random) -> bytes:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = int(size * rng.uniform(0.22, 0.34))
    cx, cy = (int(size * rng.uniform(0.38, 0.62)) for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_items(count: int = 32, size: int = 64, seed: int = 0) -> list[ImageItem]:
    """``count`` captioned images, the same for the same arguments."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour = list(COLOURS)[(index * 3 + index // len(SHAPES)) % len(COLOURS)]
        background = list(BACKGROUNDS)[(index + index // 7) % len(BACKGROUNDS)]
        if COLOURS[colour] == BACKGROUNDS[background]:
            background = "grey"
        data = _draw(shape, COLOURS[colour], BACKGROUNDS[background], size, rng)
        items.append(ImageItem(filename=f"shape_{index:03d}.png", data=data,
                               caption=f"a {colour} {shape} on a {background} background, {TRIGGER}",
                               tags=["sample", shape, colour], source="sample", license="CC0-1.0",
                               attribution={"source": "sample", "title": f"{colour} {shape}",
                                            "photographer": "Atelier (made in code)"}))
    return items


def make_sample_dataset(store: DatasetStore, name: str = SAMPLE_NAME, count: int = 32, size: int = 64,
                        owner: str | None = None) -> dict:
    """Create (or fill again) the sample dataset; returns its id, version and image count."""
    try:
        dataset_id = store.create(name, description=f"{count} shapes made in code, for a first training run",
                                  trigger_word=TRIGGER, license="CC0-1.0", owner=owner).id
    except DatasetExistsError:
        dataset_id = store.resolve(name, owner)
    result = store.add_images(dataset_id, sample_items(count, size))
    return {"id": dataset_id, "name": name, "version": result.version, "images": result.images,
            "added": result.added}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="var/storage", help="The storage root (a folder or s3://bucket/prefix).")
    parser.add_argument("--name", default=SAMPLE_NAME)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--owner", default=None, help="The tenant that owns it (an API key's owner); none: open mode.")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 1000 or not 16 <= args.size <= 1024:
        parser.error("--count must be 1..1000 and --size 16..1024")
    print(json.dumps(make_sample_dataset(DatasetStore(Storage(args.root)), args.name, args.count, args.size,
                                         args.owner)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
