"""``explain.py``'s task: attribution maps, the study's figures and trust checks for a checkpoint."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from pneumonia import CLASS_NAMES
from pneumonia.config import check_explain_config
from pneumonia.data.discovery import looks_like_a_dataset
from pneumonia.data.image_io import load_grayscale
from pneumonia.devices import resolve_device
from pneumonia.errors import NonFiniteOutputError
from pneumonia.explain.inputs import ImageToExplain, collect_images
from pneumonia.explain.methods import (
    ClassScores,
    class_scores,
    decision_threshold,
    pneumonia_probabilities,
    resolve_targets,
)
from pneumonia.explain.rendering.figures import attribution_grid, close, describe
from pneumonia.explain.rendering.raster import study_figure_image
from pneumonia.explain.settings import AttributionSettings
from pneumonia.explain.trust.faithfulness import deletion_auc, random_deletion_auc
from pneumonia.explain.trust.regions import (
    format_region_table,
    region_area_shares,
    region_shares,
    summarize_by_class,
)
from pneumonia.explain.trust.sanity import cascading_randomization
from pneumonia.files import is_side_file, save_figure, write_atomic, written_aside
from pneumonia.metrics.report import to_json
from pneumonia.training.checkpoints import load_classifier, resolve_checkpoint
from pneumonia.training.status import hold_run_folder

log = logging.getLogger(__name__)
SUMMARY_IMAGES = 12
SANITY_SHOWN = 8  # sanity-check layers printed per method


def load_pixels(
    items: list[ImageToExplain], image_size: int, data_root: Path | None = None
) -> tuple[np.ndarray, list[ImageToExplain], dict[str, str]]:
    """Decode every image to ``(N, S, S)`` uint8; unreadable ones are reported, not fatal.

    Raises:
        ValueError: no image could be read; when none exists under ``data_root`` (a split's images,
            after the data moved), the message says to pass ``data_root=``.
    """
    pixels, kept, failures = [], [], {}
    for item in tqdm(items, desc="loading images", unit="img"):
        try:
            pixels.append(load_grayscale(item.path, image_size))
            kept.append(item)
        except Exception as err:  # one bad file (PIL raises many kinds) never stops the others
            failures[str(item.path)] = f"{type(err).__name__}: {err}"
            log.error(
                "cannot read %s (%s); explaining the other images",
                item.path,
                failures[str(item.path)],
            )
    if not kept:
        if data_root is not None and not any(item.path.exists() for item in items):
            raise ValueError(
                f"none of the {len(items)} images exists under the data root {data_root} (e.g. "
                f"{items[0].path}): the data has moved since the checkpoint was trained; pass "
                "data_root=<the folder now holding it>"
            )
        raise ValueError(f"none of the {len(items)} images could be read: {failures}")
    return np.stack(pixels), kept, failures


# What explain.py writes into its folder (besides Hydra's record and its log); trust.json last.
OUTPUTS = ("figures", "summary.png", "attributions.npz", "trust.json")
FINISHED = "trust.json"
# Written before any output and removed after trust.json: a folder holding it holds the files of
# an explanation that was stopped (killed, or failed), which a new one may remove.
UNFINISHED = ".explain_unfinished"
FIGURE_NAME = re.compile(r"[0-9]{4,}_.*\.png", re.DOTALL)


def explain_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole explanation task and return its figures (also written to ``cfg.paths.output_dir``).

    Every file is written whole (a kill leaves the old file or none). A folder an explanation was
    stopped in (killed, or failed) is explained again: the stopped run's files are removed just
    before this one writes its first file, so none of them mixes with this one's, and a run that
    fails before that leaves the folder as it found it.

    Raises:
        RunFolderBusyError: another process works in the folder.
        FileExistsError: the folder holds a finished explanation, which this one's files would
            mix with (figures of other images or another checkpoint beside the new ones), or
            files by those names that no explanation left unfinished (a user's), or its
            ``figures`` is a symbolic link.
    """
    check_explain_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_folder(output_dir):
        stopped = _stopped_explanation_files(output_dir)
        report = _explain(cfg, output_dir, stopped)
        (output_dir / UNFINISHED).unlink(missing_ok=True)
        return report


def _stopped_explanation_files(output_dir: Path) -> list[Path]:
    """The files of an explanation stopped in ``output_dir``, to remove before this one writes
    (none where there was none); refuse a folder holding a finished explanation or files
    explain.py did not leave."""
    figure_dir = output_dir / "figures"
    if figure_dir.is_symlink():  # a new explanation would write, or remove, another folder's files
        raise FileExistsError(
            f"{figure_dir} is a symbolic link; explain.py writes its figures into a folder of its "
            "own. Pass another run_dir=<folder>, or remove the link"
        )
    marker = output_dir / UNFINISHED
    if (marker.exists() or marker.is_symlink()) and not marker.is_file():
        raise FileExistsError(
            f"{marker} is not explain.py's marker file (a folder, or a broken link). Pass another "
            "run_dir=<folder>, or move it"
        )
    earlier = [name for name in OUTPUTS if (output_dir / name).exists()]
    if FINISHED in earlier:
        raise FileExistsError(
            f"{output_dir} already holds an explanation ({', '.join(earlier)}); this one's files "
            "would mix with it. Pass another run_dir=<folder>, or delete those first"
        )
    if not earlier:
        return []
    if not marker.is_file():
        raise FileExistsError(
            f"{output_dir} holds {', '.join(earlier)}, which no explanation left unfinished there "
            f"(no {UNFINISHED}); explain.py would replace them. Pass another run_dir=<folder>, or "
            "move them"
        )
    if figure_dir.exists() and not figure_dir.is_dir():
        raise FileExistsError(
            f"{figure_dir} is a file, where explain.py writes its figures. Pass another "
            "run_dir=<folder>, or move it"
        )
    files = [output_dir / "summary.png", output_dir / "attributions.npz"]
    figures = list(figure_dir.iterdir()) if figure_dir.is_dir() else []
    # All checked before anything is removed: a refusal leaves the folder as it was.
    strangers = [path for path in files if path.is_dir() and not path.is_symlink()] + [
        path
        for path in figures
        if not (FIGURE_NAME.fullmatch(path.name) or is_side_file(path.name)) or path.is_dir()
    ]
    if strangers:
        raise FileExistsError(
            f"{strangers[0]} is not a file explain.py wrote, where it writes its "
            f"{'figures' if strangers[0].parent == figure_dir else 'outputs'}. Pass another "
            "run_dir=<folder>, or move it"
        )
    return [*files, *figures]


def _start_writing(output_dir: Path, stopped: list[Path]) -> None:
    """Remove the files of the explanation stopped in ``output_dir``, and mark the folder as
    holding an unfinished one until trust.json is written."""
    if stopped:
        log.warning(
            "%s holds the files of an explanation stopped before it finished (no %s): removing "
            "%d of them and writing this one's",
            output_dir,
            FINISHED,
            len(stopped),
        )
    for path in stopped:
        path.unlink(missing_ok=True)
    started = {"pid": os.getpid(), "started": datetime.datetime.now().isoformat()}
    write_atomic(output_dir / UNFINISHED, json.dumps(started) + "\n")


def _explain(cfg: DictConfig, output_dir: Path, stopped: list[Path]) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, output_dir, prefer_best=True)
    module, hparams = load_classifier(ckpt_path, device)
    trained_size = int(hparams["image_size"])
    if cfg.image_size not in (None, trained_size):
        raise ValueError(
            f"image_size={cfg.image_size}, but {ckpt_path} was trained at {trained_size}px and its "
            f"network only takes that size; leave image_size unset (images of any size are resized)"
        )
    log.info("explaining %s (%dpx)", ckpt_path, trained_size)

    # A run's split.csv holds paths relative to the data it was trained on, which the checkpoint
    # records; a checkpoint is someone else's data, so its root must at least look like a dataset.
    recorded = hparams.get("data_root")
    if cfg.data_root is None and recorded is not None and not looks_like_a_dataset(recorded):
        log.warning(
            "ignoring the data root %r recorded in %s: %s; using %s (pass data_root=<folder> to "
            "choose)",
            recorded,
            ckpt_path,
            "it holds no NORMAL or PNEUMONIA folder near its top"
            if Path(recorded).is_dir()
            else "it does not exist here",
            cfg.fallback_data_root,
        )
        recorded = None
    data_root = Path(cfg.data_root or recorded or cfg.fallback_data_root)
    refused: dict[str, str] = {}
    items = collect_images(cfg.images, ckpt_path, data_root, refused)
    # Classes interleaved, so a capped set, the summary sheet and the trust checks see both.
    items = _interleave_classes(items)[: cfg.max_images or None]
    pixels, items, failures = load_pixels(items, trained_size, data_root)
    images = torch.from_numpy(pixels).unsqueeze(1).float().div(255.0)
    labels = [item.label for item in items]
    model = ClassScores(module).to(device)
    settings = AttributionSettings.from_explain_config(cfg)
    batch_size = settings.batch_size or len(images)

    probabilities = []
    for batch in images.split(batch_size):
        batch_scores = class_scores(model, batch.to(device))
        # The module's calibrated P(PNEUMONIA), as its predictions report it.
        probabilities.append(pneumonia_probabilities(model, batch_scores).cpu())
    probabilities = torch.cat(probabilities)
    targets = resolve_targets(settings.target, probabilities, decision_threshold(model))

    maps: dict[str, torch.Tensor] = {}
    ms_per_image: dict[str, float] = {}
    for method in cfg.methods:
        attribute = settings.with_method(method).attribution_fn()
        batches = []
        start = time.perf_counter()
        for batch, batch_targets in tqdm(
            list(zip(images.split(batch_size), targets.split(batch_size), strict=True)),
            desc=f"attributing ({method})",
            unit="batch",
        ):
            batches.append(attribute(model, batch.to(device), batch_targets.to(device)).cpu())
        maps[method] = torch.cat(batches)
        _check_finite(maps[method], method, items)
        ms_per_image[method] = 1000 * (time.perf_counter() - start) / len(images)

    _start_writing(output_dir, stopped)
    with written_aside(output_dir / "attributions.npz") as partial, partial.open("wb") as file:
        np.savez_compressed(  # to a file object: given a path, numpy would append ".npz" to it
            file,
            paths=np.array([str(item.path) for item in items]),
            labels=np.array([-1 if y is None else y for y in labels]),
            probabilities=probabilities.numpy(),
            targets=targets.numpy(),
            images=pixels,
            **{f"maps_{method}": m[:, 0].numpy().astype(np.float32) for method, m in maps.items()},
        )
    _write_figures(
        cfg,
        output_dir,
        images,
        maps[settings.method],
        labels,
        probabilities,
        targets,
        items,
        decision_threshold(model),
    )
    trust = _trust(cfg, settings, model, images, targets, labels, maps, device)
    report = {
        "checkpoint": str(ckpt_path),
        "images": len(items),
        "unreadable": failures,
        "refused": refused,
        "target": settings.target,
        # What was asked, in the folder's own words: Hydra's top-level record there is the first
        # run's, and a rerun after a stopped explanation may have asked for other images.
        "request": {
            "images": None if cfg.images is None else str(cfg.images),
            "data_root": str(data_root),
            "max_images": cfg.max_images,
            "methods": list(cfg.methods),
            "figure_method": cfg.figure_method,
            "seed": cfg.seed,
        },
        "ms_per_image": ms_per_image,
        **trust,
    }
    write_atomic(output_dir / "trust.json", to_json(report))  # NaN (one class) as null
    _print_report(report)
    return report


def _check_finite(maps: torch.Tensor, method: str, items: list[ImageToExplain]) -> None:
    """Refuse maps with NaN or infinite values: their figures and trust figures would be noise."""
    broken = (~torch.isfinite(maps)).flatten(1).any(dim=1)
    if broken.any():
        names = [items[i].path.name for i in broken.nonzero().flatten().tolist()]
        raise NonFiniteOutputError(
            f"{method} gave maps with NaN or infinite values for {len(names)} of {len(items)} "
            f"images ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): the network's "
            "outputs or gradients overflow. Check the checkpoint with predict.py, or explain it "
            "with another method"
        )


def _interleave_classes(items: list[ImageToExplain]) -> list[ImageToExplain]:
    """The images of each label in turn (first of each, then second of each, ...), order kept within."""
    by_label: dict[int | None, list[ImageToExplain]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    queues = list(by_label.values())
    longest = max(len(queue) for queue in queues)
    return [queue[i] for i in range(longest) for queue in queues if i < len(queue)]


def _write_figures(
    cfg, output_dir, images, maps, labels, probabilities, targets, items, threshold
) -> None:
    figure_dir = output_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    for i, item in enumerate(tqdm(items, desc="drawing figures", unit="img")):
        title = (
            f"{item.path.name}: {describe(labels[i], float(probabilities[i]), threshold)}; "
            f"{cfg.figure_method} for {CLASS_NAMES[int(targets[i])]}"
        )
        figure = study_figure_image(
            images[i, 0].numpy(), maps[i, 0].numpy(), title, signs=list(cfg.signs)
        )
        with written_aside(figure_dir / f"{i:04d}_{item.path.stem}.png") as partial:
            # Fast zlib: the PNG's compression took four times the drawing.
            Image.fromarray(figure).save(partial, format="PNG", compress_level=1)
    count = min(SUMMARY_IMAGES, len(items))
    sheet = attribution_grid(
        images[:count, 0].numpy(),
        maps[:count, 0].numpy(),
        labels[:count],
        probabilities[:count].tolist(),
        f"{cfg.figure_method} ({cfg.target} class)",
        threshold,
    )
    save_figure(sheet, output_dir / "summary.png")
    close(sheet)


def _trust(
    cfg, settings: AttributionSettings, model, images, targets, labels, maps, device
) -> dict[str, Any]:
    trust_cfg = cfg.trust
    count = min(trust_cfg.images, len(images))
    subset, subset_targets = images[:count].to(device), targets[:count].to(device)
    result: dict[str, Any] = {}
    if trust_cfg.sanity:
        result["sanity"] = {}
        for method in cfg.methods:
            steps = cascading_randomization(
                model,
                settings.with_method(method).attribution_fn(),
                subset,
                subset_targets,
                seed=cfg.seed,
                progress=f"sanity check of {method}",
            )
            result["sanity"][method] = [
                {
                    "randomized_through": s.layer.removeprefix("classifier."),
                    "rank_correlation": s.mean_rank_correlation,
                }
                for s in steps
            ]
    if trust_cfg.deletion:
        generator = torch.Generator().manual_seed(cfg.seed)
        random_auc = random_deletion_auc(
            model, subset, subset_targets, steps=trust_cfg.deletion_steps, generator=generator
        )
        result["deletion_auc"] = {"random_order": float(random_auc.mean())}
        for method, method_maps in maps.items():
            auc = deletion_auc(
                model,
                subset,
                subset_targets,
                method_maps[:count].to(device),
                steps=trust_cfg.deletion_steps,
            )
            result["deletion_auc"][method] = float(auc.mean())
    if trust_cfg.regions:
        known = [i for i, y in enumerate(labels) if y is not None]
        if known:
            shares = region_shares(maps[settings.method][known])
            rows = summarize_by_class(
                shares, torch.tensor([labels[i] for i in known]), targets[known]
            )
            side = images.shape[-1]
            result["regions"] = {
                "method": settings.method,
                "rows": rows,
                "area": region_area_shares(side, side),
            }
    return result


def _print_report(report: dict[str, Any]) -> None:
    lines = [f"\nexplained {report['images']} images of {report['checkpoint']}"]
    if report["unreadable"]:
        lines.append(f"unreadable, skipped: {len(report['unreadable'])}")
    if report["refused"]:
        lines.append(f"refused (outside the data root or unknown label): {len(report['refused'])}")
    lines.append(
        "\nms per image: " + ", ".join(f"{m} {v:.1f}" for m, v in report["ms_per_image"].items())
    )
    if "sanity" in report:
        lines.append(
            "\nsanity check: rank correlation with the trained model's maps as layers are randomised"
        )
        lines.append(
            "(top layer first; near 1 = the map ignores the weights and does not explain the model)"
        )
        for method, steps in report["sanity"].items():
            cells = [f"{s['randomized_through']}: {s['rank_correlation']:+.2f}" for s in steps]
            if len(cells) > SANITY_SHOWN:  # DenseNet-121 has 242 layers; trust.json has them all
                cells = [*cells[: SANITY_SHOWN - 2], f"... {len(cells)} in trust.json", cells[-1]]
            lines.append(f"  {method:<16}" + "  ".join(cells))
    if "deletion_auc" in report:
        lines.append("\ndeletion AUC of the explained class's probability (lower = more faithful)")
        lines += [f"  {name:<16}{value:.3f}" for name, value in report["deletion_auc"].items()]
    if "regions" in report:
        lines.append(
            f"\nwhere the attribution mass lies ({report['regions']['method']}), mean per true "
            "class and class explained"
        )
        lines.append(format_region_table(report["regions"]["rows"], report["regions"]["area"]))
    print("\n".join(lines))
