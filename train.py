"""Train, test and evaluate chest X-ray classifiers.

    python train.py                                   # the study's unweighted CNN, 15 epochs
    python train.py experiment=study_weighted         # with balanced class weights
    python train.py -m optimizer=adam,sgd,sgd_momentum
    python train.py run_dir=outputs/runs/<run> ckpt_path=last          # resume in place
    python train.py --config-name eval ckpt_path=<ckpt> data.root=<folder>

Everything is in the config tree under conf/; this file only composes it and hands it over
(pneumonia.cli; the same command is installed as pneumonia-train).
"""

import os
from pathlib import Path

# Lets conf/paths resolve outputs/ and data/ inside the project whatever the working directory.
os.environ.setdefault("PNEUMONIA_ROOT", str(Path(__file__).resolve().parent))

from pneumonia.cli import train

if __name__ == "__main__":
    train()
