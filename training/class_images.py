"""DreamBooth class images: generated once by Ray Data batch inference with the SDXL pipeline, cached in storage.

    keys = ensure_class_images(config, storage, plan.class_images_prefix)   # generates the missing ones
    ds = class_dataset(config, storage, keys)                                # the training loop's "class" dataset

The cache is keyed by what decides the images (base model, class prompt, resolution, steps), so
runs that agree on those share it (:func:`training.plan.class_images_prefix`)::

    training/class_images/<hash>/<index>.png       class image ``index`` is generated with seed ``index``
"""

from __future__ import annotations

import io
from functools import partial

import numpy as np

from storage.fs import Storage
from training.config import TrainConfig
from training.plan import class_image_key

__all__ = ["ClassImageGenerator", "ensure_class_images", "class_dataset"]


class ClassImageGenerator:
    """Ray Data ``map_batches`` callable: one SDXL pipeline per actor; class image ``i`` is seeded ``i``."""

    def __init__(self, base_model: str, storage: Storage, prefix: str, prompt: str, resolution: int, steps: int,
                 use_gpu: bool):
        import torch
        from diffusers import StableDiffusionXLPipeline

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = StableDiffusionXLPipeline.from_pretrained(base_model, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.storage, self.prefix, self.prompt = storage, prefix, prompt
        self.resolution, self.steps = resolution, steps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        indices = [int(i) for i in batch["index"]]
        images = self.pipe(
            prompt=[self.prompt] * len(indices), num_inference_steps=self.steps, width=self.resolution,
            height=self.resolution, generator=[torch.Generator("cpu").manual_seed(i) for i in indices],
        ).images
        keys = []
        for index, image in zip(indices, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            keys.append(self.storage.put_bytes(class_image_key(self.prefix, index), buffer.getvalue(), "image/png"))
        return {"key": np.asarray(keys, dtype=object)}


def ensure_class_images(config: TrainConfig, storage: Storage, prefix: str, cpus: float = 1.0) -> list[str]:
    """Keys of ``num_class_images`` class images, generating the missing ones (Ray Data batch inference)."""
    import ray

    wanted = [class_image_key(prefix, i) for i in range(config.num_class_images)]
    present = set(storage.list(prefix))
    missing = [i for i, key in enumerate(wanted) if key not in present]
    if missing:
        generated = (
            ray.data.from_items([{"index": i} for i in missing])
            .map_batches(ClassImageGenerator, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus,
                         num_gpus=1 if config.use_gpu else 0,
                         fn_constructor_kwargs=dict(base_model=config.base_model, storage=storage, prefix=prefix,
                                                    prompt=config.class_prompt, resolution=config.resolution,
                                                    steps=config.class_inference_steps, use_gpu=config.use_gpu))
            .take_all()
        )
        if len(generated) != len(missing):
            raise RuntimeError(f"generated {len(generated)} class images, expected {len(missing)}")
    return wanted


def _load_class_images(batch: dict[str, np.ndarray], storage: Storage, caption: str) -> dict[str, np.ndarray]:
    from PIL import Image

    images = []
    for key in batch["key"]:
        with Image.open(io.BytesIO(storage.get_bytes(str(key)))) as image:
            images.append(np.asarray(image.convert("RGB")))
    n, (height, width) = len(images), images[0].shape[:2]
    column = lambda value: np.full(n, value, dtype=np.int32)  # noqa: E731
    return {"image": np.stack(images), "caption": np.asarray([caption] * n, dtype=object),
            "width": column(width), "height": column(height), "original_width": column(width),
            "original_height": column(height), "crop_top": column(0), "crop_left": column(0)}


def class_dataset(config: TrainConfig, storage: Storage, keys: list[str]):
    """The class images as a Ray Dataset of training rows (the columns of :mod:`training.data`'s prepared rows)."""
    import ray

    return ray.data.from_items([{"key": k} for k in keys]).map_batches(
        partial(_load_class_images, storage=storage, caption=config.class_prompt), batch_format="numpy",
        batch_size=None, num_cpus=config.data_cpus)
