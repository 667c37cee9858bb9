"""Scoring one batch of labelled images through an :class:`~mimicfilter.mimic.heads.ImageClassifier`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

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

    def embedding_from_features(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Head route: the features are the image tower's (normalised) output, the embedding itself."""
        if not self.head_only:
            return None
        return lambda features: F.normalize(features.float(), dim=-1).to(torch.float16).cpu()

    def _prepare(self, images, labels) -> Prepared:
        proxy, reference = self.models.proxy, self.models.reference
        labels = labels.long()
        dtype = self._dtype()
        with torch.no_grad(), self._autocast():
            reference_logits = reference(images).to(dtype) if not (self.shared_trunk and self.head_only) else None
        if self.head_only:
            grad = torch.enable_grad() if self.trunk_trains else torch.no_grad()
            with grad, self._autocast():
                features = proxy.features(images).to(dtype)
            if reference_logits is None:
                with torch.no_grad():
                    reference_logits = reference.logit_scale * reference.head(features)
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
        reusable = self.head_only and not self.trunk_trains
        return Prepared(per_sample_loss, ref_loss, None, image_features=features.detach() if reusable else None)

