"""ct_gan_augment: CT-GAN nodule injection and removal, made usable for detector augmentation.

Stage 3 of the suite (section 4 of ``docs/methods.md``): a 3-D pix2pix in-painting GAN trained on
32^3 cubes at 1 mm (an injector on nodule cubes, a remover on healthy lung cubes), pasted back
into scans of any spacing at world coordinates or at automatically chosen lung sites, and an
``augment`` command that writes injected copies of the TRAINING folds only, in the LUNA16 layout.

Commands: ``python -m ct_gan_augment train | inject | remove | augment`` (each with ``--help``).
Public names are imported lazily so that ``python -m ct_gan_augment --help`` and reading a plan
do not start Keras.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PLANS": "ct_gan_augment.config",
    "GANPlan": "ct_gan_augment.config",
    "get_plan": "ct_gan_augment.config",
    "PatchDiscriminator": "ct_gan_augment.discriminator",
    "InpaintingGAN": "ct_gan_augment.gan",
    "InpaintingGenerator": "ct_gan_augment.generator",
    "CubeTamperer": "ct_gan_augment.inject",
    "InjectedNodule": "ct_gan_augment.injected_nodule",
    "ModelManifest": "ct_gan_augment.manifest",
    "CubeNormaliser": "ct_gan_augment.normaliser",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ct_gan_augment' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
