"""Distilled drafts: a small, fast draft for any target, trained on the target's own text.

    specdec distill --layers 4 --steps 2000 --out DIR        # the command (see its --help)
    specdec distill --kind feature --time-budget 280 --out DIR   # an EAGLE-style feature draft

    from specdec.distill import load_shipped_draft
    draft = load_shipped_draft(target)                        # the draft shipped for the default model
    specdec.generate(target, ids, draft_model="distilled")    # the best shipped one, by name
    feature = load_feature_draft(target)                      # the shipped feature draft ("distilled-feature")

Modules, one job each: ``model`` (build the draft from target layers), ``data`` (prompts,
the target's continuations, plain text, batches), ``train`` (KL training loop),
``evaluate`` (acceptance: replayed and measured), ``save`` (HF directory), ``shipped``
(the int8/int4 files that ship in ``specdec/drafts``), ``feature_train`` (training and replay
for feature drafts, ``specdec.feature_draft``), ``cli`` (``specdec distill``).
"""

from specdec.distill.model import build_draft, pick_layers
from specdec.distill.shipped import (export_feature, export_shipped, find_shipped, load_feature_draft, load_named,
                                     load_shipped_draft)

__all__ = ["build_draft", "pick_layers", "export_feature", "export_shipped", "find_shipped", "load_feature_draft",
           "load_named", "load_shipped_draft"]
