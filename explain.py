"""Explain a trained checkpoint: the study's Guided Grad-CAM figures and whether to trust them.

    python explain.py ckpt_path=outputs/runs/<run>                  # its test split, best checkpoint
    python explain.py ckpt_path=<file.ckpt> images=<file or folder> target=NORMAL
    python explain.py ckpt_path=<run> methods=[guided_gradcam,gradcam] max_images=null

Writes figures/, summary.png, attributions.npz and trust.json to outputs/explanations/<date>_<time>/.
"""

import os
from pathlib import Path

# Lets conf/paths resolve outputs/ and data/ inside the project whatever the working directory.
os.environ.setdefault("PNEUMONIA_ROOT", str(Path(__file__).resolve().parent))

from pneumonia.cli import explain

if __name__ == "__main__":
    explain()
