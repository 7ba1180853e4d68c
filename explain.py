"""Explain a trained checkpoint: the study's Guided Grad-CAM figures and whether to trust them.

    python explain.py ckpt_path=outputs/runs/<run>                  # its test split, best checkpoint
    python explain.py ckpt_path=<file.ckpt> images=<file or folder> target=NORMAL
    python explain.py ckpt_path=<run> methods=[guided_gradcam,gradcam] max_images=null

Writes figures/, summary.png, attributions.npz and trust.json to outputs/explanations/<date>_<time>/.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PNEUMONIA_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    from pneumonia.explain.run import explain_checkpoint

    explain_checkpoint(cfg)


if __name__ == "__main__":
    main()
