"""The demo model's data set and training recipe (``make train-demo``; docs/MODELS.md).

:mod:`.shapes` draws the scenes and captions, :mod:`.components` builds the untrained pipeline,
:mod:`.train` trains it (``python -m pcpp_runtime.models.demo_training.train``), :mod:`.fidelity`
checks that images follow their captions and :mod:`.latent_pool` caches encoded scenes. The
runtime never imports this package.
"""
