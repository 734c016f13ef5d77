"""Built-in model names: the trained ``demo`` model committed in ``models/demo`` and the tiny
random-weight models of :mod:`.tiny`. ``pcpp generate --model NAME`` and
:func:`pcpp_runtime.pipelines.load_pipeline` resolve a name here to a diffusers folder; any
other model string goes to ``from_pretrained`` as given."""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_MODELS, tiny_model_path

__all__ = ["DEMO_DIR", "TRAINED_MODELS", "builtin_model_path", "builtin_names"]

#: where the trained demo pipeline is committed (``make train-demo`` writes it)
DEMO_DIR = Path(__file__).resolve().parent / "demo"

#: name -> folder of trained weights committed in the repository
TRAINED_MODELS: dict[str, Path] = {"demo": DEMO_DIR}


def builtin_names() -> list[str]:
    return sorted(TRAINED_MODELS) + sorted(TINY_MODELS)


def builtin_model_path(name: str) -> Path:
    """The folder of built-in model ``name``: the committed weights of a trained one, or a tiny
    random-weight one built on first use."""
    if name in TRAINED_MODELS:
        folder = TRAINED_MODELS[name]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(f"the trained weights of built-in model {name!r} are missing from {folder}; run `make train-demo`")
        return folder
    if name not in TINY_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in: {', '.join(builtin_names())}")
    return tiny_model_path(name)
