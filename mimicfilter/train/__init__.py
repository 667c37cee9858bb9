"""Grad-Mimic inside open_clip's own trainer: ``python -m mimicfilter.train --grad-mimic-reference CKPT ...``.

Importing this package loads nothing heavy; torch, open_clip and open_clip_train load when a run starts.
"""
