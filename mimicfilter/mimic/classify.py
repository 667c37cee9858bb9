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
        # classification losses do not couple samples: anchors need nothing here (only their weights do)
        proxy, reference = self.models.proxy, self.models.reference
        labels = labels.long()
        dtype = self._dtype()
        # The proxy's trunk features are the reference's while the trunk is shared and does not train
        trunk_is_reference = self.shared_trunk and self.head_only and not self.trunk_trains
        reference_features = None
        if not trunk_is_reference:
            with torch.no_grad(), self._autocast():
                reference_features = reference.features(images).to(dtype)
        if self.head_only:
            grad = torch.enable_grad() if self.trunk_trains else torch.no_grad()
            with grad, self._autocast():
                features = proxy.features(images).to(dtype)
            if trunk_is_reference:
                reference_features = features.detach()
            fixed_bias = proxy.head.bias

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                logits = F.linear(features, params["head.weight"], params.get("head.bias", fixed_bias))
                return classification_per_sample_loss(proxy.logit_scale * logits, labels)

        else:

            def per_sample_loss(params: ParamDict) -> torch.Tensor:
                with forward_ad_attention():
                    logits = functional_call(proxy, params, (images,))
                return classification_per_sample_loss(logits, labels)

        with torch.no_grad():
            reference_logits = reference.logit_scale * reference.head(reference_features)
        ref_loss = classification_per_sample_loss(reference_logits, labels)
        pair = (reference_features, label_embeddings(reference.head.weight, labels).to(dtype))
        return Prepared(per_sample_loss, ref_loss, None, pair)
