"""The displayed P(PNEUMONIA) and the decision are the classifier's calibrated ones."""

from __future__ import annotations

import torch
from torch import nn

from pneumonia.explain.methods import (
    ClassScores,
    attribution_fn,
    decision_threshold,
    explain,
    pneumonia_probabilities,
    resolve_targets,
)
from pneumonia.model.classifier import XrayClassifier

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "channels": [4, 8, 8],
    "hidden_features": 8,
    "image_size": 32,
}


class _Logit(nn.Module):
    """A bare single-logit model: no calibration, no stored threshold."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * 4 - 2


def test_a_bare_module_gets_the_plain_sigmoid_and_one_half():
    model = ClassScores(_Logit())
    scores = torch.tensor([[-1.0, 1.0], [2.0, -2.0]])
    probabilities = pneumonia_probabilities(model, scores)
    torch.testing.assert_close(probabilities, torch.sigmoid(scores[:, 1].double()))
    assert decision_threshold(model) == 0.5 and decision_threshold(_Logit()) == 0.5


def test_an_xray_classifier_gives_its_calibrated_probability_and_threshold():
    torch.manual_seed(0)
    module = XrayClassifier(net=NET, optimizer={"_target_": "torch.optim.Adam"}, image_size=32)
    module.set_operating_point(threshold=0.7, temperature=3.0)
    model, x = ClassScores(module), torch.rand(3, 1, 32, 32)
    assert decision_threshold(model) == decision_threshold(module) == module.threshold
    assert abs(decision_threshold(model) - 0.7) < 1e-6
    _, probabilities, _ = explain(model, x, attribution_fn("saliency"))
    module.eval()
    with torch.no_grad():
        logits = module(x)
    torch.testing.assert_close(probabilities, torch.sigmoid(logits.double() / 3.0))
    # predict.py's probabilities to the bit: both decide at the stored threshold alike.
    assert torch.equal(probabilities, module.predict_proba(x))


def test_a_probability_just_below_a_threshold_of_one_is_not_rounded_up_to_it():
    # float32 rounds sigmoid(30) to exactly 1.0: at a stored threshold of 1.0 (a confident model
    # at a small temperature), explain.py then explained PNEUMONIA where predict.py said NORMAL.
    probabilities = pneumonia_probabilities(ClassScores(_Logit()), torch.tensor([[-30.0, 30.0]]))
    assert probabilities.dtype == torch.float64 and probabilities.item() < 1.0
    assert resolve_targets("predicted", probabilities, 1.0).tolist() == [0]
