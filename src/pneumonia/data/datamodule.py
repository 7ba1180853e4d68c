"""The LightningDataModule: owns discovery, the cache, the split, class weights and pixel statistics."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, RandomSampler

from pneumonia import CLASS_NAMES, check_image_size, is_whole_number
from pneumonia.data.cache import CachedImages, build_or_load, pixel_digests
from pneumonia.data.class_weights import no_class_weights
from pneumonia.data.dataset import CachedXrayDataset
from pneumonia.data.device_batches import DeviceBatches
from pneumonia.data.discovery import DataLayoutError, LabelledImage, data_root, scan_images
from pneumonia.data.splits import GROUPINGS, SPLITS, assign_splits, check_fractions, write_split_csv

log = logging.getLogger(__name__)

ClassWeighting = Callable[[np.ndarray], np.ndarray]


class EmptySplitError(ValueError):
    """A split that a stage needs holds no image."""


# Automatic device batches hold the whole cache on the GPU only when it takes at most this share of
# the free memory: the rest is the network's.
DEVICE_CACHE_SHARE = 0.25

# A name becomes a TensorBoard tag, a report key and a file name: external/<name>/..., external_<name>.csv
_EXTERNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _checked_external_tests(
    external_tests: Mapping[str, Any] | None, root: Path
) -> dict[str, Path]:
    """``data.external_tests`` as name -> existing folder; anything else is a clear error."""
    checked: dict[str, Path] = {}
    for name, folder in (external_tests or {}).items():
        key = f"data.external_tests.{name}"
        if not isinstance(name, str) or not _EXTERNAL_NAME.fullmatch(name):
            raise ValueError(
                f"{key}: name external test sets with letters, digits, '_' and '-' only (the name "
                "becomes a TensorBoard tag and a file name), e.g. +data.external_tests.site_b=<folder>"
            )
        if not isinstance(folder, str | Path) or not str(folder).strip():
            raise ValueError(
                f"{key}={folder!r}: give one folder of X-rays (with NORMAL/ and PNEUMONIA/ folders "
                "at any depth), e.g. +data.external_tests.site_b=/data/site_b"
            )
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"{key}={str(folder)!r} is not an existing folder; give one with NORMAL/ and "
                "PNEUMONIA/ images at any depth"
            )
        resolved, pool = path.resolve(), root.expanduser().resolve()
        if resolved == pool or pool in resolved.parents or resolved in pool.parents:
            log.warning(
                "%s=%s overlaps data.root %s: its figures are not from outside it",
                key,
                path,
                root,
            )
        checked[name] = path
    return checked


def interleave_classes(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """A stable order of ``labels``' indices that spreads every class evenly over the sequence.

    The ``k``-th of a class's ``n`` items is placed at ``k / n`` of the way (ties: the lower class
    first), so the first ``c`` items hold each of the ``c`` classes present, every prefix holds the
    classes in about their overall proportions, and within a class the original order is kept.
    Deterministic: the same labels always give the same order.

    Evaluation sets are listed class by class (folders are scanned NORMAL first); unshuffled, a
    run limited to a few validation or test batches (``debug=limit``) saw one class only, so its
    every metric was 0 and its AUROC undefined. Metrics of a whole epoch do not depend on order.
    """
    labels = np.asarray(labels)
    position = np.zeros(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members] = np.arange(len(members)) / len(members)
    # lexsort: the last key is the primary one; it is stable, so a class keeps its own order.
    return np.lexsort((labels, position))


class ChestXrayDataModule(L.LightningDataModule):
    """Chest X-rays from any NORMAL/PNEUMONIA folder layout, pooled and split by patient.

    Args:
        root: folder holding ``NORMAL/`` and ``PNEUMONIA/`` image folders at any depth.
        image_size: side of the square images fed to the model.
        batch_size: images per batch.
        split_fractions: (train, val, test) fractions; ``[0, 0, 1]`` makes every image a test image.
        group_by: ``"patient"`` (no child on two sides) or ``"image"`` (the study's split).
        seed: seed of the split; independent of the training seed so runs share one split.
        class_weighting: training labels -> one weight per class (config group ``class_weighting``).
        cache_dir: where decoded images are cached.
        num_workers: DataLoader worker processes; the cached data needs few or none.
        decode_workers: processes decoding JPEGs when the cache is built (default: all cores).
        split_csv: if set, the split is written there as ``path,label,patient,split``.
        pin_memory: pin batches for faster host-to-GPU copies.
        require_both_classes: refuse a root without NORMAL or without PNEUMONIA images (training
            needs both; evaluating a one-class folder does not).
        external_tests: name -> folder of X-rays from outside the training pool (any layout this
            module reads); every image of each is a test image (see :meth:`external_test_set`).
        batches_on_device: hold each split on the training device and index batches there
            (:class:`~pneumonia.data.device_batches.DeviceBatches`) instead of a DataLoader.
            ``None``: when training on one CUDA device and the cache takes at most a quarter of
            its free memory; ``True`` also on the CPU; DDP always uses DataLoaders.

    Validation and test images come in :func:`interleave_classes` order (training batches are
    shuffled), so any first batches hold both classes when the split does. Under DDP each rank
    evaluates its own share of them, every image exactly once (no padding by repetition), so the
    gathered metrics equal one process's.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 128,
        batch_size: int = 32,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        group_by: str = "patient",
        seed: int = 42,
        class_weighting: ClassWeighting | None = None,
        cache_dir: str | Path = "data/cache",
        num_workers: int = 0,
        decode_workers: int | None = None,
        split_csv: str | Path | None = None,
        pin_memory: bool = False,
        require_both_classes: bool = True,
        external_tests: Mapping[str, str | Path] | None = None,
        batches_on_device: bool | None = None,
    ) -> None:
        super().__init__()
        if group_by not in GROUPINGS:
            raise ValueError(f"data.group_by={group_by!r} must be one of {GROUPINGS}")
        self.root = data_root(root)
        self.image_size = check_image_size(image_size, "data.image_size")
        if not is_whole_number(batch_size) or batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size!r} must be a whole number of at least 1")
        self.batch_size = int(batch_size)
        self.split_fractions = check_fractions(split_fractions)
        self.group_by = group_by
        if not is_whole_number(seed) or not 0 <= seed < 2**32:
            raise ValueError(f"data.seed={seed!r} must be a whole number from 0 to 2**32 - 1")
        self.seed = int(seed)
        self.class_weighting = class_weighting or no_class_weights
        if not str(cache_dir).strip():
            raise ValueError(
                "data.cache_dir is empty (is PNEUMONIA_CACHE set to an empty string?); unset it, "
                "set it to a folder or pass paths.cache_dir=<folder>"
            )
        self.cache_dir = Path(cache_dir).expanduser()
        self.num_workers = int(num_workers)
        self.decode_workers = decode_workers
        self.split_csv = Path(split_csv) if split_csv else None
        self.pin_memory = bool(pin_memory)
        self.require_both_classes = bool(require_both_classes)
        self.external_tests = _checked_external_tests(external_tests, self.root)
        if batches_on_device is not None and not isinstance(batches_on_device, bool):
            raise ValueError(
                f"data.batches_on_device={batches_on_device!r} must be true, false or null (auto)"
            )
        self.batches_on_device = batches_on_device

        self.images: list[LabelledImage] = []
        # Entries that are not images at all (dangling links, FIFOs, ...): path -> why.
        self.skipped_files: dict[str, str] = {}
        self.cache: CachedImages | None = None
        self.splits: np.ndarray | None = None
        self.class_weights: np.ndarray | None = None
        self.pixel_mean: float | None = None
        self.pixel_std: float | None = None
        self._datasets: dict[str, CachedXrayDataset] = {}
        self._device_splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._automatic_choice: dict[str, bool] = {}  # device -> whether the splits fit on it
        self._twins: dict[bytes, list[int]] | None = None
        self._external: dict[str, ChestXrayDataModule] = {}

    def prepare_data(self) -> None:
        """Decode and cache every image once (rank zero only under DDP).

        External test sets are decoded and checked here too, so a folder without usable images, or
        with one X-ray under both labels, fails before training, not after it.
        """
        self._load_cache()
        for name in self.external_tests:
            try:
                self.external_test_set(name)._rows("test")
            except (DataLayoutError, EmptySplitError) as err:
                raise type(err)(f"data.external_tests.{name}: {err}") from err

    def setup(self, stage: str | None = None) -> None:
        """Split the pooled images and, for fitting, compute class weights and pixel statistics."""
        if self.splits is None:
            self._split()
        if stage in (None, "fit") and self.class_weights is None:
            train_labels = self._labels("train")
            self.class_weights = np.asarray(self.class_weighting(train_labels), dtype=float)
            self.pixel_mean, self.pixel_std = self._pixel_stats(self._rows("train"))
            log.info(
                "class weights (NORMAL, PNEUMONIA) = (%.4f, %.4f); training pixel mean %.4f, std %.4f",
                *self.class_weights,
                self.pixel_mean,
                self.pixel_std,
            )

    def split_settings(self) -> dict[str, Any]:
        """What decides the split; a change to any of these moves images between train, val and test.

        The file list enters as a digest of the images' paths (relative to the root) and labels.
        Only the folders are walked: nothing is decoded, so a wrong root is refused cheaply.
        """
        self._scan()
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(f"{image.path.relative_to(self.root)}\t{image.label}\n".encode())
        return {
            "root": str(self.root),
            "seed": self.seed,
            "split_fractions": list(self.split_fractions),
            "group_by": self.group_by,
            "images": len(self.images),
            "file_list_sha256": digest.hexdigest()[:16],
        }

    def _scan(self) -> None:
        if not self.images:
            found = scan_images(self.root, require_both_classes=self.require_both_classes)
            self.images, self.skipped_files = found.images, found.skipped

    def _load_cache(self) -> CachedImages:
        if self.cache is None:
            self._scan()
            self.cache = build_or_load(
                [img.path for img in self.images],
                self.image_size,
                self.cache_dir,
                num_workers=self.decode_workers,
            )
        return self.cache

    def _split(self) -> None:
        cache = self._load_cache()
        labels = np.array([img.label for img in self.images])
        groups = (
            [img.patient for img in self.images]
            if self.group_by == "patient"
            else [str(img.path) for img in self.images]
        )
        splits = np.where(
            cache.valid, assign_splits(labels, groups, self.split_fractions, self.seed), "skipped"
        )
        self.splits = splits
        counts = {s: int((splits == s).sum()) for s in SPLITS}
        log.info("split of %d images by %s: %s", len(splits), self.group_by, counts)
        self._refuse_one_xray_under_two_labels()
        if self.require_both_classes:
            self._check_both_classes_decoded(labels, cache)
        self._warn_of_copies_across_splits()
        if self.split_csv is not None and self.trainer_is_global_zero:
            write_split_csv(
                self.split_csv,
                [img.path.relative_to(self.root) for img in self.images],
                labels,
                [img.patient for img in self.images],
                splits,
                CLASS_NAMES,
            )

    def _check_both_classes_decoded(self, labels: np.ndarray, cache: CachedImages) -> None:
        """Every non-empty split holds both classes among the images that decoded.

        Discovery found both classes, but if every image of one class fails to decode (files that
        are not JPEG or PNG under .jpeg names, cloud placeholders, Git LFS pointers), training on
        the other class alone scores a perfect balanced accuracy on a one-class validation split.
        """
        assert self.splits is not None
        for split in SPLITS:
            in_split = self.splits == split
            if not in_split.any():
                continue
            for label, name in enumerate(CLASS_NAMES):
                if (labels[in_split] == label).any():
                    continue
                failed = int(((labels == label) & ~cache.valid).sum())
                found = int((labels == label).sum())
                cause = (
                    f"{failed} of the {found} {name} images found failed to decode (listed in the "
                    "warning above)"
                    if failed
                    else f"only {found} {name} image(s) were found"
                )
                raise DataLayoutError(
                    f"the {split} split of {self.root} holds no {name} image: {cause}. A model "
                    "would be trained or judged on one class only; fix or replace the unreadable "
                    f"files, add {name} images, or change data.split_fractions"
                )

    def _pixel_twins(self) -> dict[bytes, list[int]]:
        """Digest of the pixels -> the decoded images (indices into :attr:`images`) that have them."""
        if self._twins is None:
            cache = self._load_cache()
            rows = np.flatnonzero(cache.valid)
            self._twins = {}
            for row, digest in zip(rows, pixel_digests(cache.pixels, rows), strict=True):
                self._twins.setdefault(digest, []).append(int(row))
        return self._twins

    def _refuse_one_xray_under_two_labels(self) -> None:
        """Refuse an X-ray filed under both NORMAL and PNEUMONIA, pixel for pixel, whatever the
        files' names: one of the labels is wrong, and training on both teaches both answers."""
        conflicts = [
            rows
            for rows in self._pixel_twins().values()
            if len({self.images[row].label for row in rows}) > 1
        ]
        if conflicts:
            listed = "; ".join(
                " = ".join(
                    f"{self.images[row].path} ({CLASS_NAMES[self.images[row].label]})"
                    for row in rows
                )
                for rows in conflicts[:5]
            )
            raise DataLayoutError(
                f"{len(conflicts)} X-ray(s) under {self.root} are filed under both NORMAL and "
                f"PNEUMONIA (the same pixels at {self.image_size} px): {listed}. One label of "
                "each is wrong; delete the wrong copy"
            )

    def _warn_of_copies_across_splits(self) -> None:
        """Warn when one X-ray, under two file names, sits on two sides of the split, or twice in
        a set that is only evaluated (an external set, an evaluated folder).

        The Kermany set holds 24 such groups (50 files, byte for byte the same), each within one
        patient: the split by patient keeps them together, a per-image split does not. Copies
        whose names carry no patient id, or another child's, would leak in any split. In a set
        that is only evaluated, each copy counts again and weighs its X-ray more in the figures.
        """
        assert self.splits is not None
        repeated = [rows for rows in self._pixel_twins().values() if len(rows) > 1]
        if repeated and self.split_fractions[0] == self.split_fractions[1] == 0:
            log.warning(
                "%d X-ray(s) of %s appear under several file names (at %d px, pixel for pixel), "
                "e.g. %s: each copy is scored again and weighs more in the figures; delete the "
                "copies for figures over distinct X-rays",
                len(repeated),
                self.root,
                self.image_size,
                " = ".join(str(self.images[row].path) for row in repeated[0]),
            )
        crossing = [rows for rows in repeated if len({self.splits[row] for row in rows}) > 1]
        if crossing:
            example = crossing[0]
            log.warning(
                "%d X-ray(s) appear under several file names on different sides of the split (at "
                "%d px, pixel for pixel), e.g. %s: validation and test then score images the "
                "model trained on. Delete the copies, or name them with their child's id so a "
                "split by patient keeps them together",
                len(crossing),
                self.image_size,
                " = ".join(f"{self.images[row].path} ({self.splits[row]})" for row in example),
            )

    def copies_in_pool(
        self, other: ChestXrayDataModule, splits: Collection[str] | None = None
    ) -> list[tuple[Path, Path]]:
        """``(image of other's test split, image of this pool)`` pairs with the same pixels at this
        image size.

        ``other`` is an external test set, or a folder a checkpoint is evaluated on: a copy of a
        training image there is not "outside the pool", whatever its folder. ``splits``: only
        this pool's images in these splits (``("train", "val")``: what a model was fitted and
        chosen on); None: all of them.
        """
        if other.image_size != self.image_size:
            raise ValueError("compare data modules of one image size")
        if splits is not None and self.splits is None:
            raise RuntimeError("call setup() before asking for copies of a split's images")
        pool: dict[bytes, int] = {}
        for digest, rows in self._pixel_twins().items():
            kept = [row for row in rows if splits is None or self.splits[row] in splits]
            if kept:
                pool[digest] = kept[0]
        return [
            (other.images[row].path, self.images[pool[digest]].path)
            for digest, rows in other._pixel_twins().items()
            if digest in pool
            for row in rows
            if other.splits is None or other.splits[row] == "test"
        ]

    @property
    def trainer_is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def _rows(self, split: str) -> np.ndarray:
        if self.splits is None:
            raise RuntimeError("call setup() before asking for a split")
        rows = np.flatnonzero(self.splits == split)
        if len(rows) == 0:
            failed = int((self.splits == "skipped").sum())
            undecoded = f", {failed} of them failed to decode (listed above)" if failed else ""
            fractions = list(self.split_fractions)
            share = dict(zip(SPLITS, fractions, strict=False)).get(split)
            if share:  # a fraction too small for the images: say how many it takes
                units = "patients" if self.group_by == "patient" else "images"
                more = " (more when patients have several images)" if units == "patients" else ""
                fix = (
                    f"a {share:g} share of each class is less than one of its {units}: give each "
                    f"class at least {math.ceil(1 / share)} {units}{more} or raise that fraction"
                )
            else:
                fix = "give it a non-zero fraction or add images"
            if failed:
                fix += ", or replace the unreadable ones"
            raise EmptySplitError(
                f"the {split} split of {self.root} is empty (split_fractions={fractions}, "
                f"{len(self.images)} images found{undecoded}); {fix}"
            )
        return rows

    def _labels(self, split: str) -> np.ndarray:
        return np.array([self.images[i].label for i in self._rows(split)])

    def _pixel_stats(self, rows: np.ndarray) -> tuple[float, float]:
        assert self.cache is not None
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(rows), 1024):
            block = self.cache.pixels[rows[start : start + 1024]].astype(np.float64) / 255.0
            total += block.sum()
            total_sq += np.square(block).sum()
            count += block.size
        mean = total / count
        return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 1e-12)))

    def split_arrays(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of a split at once: uint8 ``(N, 1, S, S)`` pixels and ``(N,)`` labels.

        In the order of :meth:`dataset` (whose ``rows`` name the files).
        """
        dataset = self.dataset(split)
        pixels = torch.from_numpy(np.asarray(dataset.pixels[dataset.rows])).unsqueeze(1)
        return pixels, dataset.labels.clone()

    def external_test_set(self, name: str) -> ChestXrayDataModule:
        """A DataModule whose test split is every image of the external test set ``name``, set up
        (once per process).

        Its cache lives beside this one's; its list of images (with labels and patients) is
        written beside this run's ``split.csv`` as ``external_<name>.csv``.
        """
        if name in self._external:
            return self._external[name]
        split_csv = (
            self.split_csv.with_name(f"external_{name}.csv") if self.split_csv is not None else None
        )
        external = ChestXrayDataModule(
            self.external_tests[name],
            image_size=self.image_size,
            batch_size=self.batch_size,
            split_fractions=(0.0, 0.0, 1.0),
            cache_dir=self.cache_dir,
            decode_workers=self.decode_workers,
            split_csv=split_csv,
            require_both_classes=False,
        )
        external.prepare_data()
        external.setup("test")
        self._external[name] = external
        return external

    def dataset(self, split: str) -> CachedXrayDataset:
        """The dataset of one split (``"train"``, ``"val"`` or ``"test"``).

        Its ``rows`` (indices into :attr:`images`) map every item back to its file. Validation and
        test items come in :func:`interleave_classes` order; training items in the order of
        :attr:`images` (the loader shuffles them).
        """
        if split not in self._datasets:
            assert self.cache is not None
            pixels_path = self.cache.pixels.filename
            rows, labels = self._rows(split), self._labels(split)
            if split != "train":
                order = interleave_classes(labels)
                rows, labels = rows[order], labels[order]
            self._datasets[split] = CachedXrayDataset(pixels_path, rows, labels)
        return self._datasets[split]

    def batch_device(self) -> torch.device | None:
        """The device that holds the splits for :class:`DeviceBatches`, or ``None`` (DataLoaders)."""
        trainer = self.trainer
        if self.batches_on_device is False or trainer is None:
            return None
        if trainer.world_size > 1:
            if self.batches_on_device:
                raise ValueError(
                    f"data.batches_on_device=true needs one device, but the trainer runs "
                    f"{trainer.world_size} processes; leave it null (DDP uses DataLoaders)"
                )
            return None
        device = trainer.strategy.root_device
        if self.batches_on_device is None:
            if device.type != "cuda":
                return None
            # Decided once per device: memory the allocator keeps after training would otherwise
            # switch the test split to DataLoaders while train and val were held on the device.
            if str(device) not in self._automatic_choice:
                assert self.cache is not None
                free, _ = torch.cuda.mem_get_info(device)
                fits = self.cache.pixels.nbytes <= DEVICE_CACHE_SHARE * free
                if not fits:
                    log.info(
                        "the image cache (%.0f MB) is large for %s's free memory; using DataLoaders",
                        self.cache.pixels.nbytes / 2**20,
                        device,
                    )
                self._automatic_choice[str(device)] = fits
            if not self._automatic_choice[str(device)]:
                return None
        return device

    def _device_batches(self, split: str, device: torch.device, shuffle: bool) -> DeviceBatches:
        # Keyed by device too: a DataModule reused by a trainer on another device gets its own copy.
        key = (split, str(device))
        if key not in self._device_splits:
            pixels, labels = self.split_arrays(split)
            self._device_splits[key] = (pixels.to(device), labels.to(device))
            log.info("%s split held on %s (%d images)", split, device, len(labels))
        pixels, labels = self._device_splits[key]
        return DeviceBatches(pixels, labels, self.batch_size, shuffle=shuffle)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceBatches:
        device = self.batch_device()
        if device is not None:
            # Lightning turns shuffling off for overfit_batches only in loaders with a sampler.
            overfitting = self.trainer is not None and bool(self.trainer.overfit_batches)
            return self._device_batches(split, device, shuffle and not overfitting)
        dataset = self.dataset(split)
        sampler = None
        trainer = self.trainer
        if split != "train" and trainer is not None and trainer.world_size > 1:
            if len(dataset) < trainer.world_size:
                # A rank without images would skip the evaluation loop and leave the others
                # waiting in the epoch's synchronisation.
                raise EmptySplitError(
                    f"the {split} split of {self.root} holds {len(dataset)} image(s), fewer than "
                    f"the {trainer.world_size} processes evaluating it; use fewer devices or "
                    "more images"
                )
            # Lightning's default DistributedSampler pads evaluation sets by repeating images, which
            # would count them twice in the confusion matrix; this one gives every image exactly
            # once (shards may differ by one image; torchmetrics gathers uneven shards). Being a
            # DistributedSampler, Lightning keeps it instead of injecting its own.
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        generator = None
        if self.num_workers > 0:
            # Persistent workers take their seed once per process, where a loader without workers
            # takes one per epoch: drawn from the global stream, a resumed run would draw it at
            # another point than the uninterrupted run and continue another stream
            # (pneumonia.training.random_stream). Their own generator keeps it out; the order
            # still comes from the global stream.
            generator = torch.Generator().manual_seed(torch.initial_seed())
            if shuffle:
                sampler, shuffle = RandomSampler(dataset), False
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", shuffle=False)
