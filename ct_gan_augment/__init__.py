"""ct_gan_augment: CT-GAN nodule injection and removal, made usable for detector augmentation.

Stage 3 of the suite (section 4 of ``docs/methods.md``): a 3-D pix2pix in-painting GAN trained on
32^3 cubes at 1 mm (an injector on nodule cubes, a remover on healthy lung cubes), pasted back
into scans of any spacing at world coordinates or at automatically chosen lung sites, and an
``augment`` command that writes injected copies of the TRAINING folds only, in the LUNA16 layout.

Commands: ``python -m ct_gan_augment train | inject | remove | augment`` (each with ``--help``).
"""

from ct_gan_augment.config import PLANS, GANPlan, get_plan
from ct_gan_augment.discriminator import PatchDiscriminator
from ct_gan_augment.generator import InpaintingGenerator
from ct_gan_augment.inject import CubeTamperer
from ct_gan_augment.injected_nodule import InjectedNodule
from ct_gan_augment.manifest import ModelManifest
from ct_gan_augment.normaliser import CubeNormaliser

__all__ = [
    "PLANS",
    "CubeNormaliser",
    "CubeTamperer",
    "GANPlan",
    "InjectedNodule",
    "InpaintingGenerator",
    "ModelManifest",
    "PatchDiscriminator",
    "get_plan",
]
