"""Building the two networks from a plan, and reading a model folder back.

A model folder (``GAN_DIR``) holds::

    plan.json               the GANPlan (every size, rate and paste setting)
    manifest.json           kind, training folds and series, steps done, final losses
    normaliser.npz / .json  histogram equalisation + normalisation (no pickle)
    generator.keras         the in-painting U-Net (load with safe_mode=True)
    discriminator.keras     the PatchGAN
    train_log.csv           step, losses, discriminator accuracy
    grids/step_NNNNNN.png   condition | generated | real, middle slices
    checkpoints/step_NNNNNN/  weights, optimiser states and sampler state for --resume
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from ct_gan_augment.config import GANPlan
from ct_gan_augment.discriminator import PatchDiscriminator
from ct_gan_augment.generator import InpaintingGenerator
from lungct.errors import LungCTError
from lungct.modeldir import verify_model_dir

GENERATOR_FILE = "generator.keras"
DISCRIMINATOR_FILE = "discriminator.keras"
PLAN_FILE = "plan.json"
NORMALISER_FILE = "normaliser.npz"


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


def load_network(model_dir: str | os.PathLike, which: str = GENERATOR_FILE) -> keras.Model:
    """Load ``generator.keras`` (or ``discriminator.keras``) in safe mode."""
    path = Path(model_dir) / which
    if not path.is_file():
        raise LungCTError(path, "model file not found (train first, or wait for a checkpoint)")
    verify_model_dir(model_dir)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except (OSError, ValueError, TypeError) as exc:
        raise LungCTError(path, f"cannot be loaded as a Keras model ({exc})") from None
