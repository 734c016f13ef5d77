"""Models: how each family is split, the small models, and the demo model's recipe.

Each part has one job:

* :mod:`.plans` -- how each family of diffusers denoiser is split into strips
  (:func:`~.plans.plan_for`); the engine imports only this;
* :mod:`.positional_unet` -- the demo model's UNet class (a ``UNet2DConditionModel`` with a
  learnt position embedding), importable by name so ``from_pretrained`` can load it;
* :mod:`.builtin` and :mod:`.tiny` -- built-in model names: the committed ``demo`` weights
  (``models/demo/``) and tiny random-weight models built from configs, for tests and ``pcpp info``;
* :mod:`.demo_training` -- the demo model's data set and training recipe (``make train-demo``);
  nothing in the runtime imports it.

Importing this package imports nothing else.
"""
