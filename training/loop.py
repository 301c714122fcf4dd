"""LoRA and DreamBooth fine-tuning of SDXL on Ray Train, over a dataset from :mod:`storage.datasets`.

    result = train(load_config("cfg.yaml"))                # from Python (connects to / starts Ray)
    python -m training.cli --config cfg.yaml               # the same from the command line, or as a Ray job

What a run does:

1. :func:`training.plan.check_inputs` refuses bad input before anything starts (unknown dataset,
   version or base model, too few images, a taken name, a checkpoint trained another way) and
   plans the run: its name, dataset version, captions and number of steps.
2. The dataset version is read as a Ray Dataset (:func:`training.data.read_dataset`) and
   prepared (center crop to ``resolution``, captions). DreamBooth class images that are missing
   from the cache are generated first by a Ray Data ``map_batches`` batch-inference step with the
   SDXL pipeline, and cached in storage for later runs (:mod:`training.class_images`).
3. A ``TorchTrainer`` runs the loop on ``num_workers`` workers (data parallel: each worker gets a
   shard through ``ray.train.get_dataset_shard``; ``ray.train.torch.prepare_model`` wraps the
   trainable models in DistributedDataParallel, which averages the LoRA gradients once per optimizer
   step, in the backward of its last micro-batch). The loss is SDXL's: VAE latents, noise at random
   timesteps, the UNet conditioned on both text encoders and the size/crop time ids, with epsilon
   or v-prediction targets from the scheduler config, plus the prior-preservation term for
   DreamBooth (as in diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``).
4. Every ``checkpoint_every_steps`` the LoRA weights, optimizer and scheduler state are reported
   with ``ray.train.report`` to the run folder in storage. A restarted worker group
   (``FailureConfig(max_failures)``) and a re-run with the same run name resume from the latest
   checkpoint, not from step 0.
5. At the end, rank 0 saves ``pytorch_lora_weights.safetensors`` with
   ``StableDiffusionXLPipeline.save_lora_weights``, loads it into a fresh pipeline to render the
   validation images at the configured seeds, writes the manifest and registers the adapter in
   :class:`storage.registry.LoraRegistry`. A run that fails registers nothing.

The run's storage layout is described in :mod:`training.plan`. While a run goes on,
:func:`training.plan.read_status` (or any reader of ``status.json``) shows its progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from storage.fs import Storage
from storage.registry import LoraManifest, LoraRecord, LoraRegistry
from training.class_images import class_dataset, ensure_class_images
from training.config import TEXT_ENCODER_TARGET_MODULES, TrainConfig, load_config
from training.plan import (StatusWriter, TrainPlan, TrainResult, check_inputs, checkpoint_dir_name, read_status,
                           resume_record, run_prefix)

__all__ = ["train", "FAIL_AT_ENV"]

# Test hook: "RANK:STEP" makes that worker exit abruptly once, right after that optimizer step.
FAIL_AT_ENV = "ATELIER_TRAIN_FAIL_AT"


# --- datasets ---------------------------------------------------------------------------------------


def _set_captions(batch: dict[str, np.ndarray], caption: str | None, trigger_word: str | None,
                  replace: bool) -> dict[str, np.ndarray]:
    """DreamBooth: every image gets the instance caption. LoRA: captions gain the trigger word if absent."""
    captions = []
    for text in batch["caption"]:
        text = str(text)
        if replace and caption:
            text = caption
        elif trigger_word and trigger_word.lower() not in text.lower():
            text = f"{trigger_word}, {text}" if text.strip() else trigger_word
        captions.append(text)
    batch["caption"] = np.asarray(captions, dtype=object)
    return batch


def _instance_dataset(config: TrainConfig, plan: TrainPlan):
    from training.data import prepare_for_training, read_dataset

    ds = read_dataset(config.storage_root, config.storage_options, plan.dataset_id, plan.dataset_version,
                      num_cpus=config.data_cpus)
    ds = prepare_for_training(ds, config.resolution, "center_crop", config.min_size, config.instance_prompt,
                              plan.trigger_word, num_cpus=config.data_cpus)
    return ds.map_batches(partial(_set_captions, caption=plan.instance_caption, trigger_word=plan.trigger_word,
                                  replace=config.method == "dreambooth"), batch_format="numpy", batch_size=None,
                          num_cpus=config.data_cpus)


def _ray_storage(storage: Storage) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: the storage root's ``training/`` folder."""
    if storage.protocol == "file":
        return os.path.join(storage.root, "training"), None
    import pyarrow.fs

    # The same s3fs instance (endpoint, credentials) as Storage, seen through pyarrow.
    return f"{storage.root.removeprefix('s3://')}/training", pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


# The code's root on this node: the checkout, or this node's copy of a job's working_dir.
CODE_ROOT = Path(__file__).resolve().parents[1]


def _shipped_in_working_dir(path: str) -> bool:
    """A relative path inside this job's runtime_env working_dir: every worker, on whichever node,
    has its own copy of that folder as its cwd, so the path stays relative (an absolute path would
    name this node's copy, which other nodes do not have)."""
    if os.path.isabs(path):
        return False
    try:  # a Ray job's driver: the job's runtime_env, as the job supervisor hands it over
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def _fail_at_from_env() -> tuple[int, int] | None:
    value = os.environ.get(FAIL_AT_ENV)
    if not value:
        return None
    rank, _, step = value.partition(":")
    return int(rank), int(step)


# --- the driver -------------------------------------------------------------------------------------


def train(config: TrainConfig | dict | str | os.PathLike) -> TrainResult:
    """Check, prepare and run one training job; returns the registered adapter and final metrics.

    Raises TrainConfigError (with ``param``) on bad input before anything runs, and the training
    error (``ray.train.TrainingFailedError``) if the run fails; nothing is registered then.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # 1. Check inputs. Workers run in another working directory: local paths become absolute.
    config = load_config(config)
    plan = check_inputs(config)
    storage = Storage(config.storage_root, config.storage_options)
    base_model = config.base_model
    if os.path.isdir(base_model) and not _shipped_in_working_dir(base_model):
        base_model = os.path.abspath(base_model)
    config = config.model_copy(update={"storage_root": storage.root, "base_model": base_model})
    status = StatusWriter(storage, config.name, plan.run_name, state="preparing", error=None,
                          total_steps=plan.total_steps)
    status.update()
    print(f"[{plan.run_name}] {config.method} on {plan.num_images} images of {plan.dataset_id} "
          f"v{plan.dataset_version}: {plan.total_steps} steps on {config.num_workers} workers", flush=True)
    try:
        if not ray.is_initialized():
            ray.init()

        # 2. Datasets: the instance images, and for DreamBooth the (cached or generated) class images.
        datasets = {"train": _instance_dataset(config, plan)}
        if config.method == "dreambooth":
            status.update(state="generating_class_images")
            keys = ensure_class_images(config, storage, plan.class_images_prefix,
                                       cpus=min(1.0, config.cpus_per_worker * config.num_workers))
            datasets["class"] = class_dataset(config, storage, keys)

        # 3. Train on Ray Train workers.
        status.update(state="training")
        storage_path, filesystem = _ray_storage(storage)
        resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
        # Ray Train records train_loop_config in its run state (the dashboard's Train page, exported
        # events): the storage credentials travel through the object store, not in it.
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "plan": plan.model_dump(mode="json"),
                               "storage_options": ray.put(config.storage_options), "fail_at": _fail_at_from_env()},
            scaling_config=ScalingConfig(
                num_workers=(config.min_workers, config.num_workers) if config.min_workers else config.num_workers,
                use_gpu=config.use_gpu, resources_per_worker=resources, placement_strategy=config.placement_strategy),
            run_config=RunConfig(
                name=plan.run_name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep)),
            datasets=datasets,
        )
        result = trainer.fit()
    except BaseException as exc:
        # re-read: rank 0 has been writing the step and loss meanwhile
        StatusWriter(storage, config.name, plan.run_name).update(state="failed",
                                                                 error=f"{type(exc).__name__}: {exc}"[:4000])
        raise

    # 4. Rank 0 registered the adapter; report it.
    output = result.return_value or {}
    registry = LoraRegistry(storage)
    record = (LoraRecord.model_validate(output["lora"]) if "lora" in output
              else registry.find_by_run(config.name, plan.run_name))
    if record is None:
        StatusWriter(storage, config.name, plan.run_name).update(
            state="failed", error="training finished but no adapter was registered")
        raise RuntimeError(f"run {plan.run_name!r} finished without registering an adapter")
    metrics = output.get("metrics") or record.manifest.metrics
    StatusWriter(storage, config.name, plan.run_name).update(state="succeeded", lora=record.id, error=None)
    print(f"[{plan.run_name}] registered {record.id}", flush=True)
    return TrainResult(run_name=plan.run_name, lora=record, metrics=metrics)


# --- the worker ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Models:
    pipe: Any  # StableDiffusionXLPipeline holding the modules below (validation renders through it)
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    weight_dtype: Any


@dataclasses.dataclass
class _Encoded:
    """One micro-batch ready for the UNet (instance rows first, then class rows with prior preservation)."""

    latents: Any
    time_ids: Any
    captions: list[str]
    prompt_embeds: Any = None  # None when the text encoders train: encoded every step
    pooled_embeds: Any = None


def _load_models(config: TrainConfig, device, weight_dtype) -> _Models:
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(config.base_model, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16; diffusers' scripts keep it in fp32
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return _Models(pipe=pipe, unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                   tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
                   noise_scheduler=DDPMScheduler.from_pretrained(config.base_model, subfolder="scheduler"),
                   weight_dtype=weight_dtype)


def _add_lora(models: _Models, config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Adds the adapters; returns the trainable parameters by module (``unet``, ``text_encoder``...)."""
    from peft import LoraConfig

    models.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=config.target_modules))
    modules = {"unet": models.unet}
    if config.train_text_encoder:
        text_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=TEXT_ENCODER_TARGET_MODULES)
        for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders):
            encoder.add_adapter(text_config)
            modules[name] = encoder
    trainable = {}
    for name, module in modules.items():
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        for p in params.values():
            p.data = p.data.to(torch.float32)  # LoRA weights train in fp32 under mixed precision
        trainable[name] = params
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    return trainable


def _encode_prompts(models: _Models, captions: list[str], device) -> tuple[Any, Any]:
    # From diffusers' train_dreambooth_lora_sdxl.py `encode_prompt`: the penultimate hidden states of
    # both encoders, concatenated; the pooled embedding of the second.
    embeds, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = output[0]
        embeds.append(output[-1][-2])
    return torch.cat(embeds, dim=-1), pooled.view(len(captions), -1)


def _encode_batch(models: _Models, batch: dict[str, np.ndarray], device, encode_text: bool) -> _Encoded:
    pixels = torch.from_numpy(np.ascontiguousarray(np.stack(list(batch["image"])))).permute(0, 3, 1, 2)
    pixels = pixels.to(device, torch.float32) / 127.5 - 1.0
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample() * models.vae.config.scaling_factor
        # SDXL micro-conditioning: original size, crop top-left, target size (all height first)
        time_ids = torch.tensor(np.stack([batch["original_height"], batch["original_width"], batch["crop_top"],
                                          batch["crop_left"], batch["height"], batch["width"]], axis=1),
                                dtype=torch.float32)
        captions = [str(c) for c in batch["caption"]]
        encoded = _Encoded(latents=latents, time_ids=time_ids, captions=captions)
        if encode_text:
            encoded.prompt_embeds, encoded.pooled_embeds = _encode_prompts(models, captions, device)
    return encoded


def _merge_batches(instance: dict, prior: dict) -> dict:
    keys = ("image", "caption", "original_height", "original_width", "crop_top", "crop_left", "height", "width")
    return {k: np.concatenate([np.asarray(list(instance[k]) if k == "image" else instance[k]),
                               np.asarray(list(prior[k]) if k == "image" else prior[k])]) for k in keys}


def _batches(models: _Models, shard, class_shard, config: TrainConfig, device, rank: int, first_epoch: int
             ) -> Iterator[tuple[_Encoded, int]]:
    """Endless ``(micro-batch, epoch)`` of this worker's shard. With ``cache_latents`` the first
    epoch is encoded once and later epochs replay it in a new order, without reading the data again."""
    encode_text = not config.train_text_encoder
    iterate = lambda ds, epoch: ds.iter_batches(  # noqa: E731
        batch_size=config.batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=max(4 * config.batch_size, 16), local_shuffle_seed=config.seed + 7919 * epoch + rank)

    def class_batches() -> Iterator[dict]:
        epoch = first_epoch
        while True:
            count = 0
            for batch in iterate(class_shard, epoch):
                count += 1
                yield batch
            if count == 0:
                raise RuntimeError(f"worker {rank}'s class image shard holds fewer than batch_size images")
            epoch += 1

    prior = class_batches() if class_shard is not None else None
    cache: list[_Encoded] = []
    epoch = first_epoch
    while True:
        if cache:
            order = np.random.default_rng(config.seed + epoch + 104729 * rank).permutation(len(cache))
            for i in order:
                yield cache[i], epoch
        else:
            count = 0
            for batch in iterate(shard, epoch):
                encoded = _encode_batch(models, _merge_batches(batch, next(prior)) if prior else batch, device,
                                        encode_text)
                if config.cache_latents:
                    cache.append(encoded)
                count += 1
                yield encoded, epoch
            if count == 0:
                raise RuntimeError(f"worker {rank}'s data shard holds fewer than batch_size={config.batch_size} images")
        epoch += 1


def _loss(denoiser: torch.nn.Module, models: _Models, batch: _Encoded, config: TrainConfig, device, autocast) -> Any:
    # From diffusers' train_dreambooth_lora_sdxl.py: noise the latents at random timesteps and
    # regress the UNet's prediction on the scheduler's target.
    scheduler = models.noise_scheduler
    latents = batch.latents.to(device, torch.float32)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prompt_embeds = pooled = None  # None: the text encoders train, and the denoiser encodes with gradients
    if batch.prompt_embeds is not None:
        prompt_embeds, pooled = batch.prompt_embeds.to(device), batch.pooled_embeds.to(device)
    with autocast():  # fp32 LoRA weights on fp16/bf16 base weights need autocast
        prediction = denoiser(noisy.to(models.weight_dtype), timesteps, batch.time_ids.to(device), batch.captions,
                              prompt_embeds, pooled)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {scheduler.config.prediction_type}")
    if config.method == "dreambooth":  # instance rows first, class rows second
        prediction, prior_prediction = torch.chunk(prediction, 2, dim=0)
        target, prior_target = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(prior_prediction.float(), prior_target.float(), reduction="mean")
        return F.mse_loss(prediction.float(), target.float(), reduction="mean") + config.prior_loss_weight * prior_loss
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


class _Denoiser(torch.nn.Module):
    """The models of one training forward, so that one DDP wrapper holds every LoRA weight: the UNet,
    and the text encoders (trained with ``train_text_encoder``, else given ``prompt_embeds``). Returns
    the UNet's prediction and nothing else, so that DDP sees which LoRA weights the loss does not
    reach (``text_encoder``'s last layer only feeds its last hidden state, which SDXL does not use)."""

    def __init__(self, models: _Models, device):
        super().__init__()
        self.models, self.device = models, device
        self.unet = models.unet
        self.text_encoders = torch.nn.ModuleList(models.text_encoders)

    def forward(self, noisy, timesteps, time_ids, captions: list[str], prompt_embeds=None, pooled_embeds=None):
        if prompt_embeds is None:  # the text encoders train: encode with gradients
            prompt_embeds, pooled_embeds = _encode_prompts(self.models, captions, self.device)
        return self.unet(noisy, timesteps, prompt_embeds,
                         added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled_embeds}, return_dict=False)[0]


def _prepare_denoiser(models: _Models, config: TrainConfig, device) -> torch.nn.Module:
    """The denoiser, data parallel: Ray Train's ``prepare_model`` wraps it in DistributedDataParallel
    when there are several workers. DDP broadcasts rank 0's LoRA weights once, here, and averages the
    LoRA gradients during backward. The frozen base weights and the buffers stay out of it: they are
    the same on every rank, and SDXL's would be gigabytes to broadcast."""
    import ray.train.torch

    denoiser = _Denoiser(models, device)
    frozen = [name for name, p in denoiser.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        denoiser, frozen + [name for name, _ in denoiser.named_buffers()])
    return ray.train.torch.prepare_model(denoiser, move_to_device=False, parallel_strategy_kwargs={
        "find_unused_parameters": config.train_text_encoder, "broadcast_buffers": False})


def _mean_over_workers(value, world_size: int):
    """``value`` (a tensor) averaged over the workers, in place."""
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return value


def _save_checkpoint(folder: str, trainable: dict, optimizer, lr_scheduler, scaler, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({f"{m}.{n}": p.detach().cpu().contiguous() for m, ps in trainable.items() for n, p in ps.items()},
              os.path.join(folder, "lora.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)


def _load_checkpoint(folder: str, trainable: dict, optimizer, lr_scheduler, scaler) -> dict:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "lora.safetensors"))
    with torch.no_grad():
        for m, params in trainable.items():
            for n, p in params.items():
                p.copy_(weights[f"{m}.{n}"])
    # Tensors and plain values only: a checkpoint in storage must not be able to run code when resumed.
    path = os.path.join(folder, "optimizer.pt")
    try:
        training_state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(f"refusing to load checkpoint {path}: it holds more than tensors and plain values "
                           f"(torch.load weights_only): {exc}") from None
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if scaler is not None and training_state.get("scaler"):
        scaler.load_state_dict(training_state["scaler"])
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def _latest_checkpoint(storage: Storage, run_name: str, rank: int, world: int, device):
    """The checkpoint to resume from: ``ray.train.get_checkpoint()``, or a newer one rank 0 recorded.

    Ray registers a reported checkpoint when it next polls the workers (every couple of seconds),
    so one uploaded just before a worker died can be missing from ``get_checkpoint()``. Rank 0
    records every finished upload in status.json; the newer of the two wins, agreed by broadcast.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    match = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(checkpoint.path.rstrip("/"))) if checkpoint else None
    step = int(match.group(1)) if match else 0
    if rank == 0:
        status = read_status(storage, run_name)
        if status is not None and (status.checkpoint_step or 0) > step:
            step = status.checkpoint_step
    if world > 1:
        agreed = torch.tensor([step], dtype=torch.int64, device=device)
        dist.broadcast(agreed, src=0)
        step = int(agreed.item())
    if step == 0:
        return checkpoint  # none, or one not named by this module
    if checkpoint is not None and checkpoint.path.rstrip("/").endswith(checkpoint_dir_name(step)):
        return checkpoint
    storage_path, filesystem = _ray_storage(storage)
    return ray.train.Checkpoint(path=f"{storage_path}/{run_name}/{checkpoint_dir_name(step)}", filesystem=filesystem)


def _validation_key(run_name: str, step: int, seed: int) -> str:
    return f"{run_prefix(run_name)}validation/step-{step:06d}/seed-{seed}.png"


def _render(pipe, prompt: str, seeds: list[int], config: TrainConfig, autocast) -> list:
    with autocast():
        return pipe(prompt=[prompt] * len(seeds), num_inference_steps=config.validation_inference_steps,
                    width=config.resolution, height=config.resolution,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images


def _store_validation(storage: Storage, run_name: str, step: int, seeds: list[int], images: list) -> list[dict]:
    out = []
    for seed, image in zip(seeds, images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = storage.put_bytes(_validation_key(run_name, step, seed), buffer.getvalue(), "image/png")
        out.append({"step": step, "seed": seed, "key": key})
    return out


def _finalize(models: _Models, config: TrainConfig, plan: TrainPlan, storage: Storage, metrics: dict,
              device, autocast) -> dict:
    """Rank 0, after the last checkpoint: save the adapter, render with it, register it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    registry = LoraRegistry(storage)
    done = registry.find_by_run(config.name, plan.run_name)  # a retried finalize registers once
    if done is not None:
        return {"lora": done.model_dump(mode="json"), "metrics": done.manifest.metrics}

    with tempfile.TemporaryDirectory() as folder:
        # 1. The adapter, in diffusers' format (as train_dreambooth_lora_sdxl.py saves it).
        layers: dict[str, Any] = {
            "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet)),
            "unet_lora_adapter_metadata": models.unet.peft_config["default"].to_dict()}
        if config.train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders):
                layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
                layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        StableDiffusionXLPipeline.save_lora_weights(folder, **layers)

        # 2. Validation images with the saved file loaded into a fresh pipeline, as a server loads it.
        pipe = StableDiffusionXLPipeline.from_pretrained(config.base_model, torch_dtype=models.weight_dtype,
                                                         vae=models.vae).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(folder, adapter_name="trained")
        images = _render(pipe, plan.validation_prompt, config.validation_seeds, config, autocast)
        _store_validation(storage, plan.run_name, metrics["step"], config.validation_seeds, images)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        # 3. Manifest, and registration.
        validation = []
        for key in storage.list(f"{run_prefix(plan.run_name)}validation/"):
            step_part, seed_part = key.split("/")[-2:]
            validation.append({"step": int(step_part.removeprefix("step-")),
                               "seed": int(seed_part.removeprefix("seed-").removesuffix(".png")), "key": key})
        manifest = LoraManifest(
            base_model=config.base_model, method=config.method, trigger_word=plan.trigger_word, rank=config.rank,
            alpha=config.lora_alpha, target_modules=config.target_modules,
            train_text_encoder=config.train_text_encoder, dataset_id=plan.dataset_id,
            dataset_version=plan.dataset_version, hyperparameters={**config.hyperparameters(),
                                                                   "total_steps": plan.total_steps},
            metrics=metrics, validation_prompt=plan.validation_prompt, validation_seeds=config.validation_seeds,
            validation_images=validation, training_run=plan.run_name)
        record = registry.register(config.name, manifest, folder, new_version=config.new_version,
                                   owner=config.owner, public=config.public)
    return {"lora": record.model_dump(mode="json"), "metrics": metrics}


def _worker_config(loop_config: dict) -> TrainConfig:
    """The run's config on a worker: the loop config's (which leaves storage_options out), with the storage
    options from the object store (``train`` put them there)."""
    import ray

    config = TrainConfig.model_validate(loop_config["config"])
    ref = loop_config.get("storage_options")
    update = {"storage_options": dict(ray.get(ref)) if ref is not None else {}}
    # A relative base model was shipped in the job's working_dir: Ray Train moves a worker's cwd to
    # its run folder, so it resolves against this node's copy of the code (where this file is).
    if not os.path.isabs(config.base_model) and (CODE_ROOT / config.base_model).is_dir():
        update["base_model"] = str(CODE_ROOT / config.base_model)
    return config.model_copy(update=update)


def _train_loop(loop_config: dict) -> dict | None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler

    config = _worker_config(loop_config)
    plan = TrainPlan.model_validate(loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    storage = Storage(config.storage_root, config.storage_options)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    if weight_dtype is torch.float32:
        autocast = contextlib.nullcontext
    else:
        autocast = partial(torch.autocast, device_type=device.type, dtype=weight_dtype)

    # 1. Models, with LoRA layers initialised from the same seed on every rank.
    torch.manual_seed(config.seed)
    models = _load_models(config, device, weight_dtype)
    trainable = _add_lora(models, config)
    groups = [{"params": list(trainable["unet"].values()), "lr": config.learning_rate}]
    if config.train_text_encoder:
        groups.append({"params": [p for m in ("text_encoder", "text_encoder_2") for p in trainable[m].values()],
                       "lr": config.text_encoder_learning_rate or config.learning_rate})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=plan.total_steps)
    scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None

    # 2. Resume from the latest checkpoint: after a worker failure, or a re-run of the same run name.
    state = {"step": 0, "resumed_from_steps": [], "loss": None}
    checkpoint = _latest_checkpoint(storage, plan.run_name, rank, world, device)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _load_checkpoint(folder, trainable, optimizer, lr_scheduler, scaler)
        state["resumed_from_steps"] = state.get("resumed_from_steps", []) + [state["step"]]
    state["config"] = resume_record(config, plan)  # check_resume compares a later run against it
    denoiser = _prepare_denoiser(models, config, device)  # DDP with several workers: rank 0's weights from here
    sync_later = denoiser.no_sync if isinstance(denoiser, DistributedDataParallel) else contextlib.nullcontext
    step = start_step = state["step"]
    torch.manual_seed(config.seed + 1_000_003 * (rank + 1) + start_step)  # per-rank noise, new after a resume
    status = None
    if rank == 0:
        status = StatusWriter(storage, config.name, plan.run_name)
        status.update(state="training", step=step, total_steps=plan.total_steps,
                      resumed_from_step=start_step if checkpoint is not None else None)
        if checkpoint is not None:
            print(f"[{plan.run_name}] resumed from checkpoint at step {start_step}", flush=True)

    # 3. Train.
    shard = ray.train.get_dataset_shard("train")
    class_shard = ray.train.get_dataset_shard("class") if config.method == "dreambooth" else None
    batches = _batches(models, shard, class_shard, config, device, rank, first_epoch=step // plan.steps_per_epoch)
    samples_per_step = config.batch_size * config.gradient_accumulation * world
    fail_at = loop_config.get("fail_at")
    fail_marker = f"{run_prefix(plan.run_name)}fault-injected"
    recent_losses: list[float] = []
    timed_steps, timed_seconds, epoch = 0, 0.0, step // plan.steps_per_epoch
    total_epochs = -(-plan.total_steps // plan.steps_per_epoch)  # epochs as the plan counts them, in steps
    models.unet.train()
    while step < plan.total_steps:
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for micro_batch in range(config.gradient_accumulation):
            batch, epoch = next(batches)
            # data parallel: DDP averages the accumulated gradients in the last micro-batch's backward
            last = micro_batch == config.gradient_accumulation - 1
            with contextlib.nullcontext() if last else sync_later():
                loss = _loss(denoiser, models, batch, config, device, autocast) / config.gradient_accumulation
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach()
        for p in params:  # LoRA weights the loss does not reach step with a zero gradient (AdamW's weight decay)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _mean_over_workers(step_loss, world)  # the loss reported: the mean over workers
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        if step > start_step + 1:  # the first step of an attempt pays for warm-up; leave it out
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + elapsed
        loss_value = float(step_loss)
        recent_losses = (recent_losses + [loss_value])[-20:]
        metrics = {
            "step": step, "total_steps": plan.total_steps, "epoch": epoch, "loss": loss_value,
            "loss_avg": sum(recent_losses) / len(recent_losses), "learning_rate": lr_scheduler.get_last_lr()[0],
            "samples_per_s": samples_per_step * timed_steps / timed_seconds if timed_seconds else None,
            "workers": world, "resumed_from_steps": state["resumed_from_steps"],
        }

        if fail_at and rank == fail_at[0] and step == fail_at[1] and not storage.exists(fail_marker):
            storage.put_bytes(fail_marker, b"1")
            print(f"[{plan.run_name}] worker {rank}: injected failure at step {step}", flush=True)
            os._exit(1)

        if rank == 0:
            rate = f"{metrics['samples_per_s']:.2f} samples/s" if metrics["samples_per_s"] else "warming up"
            # one line per step; the fine-tuning API parses it into a metrics event (api/fine_tuning/service.py)
            print(f"[{plan.run_name}] step {step}/{plan.total_steps} loss {loss_value:.4f} "
                  f"lr {metrics['learning_rate']:.2e} epoch {-(-step // plan.steps_per_epoch)}/{total_epochs} {rate}", flush=True)
            status.update(step=step, epoch=epoch, loss=loss_value, learning_rate=metrics["learning_rate"],
                          samples_per_s=metrics["samples_per_s"])
            if config.validation_every_steps and step % config.validation_every_steps == 0 and step < plan.total_steps:
                images = _render(models.pipe, plan.validation_prompt, config.validation_seeds, config, autocast)
                stored = _store_validation(storage, plan.run_name, step, config.validation_seeds, images)
                status.update(validation_images=status.status.validation_images + stored)
                print(f"[{plan.run_name}] validation images at step {step}: {len(stored)}", flush=True)
                models.unet.train()

        if step % config.checkpoint_every_steps == 0 or step == plan.total_steps:
            state = {**state, "step": step, "loss": loss_value, "metrics": metrics}
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    _save_checkpoint(folder, trainable, optimizer, lr_scheduler, scaler, state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=checkpoint_dir_name(step))
                    status.update(checkpoint_step=step)  # uploaded: report returns after the upload
                else:
                    ray.train.report(metrics)

    # 4. Save, render, register (rank 0).
    if rank != 0:
        return None
    final = dict(state.get("metrics") or {})
    final.update(step=step, resumed_from_steps=state["resumed_from_steps"])
    if timed_seconds:
        final["samples_per_s"] = samples_per_step * timed_steps / timed_seconds
    status.update(state="finalizing", step=step)
    output = _finalize(models, config, plan, storage, final, device, autocast)
    # every render of the run (the final one too), as the manifest lists them
    status.update(validation_images=output["lora"]["manifest"]["validation_images"])
    return output
