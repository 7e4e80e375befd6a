"""Masked autoencoding (He et al., 2021): the ViT as the encoder of `pipeline.model.mae.MaskedAutoencoder`, trained
on images alone, so shards need no label. The loss is the module's (the MSE on masked patches). What it exports
is the encoder alone, with timm's keys, for `jobs/finetune.py` and timm.

Evaluation, with no label needed:
- val/loss: the reconstruction loss over the val split, each image masked by noise drawn from
  (`mae.eval_mask_seed`, its shard, its position), so that curves compare across runs, world sizes and resumes;
  val/baseline_loss beside it: predicting each masked patch's own mean, which is (P - 1) / P (about 1) under
  `norm_pix_loss`; val/loss_ratio, the first over the second.
- val/knn_top1 where the train and val shards have labels: each val image's encoder features (pooled as the
  fine-tune pools) against those of the first `mae.knn_train_samples` train samples, cosine similarity, the
  k = `mae.knn_k` nearest voting with weights exp(similarity / 0.07), as DINO's monitor.
- val/reconstruction: a PNG of the `mae.recon_images` val samples first in shard order, each as the original,
  the masked input and the reconstruction (the visible patches pasted back, as MAE's figures show them).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import JobConfig
from pipeline.model.mae import MaskedAutoencoder, encoder_args, encoder_weights, patchify, pixel_targets, unpatchify
from pipeline.model.presets import MAE_DECODER, MAE_DECODERS
from pipeline.model.vit import to_2tuple
from pipeline.train.evaluate import collective_batches
from pipeline.train.flops import model_flops_per_image
from pipeline.train.objectives import Evaluation

KNN_TEMPERATURE = 0.07
BANK = "knn_bank"  # the eval split of labelled train samples the k-NN monitor searches
PICTURE_SCALE_PX = 96  # each panel of the reconstruction PNG is drawn at least this large


def resolve_decoder(job: JobConfig) -> JobConfig:
    """The job with the decoder sizes left at 0 taken from the preset (MAE's 512 x 8 x 16 for B/L/H)."""
    preset = MAE_DECODERS.get(job.model.preset, MAE_DECODER)
    sizes = {key: getattr(job.mae, key) or value for key, value in preset.items()}
    return dataclasses.replace(job, mae=dataclasses.replace(job.mae, **sizes))


class MaskedAutoencoding:
    name = "mae"
    needs_labels = False
    curves = ("train/loss", "val/loss", "val/knn_top1")
    score_metric = "val/loss"
    higher_is_better = False

    def __init__(self, job: JobConfig, model_args: dict):
        self.model_args = encoder_args(model_args)
        self.cfg = resolve_decoder(job).mae
        self.label_key = job.data.label_key
        self.mean = torch.tensor(job.model.input_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(job.model.input_std).view(1, 3, 1, 1)
        cfg = self.cfg
        self.module_args = {**self.model_args, "mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss,
                            "decoder_embed_dim": cfg.decoder_embed_dim, "decoder_depth": cfg.decoder_depth,
                            "decoder_num_heads": cfg.decoder_num_heads}
        self.patch = to_2tuple(model_args["patch_size"])[0]
        self.grid = tuple(side // self.patch for side in to_2tuple(model_args["img_size"]))

    def build_module(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(**self.module_args)

    def loss(self, module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return module(images)[0]

    def forward_flops_per_image(self) -> int:
        return model_flops_per_image(self.module_args, MaskedAutoencoder)

    def export(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return encoder_weights(state, self.model_args["embed_dim"], self.grid)

    def knn_classes(self, run) -> int:
        """The class count the k-NN monitor votes over; 0 when it is off or either split's manifest does not say
        its samples have labels where data.label_key looks."""
        labelled = [shards for shards in (run.train_shards, run.val_shards)
                    if shards is not None and shards.sample_members and shards.label_problem(self.label_key) is None]
        return len(run.classes) if self.cfg.knn_train_samples and run.classes and len(labelled) == 2 else 0

    def eval_splits(self, run) -> dict:
        if not run.val_shards:
            return {}
        classes = self.knn_classes(run)
        if not classes:
            return {"val": (run.val_shards, None)}
        counts = np.cumsum(run.train_shards.counts)
        first = int(np.searchsorted(counts, self.cfg.knn_train_samples)) + 1
        return {"val": (run.val_shards, classes), BANK: (run.train_shards.subset(run.train_shards.uris[:first]),
                                                         classes)}

    @torch.no_grad()
    def evaluate_collective(self, module, streams: dict, inputs, *, batch_size: int, world_size: int,
                            group=None) -> Evaluation:
        was_training = module.training
        module.eval()
        device, dtype = inputs.device, inputs.dtype
        dummy = torch.zeros((1, 3, *to_2tuple(self.model_args["img_size"])), dtype=dtype, device=device)
        knn = BANK in streams
        bank = self._bank_collective(module, streams[BANK], inputs, batch_size, world_size, group) if knn else None
        totals = torch.zeros(5, dtype=torch.float64, device=device)  # error sum, baseline sum, masked patches,
        pictures = Pictures(self.cfg.recon_images)                    # images, k-NN correct
        for batch in collective_batches(streams["val"], batch_size=batch_size, world_size=world_size, device=device):
            if batch is None:
                module(dummy, noise=torch.zeros(1, self.grid[0] * self.grid[1], device=device))
                if knn:
                    module(dummy, pooled=True)
                continue
            images = inputs.images(batch["image"])
            noise = eval_noise(self.cfg.eval_mask_seed, batch["shard"], batch["index"], self.grid[0] * self.grid[1])
            _, pred, mask = module(images, noise=noise.to(device))
            target = pixel_targets(images, self.patch, self.cfg.norm_pix_loss)
            error = ((pred.float() - target) ** 2).mean(dim=-1)
            baseline = ((target - target.mean(dim=-1, keepdim=True)) ** 2).mean(dim=-1)  # predict the patch mean
            correct = 0
            if knn:
                features = F.normalize(module(images, pooled=True).float(), dim=-1)
                correct = (knn_predict(features, *bank, self.cfg.knn_k) == batch["label"].to(device)).sum()
            totals += torch.stack([(error * mask).sum().double(), (baseline * mask).sum().double(),
                                   mask.sum().double(), torch.tensor(len(images), dtype=torch.float64, device=device),
                                   torch.as_tensor(correct, dtype=torch.float64, device=device)])
            pictures.offer(batch, lambda rows, b=batch, p=pred, m=mask: self._render(b, p, m, rows))
        if world_size > 1:
            dist.all_reduce(totals)
        module.train(was_training)
        error_sum, baseline_sum, masked, count, correct = totals.tolist()
        if count == 0:
            raise RuntimeError("the val split yielded no images: check data.val and the bad-sample counts")
        metrics = {"val/loss": error_sum / masked, "val/baseline_loss": baseline_sum / masked,
                   "val/loss_ratio": error_sum / max(baseline_sum, 1e-12), "val/images": count}
        if knn:
            metrics.update({"val/knn_top1": correct / count, "val/knn_bank": float(len(bank[1]))})
        picture = pictures.gather_collective(world_size, group)
        return Evaluation(metrics, {"val/reconstruction": picture} if picture is not None else {})

    def _bank_collective(self, module, stream, inputs, batch_size: int, world_size: int, group):
        """The k-NN bank on every rank: the normalised features and labels of every image of the bank split."""
        features, labels = [], []
        dummy = torch.zeros((1, 3, *to_2tuple(self.model_args["img_size"])), dtype=inputs.dtype, device=inputs.device)
        for batch in collective_batches(stream, batch_size=batch_size, world_size=world_size, device=inputs.device):
            if batch is None:
                module(dummy, pooled=True)
                continue
            features.append(F.normalize(module(inputs.images(batch["image"]), pooled=True).float(), dim=-1).cpu())
            labels.append(batch["label"].cpu())
        local = (torch.cat(features) if features else torch.zeros(0, self.model_args["embed_dim"]),
                 torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64))
        parts = [local]
        if world_size > 1:
            parts = [None] * world_size
            dist.all_gather_object(parts, local, group=group)
        features, labels = (torch.cat(column).to(inputs.device) for column in zip(*parts, strict=True))
        return features, labels

    def _render(self, batch: dict, pred: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> np.ndarray:
        """(len(rows), H, 3W + 2, 3) uint8: original | masked input | reconstruction with the visible patches, a
        white pixel column between them."""
        images = batch["image"][rows].float().cpu()  # 0..255
        mean, std = self.mean * 255.0, self.std * 255.0
        normalised = (images - mean) / std
        pred, mask = pred[rows].float().cpu(), mask[rows].float().cpu()
        if self.cfg.norm_pix_loss:  # the prediction is in each patch's own units: back to the image's
            patches = patchify(normalised, self.patch)
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt() + patches.mean(dim=-1, keepdim=True)
        shown = mask[..., None].expand(-1, -1, self.patch * self.patch * 3)
        recon = unpatchify(pred, self.patch, self.grid) * std + mean
        paste = unpatchify(shown, self.patch, self.grid)
        recon = paste * recon + (1 - paste) * images
        masked = paste * 127.0 + (1 - paste) * images
        gap = torch.full_like(images[..., :1], 255.0)
        panels = torch.cat([images, gap, masked, gap, recon], dim=3).clamp(0, 255).round().to(torch.uint8)
        return panels.permute(0, 2, 3, 1).numpy()

    def describe(self, metrics: dict[str, float]) -> str:
        line = (f" | val loss {metrics['val/loss']:.3f} ({metrics['val/loss_ratio']:.2f} of predict-the-mean)"
                + (f" | k-NN top-1 {metrics['val/knn_top1']:.3f}" if "val/knn_top1" in metrics else ""))
        return line + (f" | ema loss {metrics['val_ema/loss']:.3f}" if "val_ema/loss" in metrics else "")

    def summary(self, metrics: dict[str, float]) -> str:
        line = (f"val loss: {metrics.get('val/loss', float('nan')):.4f} "
                f"({metrics.get('val/loss_ratio', float('nan')):.2f} of predict-the-mean)")
        return line + (f", k-NN top-1: {metrics['val/knn_top1']:.4f}" if "val/knn_top1" in metrics else "")


def eval_noise(seed: int, shards: torch.Tensor, positions: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, N) masking noise, fixed per sample by (seed, its shard, its position in the shard): the same mask for
    the same image in every evaluation of every run, whatever the batch or the rank it comes in."""
    rows = []
    for shard, position in zip(shards.tolist(), positions.tolist(), strict=True):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + shard) * 1_000_003 + position)
        rows.append(torch.rand(num_patches, generator=generator))
    return torch.stack(rows)


def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int) -> torch.Tensor:
    """The class of each of `features` (normalised) by its k nearest `bank` rows (cosine similarity), each voting
    with weight exp(similarity / 0.07)."""
    similarity, nearest = (features @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(features), int(bank_labels.max()) + 1, device=features.device)
    votes.scatter_add_(1, bank_labels[nearest], (similarity / KNN_TEMPERATURE).exp())
    return votes.argmax(dim=1)


class Pictures:
    """The `count` val samples first in (shard, position) order that this rank saw, drawn; gathered on rank 0."""

    def __init__(self, count: int):
        self.count = count
        self.kept: list[tuple[tuple[int, int], np.ndarray]] = []

    def offer(self, batch: dict, render) -> None:
        if not self.count:
            return
        keys = list(zip(batch["shard"].tolist(), batch["index"].tolist(), strict=True))
        worst = max(key for key, _ in self.kept) if len(self.kept) >= self.count else None
        rows = sorted(range(len(keys)), key=keys.__getitem__)[:self.count]
        rows = [row for row in rows if worst is None or keys[row] < worst]
        if rows:
            self.kept = sorted(self.kept + list(zip([keys[r] for r in rows], render(rows), strict=True)),
                               key=lambda item: item[0])[:self.count]

    def gather_collective(self, world_size: int, group) -> np.ndarray | None:
        """On rank 0, the first samples over all ranks in a grid of about 3:4, left to right and top to bottom,
        white pixel lines between them, drawn at least PICTURE_SCALE_PX high a sample; None elsewhere, or off."""
        if not self.count:
            return None
        parts = [self.kept]
        if world_size > 1:
            parts = [None] * world_size
            dist.all_gather_object(parts, self.kept, group=group)
            if dist.get_rank() != 0:
                return None
        chosen = [panels for _, panels in sorted((item for part in parts for item in part),
                                                 key=lambda item: item[0])[:self.count]]
        if not chosen:
            return None
        per_row = math.ceil(math.sqrt(len(chosen) / 3))  # a sample's panels are 3 wide
        blank = np.full_like(chosen[0], 255)
        cells = chosen + [blank] * (-len(chosen) % per_row)
        rows = [interleave(cells[i:i + per_row], axis=1) for i in range(0, len(cells), per_row)]
        grid = interleave(rows, axis=0)
        scale = max(1, -(-PICTURE_SCALE_PX // chosen[0].shape[0]))
        return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def interleave(pictures: list[np.ndarray], axis: int) -> np.ndarray:
    """`pictures` side by side along `axis`, a white line of one pixel between each two."""
    line = np.full_like(np.take(pictures[0], [0], axis=axis), 255)
    return np.concatenate([part for picture in pictures for part in (line, picture)][1:], axis=axis)
