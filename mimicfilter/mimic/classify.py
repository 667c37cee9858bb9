"""Scoring one batch of labelled images through an :class:`~mimicfilter.mimic.heads.ImageClassifier`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mimicfilter.mimic.heads import label_embeddings
from mimicfilter.mimic.jvp import ParamDict
from mimicfilter.mimic.losses import classification_per_sample_loss
from mimicfilter.mimic.models import LoadedModels
from mimicfilter.mimic.scorer import MimicScorer, Prepared, forward_ad_attention


class ClassifierScorer(MimicScorer):
    """Labelled-image batches through an :class:`~mimicfilter.mimic.heads.ImageClassifier`."""

    def __init__(self, models: LoadedModels, temperature: float, autocast_dtype: torch.dtype | None = None):
        super().__init__(models, temperature, autocast_dtype)
        self.head_only = all(name.startswith("head.") for name in models.mimic_layers)

    @property
    def route(self) -> str:
        return "head" if self.head_only else "full"

    def _prepare(self, images, labels, anchors=None) -> Prepared:
        # classification losses do not couple samples: anchors need nothing here (only their weights do),
        # except confusable negatives, which take the reference's most likely class after their own label
        proxy, reference = self.models.proxy, self.models.reference
        labels = labels.long()
        dtype = self._dtype()
        # The proxy's trunk features are the reference's while the trunk is shared and does not train
        trunk_is_reference = self.shared_trunk and self.head_only and not self.trunk_trains
        reference_features = features = None
        if not trunk_is_reference:
            with torch.no_grad(), self._autocast():
                reference_features = reference.features(images).to(dtype)
        if self.head_only:
            grad = torch.enable_grad() if self.trunk_trains else torch.no_grad()
            with grad, self._autocast():
                features = proxy.features(images).to(dtype)
            if trunk_is_reference:
                reference_features = features.detach()
        with torch.no_grad():
            reference_logits = reference.logit_scale * reference.head(reference_features)
        relabelled = None
        if anchors is not None and anchors.confusable is not None:
            # only an image the reference gets right makes one: for the others the runner-up is the
            # reference's own first choice, a pair it takes for clean (-1: scored, then left out)
            made = reference_logits.argmax(dim=1) == labels
            labels = torch.where(anchors.confusable, runner_up(reference_logits, labels), labels)
            relabelled = torch.where(anchors.confusable & ~made, torch.full_like(labels, -1), labels)

        if self.head_only:
            fixed_bias = proxy.head.bias

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                logits = F.linear(features, params["head.weight"], params.get("head.bias", fixed_bias))
                return classification_per_sample_loss(proxy.logit_scale * logits, labels)

        else:

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                with forward_ad_attention():
                    logits = functional_call(proxy, params, (images,))
                return classification_per_sample_loss(logits, labels)

        ref_loss = classification_per_sample_loss(reference_logits, labels)
        pair = (reference_features, label_embeddings(reference.head.weight, labels).to(dtype))
        return Prepared(per_sample_loss, ref_loss, None, pair, relabelled=relabelled)


def runner_up(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the most likely class other than ``labels`` (a confusable negative's label)."""
    others = logits.detach().clone()
    others[torch.arange(len(labels), device=labels.device), labels] = float("-inf")
    return others.argmax(dim=1)
