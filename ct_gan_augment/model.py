"""Building the two networks from a plan, and reading a model folder back.

A model folder (``GAN_DIR``) holds::

    plan.json               the GANPlan (every size, rate and paste setting)
    manifest.json           kind, training folds and series, steps done, final losses; sealed
                            (checksums, trained plan) when training ends, the folder's done
                            marker (:mod:`lungct.modeldir`)
    normaliser.npz / .json  histogram equalisation + normalisation (no pickle)
    generator.keras         the in-painting U-Net (load with safe_mode=True)
    discriminator.keras     the PatchGAN
    grids/step_NNNNNN.png   condition | generated | real, middle slices
    checkpoints/            epoch_NNN.keras (both networks and optimisers) and backup/, the
                            state --resume continues from
    logs/                   train_log.csv (one row per epoch: mean losses, discriminator
                            accuracy) and TensorBoard's event files

(:mod:`ct_gan_augment.train` has the details; folders of earlier versions have
``checkpoints/step_NNNNNN/`` and ``train_log.csv`` instead, and still resume.)
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from ct_gan_augment.config import GANPlan
from ct_gan_augment.discriminator import PatchDiscriminator
from ct_gan_augment.generator import InpaintingGenerator
from lungct.errors import LungCTError
from lungct.modeldir import load_keras_model, verify_model_dir

GENERATOR_FILE = "generator.keras"
DISCRIMINATOR_FILE = "discriminator.keras"
PLAN_FILE = "plan.json"
NORMALISER_FILE = "normaliser.npz"
NETWORK_CLASSES = {
    GENERATOR_FILE: "ct_gan_augment>InpaintingGenerator",
    DISCRIMINATOR_FILE: "ct_gan_augment>PatchDiscriminator",
}
"""The registered Keras class each network file must hold."""


def build_generator(plan: GANPlan, kind: str = "injector") -> InpaintingGenerator:
    """The plan's generator for ``kind`` (injector or remover), freshly initialised."""
    return InpaintingGenerator(
        cube_size=plan.cube_size,
        filters=plan.gf,
        levels=plan.generator_levels,
        kernel_size=plan.kernel_size,
        dropout=plan.dropout,
        leaky_alpha=plan.leaky_alpha,
        bn_momentum=plan.bn_momentum,
        condition_channels=plan.condition_channels(kind),
        name="generator",
    )


def build_discriminator(plan: GANPlan, kind: str = "injector") -> PatchDiscriminator:
    """The plan's discriminator for ``kind``, freshly initialised."""
    return PatchDiscriminator(
        cube_size=plan.cube_size,
        filters=plan.df,
        levels=plan.discriminator_levels,
        kernel_size=plan.kernel_size,
        leaky_alpha=plan.leaky_alpha,
        bn_momentum=plan.bn_momentum,
        condition_channels=plan.condition_channels(kind),
        name="discriminator",
    )


def network_architecture(plan: GANPlan, which: str, kind: str) -> dict:
    """The settings the plan gives a network's constructor (:func:`build_generator`,
    :func:`build_discriminator`), as its config spells them."""
    if which == GENERATOR_FILE:
        return build_generator_config(plan, kind)
    return {
        "cube_size": plan.cube_size,
        "filters": plan.df,
        "levels": plan.discriminator_levels,
        "kernel_size": plan.kernel_size,
        "leaky_alpha": plan.leaky_alpha,
        "bn_momentum": plan.bn_momentum,
        "condition_channels": plan.condition_channels(kind),
    }


def build_generator_config(plan: GANPlan, kind: str) -> dict:
    """The generator's constructor settings for ``kind`` under ``plan``."""
    return {
        "cube_size": plan.cube_size,
        "filters": plan.gf,
        "levels": plan.generator_levels,
        "kernel_size": plan.kernel_size,
        "dropout": plan.dropout,
        "leaky_alpha": plan.leaky_alpha,
        "bn_momentum": plan.bn_momentum,
        "condition_channels": plan.condition_channels(kind),
    }


def load_network(
    model_dir: str | os.PathLike,
    which: str = GENERATOR_FILE,
    allow_unfinished: bool = False,
    plan: GANPlan | None = None,
    kind: str | None = None,
    verify: bool = True,
) -> keras.Model:
    """Load ``generator.keras`` (or ``discriminator.keras``) in safe mode.

    The folder's seal is checked first (training ended, files unchanged, ``plan.json`` still
    the trained plan; ``allow_unfinished`` accepts a training that has not ended, whose
    networks are refreshed at every checkpoint), then the file's config: a class from outside
    Keras and the suite, another network, or (given ``plan`` and ``kind``) an architecture the
    plan does not build is refused in one line. ``verify=False`` skips the folder's check for a
    caller that has just made it.
    """
    path = Path(model_dir) / which
    if not path.is_file():
        raise LungCTError(path, "model file not found (train first, or wait for a checkpoint)")
    if verify:
        verify_model_dir(model_dir, allow_unfinished=allow_unfinished, stage="gan")
    expected = None
    if plan is not None and kind is not None:
        expected = network_architecture(plan, which, kind)
    return load_keras_model(
        path,
        classes=(NETWORK_CLASSES[which],) if which in NETWORK_CLASSES else None,
        what=f"a CT-GAN {which.split('.')[0]} of this suite",
        architecture=expected,
        plan_path=Path(model_dir) / PLAN_FILE,
    )
