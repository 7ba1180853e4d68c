"""Train, test and evaluate chest X-ray classifiers.

    python train.py                                   # the study's unweighted CNN, 15 epochs
    python train.py experiment=study_weighted         # with balanced class weights
    python train.py -m optimizer=adam,sgd,sgd_momentum
    python train.py run_dir=outputs/runs/<run> ckpt_path=last          # resume in place
    python train.py --config-name eval ckpt_path=<ckpt> data.root=<folder>

Everything is in the config tree under conf/; this file only composes it and hands it over.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Lets conf/paths resolve outputs/ and data/ inside the project whatever the working directory.
os.environ.setdefault("PNEUMONIA_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pneumonia.training.run import run

    return run(cfg)


if __name__ == "__main__":
    main()
