"""The CT-GAN as one ``keras.Model``: the generator, the discriminator and their two Adams, with
a ``train_step`` that is one step of the least squares GAN + L1, so ``model.fit`` trains it.

One step updates both networks from one generator pass (as TensorFlow's pix2pix tutorial):

* D: ``0.5 * (mean((D(real, cond) - real_label)^2) + mean((D(fake, cond) - fake_label)^2))``;
* G: ``mean((D(fake, cond) - real_label)^2) + l1_weight * mean(w * |fake - real|)``, where ``w``
  weighs the hole ``l1_hole_weight`` times the context (mean 1; the code's ``w = 1``);

each with its own Adam (``g_learning_rate``, ``d_learning_rate``; the code's D used 1e-6). Both
gradients are taken from the same forward pass, then both optimisers step.

**Replicas.** Under ``tf.distribute.MirroredStrategy`` each replica sees its share of the
global batch and the optimisers sum the replicas' gradients. Keras' own ``train_step`` divides
each replica's mean loss by the number of replicas for that reason
(``keras.src.losses.loss.scale_loss_for_distribution``); this step does the same, so the
update is the one of the global batch's mean loss, and its metrics (``d_loss``, ``g_loss``,
``g_adv``, ``g_l1``, ``d_acc``, ``d_acc_real``, ``d_acc_fake``: Keras ``Mean`` trackers, so an
epoch's log is the epoch's mean) hold the unscaled losses. Batch normalisation keeps each
replica's own batch statistics.

The step is TensorFlow code (``GradientTape``): training needs the TensorFlow backend, the two
networks themselves run inference on any backend.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ct_gan_augment.config import GANPlan

METRICS = ("d_loss", "g_loss", "g_adv", "g_l1", "d_acc", "d_acc_real", "d_acc_fake")
"""What a training step reports, in this order (the columns of the training log)."""


def l1_weights(cube_size: int, hole_size: int, hole_weight: float) -> np.ndarray:
    """The voxel weights of the L1 term, ``(1, c, c, c, 1)`` float32: the hole
    ``hole_weight`` times the context, scaled to mean 1."""
    weight = np.ones((1, cube_size, cube_size, cube_size, 1), np.float32)
    start = (cube_size - hole_size) // 2
    hole = slice(start, start + hole_size)
    weight[:, hole, hole, hole] = hole_weight
    return weight / weight.mean()


@keras.saving.register_keras_serializable(package="ct_gan_augment")
class InpaintingGAN(keras.Model):
    """A generator and a discriminator trained together (see the module docstring).

    Calling the model runs the generator. ``compile(g_optimizer=..., d_optimizer=...)`` takes
    the two optimisers; under ``mixed_float16`` each is wrapped in a ``LossScaleOptimizer``.

    Args:
        generator: the in-painting generator (:class:`ct_gan_augment.generator.InpaintingGenerator`).
        discriminator: the PatchGAN (:class:`ct_gan_augment.discriminator.PatchDiscriminator`).
        real_label: the discriminator's target for real pairs.
        fake_label: its target for generated pairs.
        l1_weight: weight of the L1 term in the generator's loss.
        l1_hole_weight: weight of the hole's voxels in the L1 mean, relative to the context.
        hole_size: edge of the in-painted centre, voxels.
        **kwargs: passed to :class:`keras.Model` (``name``...).

    Example:
        >>> gan = InpaintingGAN.from_plan(plan, "injector")  # doctest: +SKIP
        >>> gan.compile(**InpaintingGAN.plan_optimizers(plan))  # doctest: +SKIP
        >>> gan.fit(batches, epochs=8, shuffle=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        real_label: float = 1.0,
        fake_label: float = 0.0,
        l1_weight: float = 100.0,
        l1_hole_weight: float = 4.0,
        hole_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(generator, dict):  # nested configs, as from_config passes them
            generator = keras.saving.deserialize_keras_object(generator)
        if isinstance(discriminator, dict):
            discriminator = keras.saving.deserialize_keras_object(discriminator)
        self.generator = generator
        self.discriminator = discriminator
        self.real_label = float(real_label)
        self.fake_label = float(fake_label)
        self.l1_weight = float(l1_weight)
        self.l1_hole_weight = float(l1_hole_weight)
        self.hole_size = int(hole_size)
        cube = int(generator.input_shape[1])
        self._l1_weights = l1_weights(cube, self.hole_size, self.l1_hole_weight)
        self.trackers = [keras.metrics.Mean(name=name) for name in METRICS]
        self.g_optimizer: Any = None
        self.d_optimizer: Any = None
        # The two networks are built when made, and so is the pair.
        self.built = True

    # --- building from a plan -------------------------------------------------------------

    @classmethod
    def from_plan(cls, plan: GANPlan, kind: str) -> InpaintingGAN:
        """The plan's freshly initialised pair for ``kind`` (injector or remover)."""
        from ct_gan_augment.model import build_discriminator, build_generator

        return cls(
            build_generator(plan, kind),
            build_discriminator(plan, kind),
            real_label=plan.real_label,
            fake_label=plan.fake_label,
            l1_weight=plan.l1_weight,
            l1_hole_weight=plan.l1_hole_weight,
            hole_size=plan.hole_size,
            name="ct_gan",
        )

    @staticmethod
    def plan_optimizers(plan: GANPlan) -> dict[str, keras.optimizers.Optimizer]:
        """The plan's two Adams, as ``compile`` takes them."""
        return {
            "g_optimizer": keras.optimizers.Adam(
                plan.g_learning_rate, beta_1=plan.beta_1, name="g_adam"
            ),
            "d_optimizer": keras.optimizers.Adam(
                plan.d_learning_rate, beta_1=plan.beta_1, name="d_adam"
            ),
        }

    # --- Keras --------------------------------------------------------------------------------

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.generator(inputs, training=training)

    def compile(
        self,
        g_optimizer: keras.optimizers.Optimizer | str | dict = "adam",
        d_optimizer: keras.optimizers.Optimizer | str | dict = "adam",
        **kwargs: Any,
    ) -> None:
        """Take the generator's and the discriminator's optimisers and build them (their
        variables exist before ``fit``, so ``BackupAndRestore`` can load them); ``kwargs`` go
        to :meth:`keras.Model.compile` (``run_eagerly``, ``jit_compile``...). Call it inside
        the strategy's scope."""
        super().compile(optimizer=None, **kwargs)
        self._loss_tracker = None  # no Keras loss: the step reports its own metrics
        g_optimizer = keras.optimizers.get(g_optimizer)
        d_optimizer = keras.optimizers.get(d_optimizer)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            scaled = keras.optimizers.LossScaleOptimizer
            if not isinstance(g_optimizer, scaled):
                g_optimizer = scaled(g_optimizer, name="g_loss_scale")
            if not isinstance(d_optimizer, scaled):
                d_optimizer = scaled(d_optimizer, name="d_loss_scale")
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def get_compile_config(self) -> dict:
        if self.g_optimizer is None:
            return {}
        return {
            "g_optimizer": keras.saving.serialize_keras_object(self.g_optimizer),
            "d_optimizer": keras.saving.serialize_keras_object(self.d_optimizer),
        }

    def compile_from_config(self, config: dict) -> None:
        self.compile(
            g_optimizer=keras.saving.deserialize_keras_object(config["g_optimizer"]),
            d_optimizer=keras.saving.deserialize_keras_object(config["d_optimizer"]),
        )

    @property
    def metrics(self) -> list:
        return list(self.trackers)

    def train_step(self, data: Any) -> dict:
        """One step on ``(condition, real)``: both networks' losses from one generator pass,
        then one update of each (see the module docstring)."""
        import tensorflow as tf

        condition, real = data[0], data[1]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        real_label, fake_label = self.real_label, self.fake_label
        middle = 0.5 * (real_label + fake_label)
        g_vars = self.generator.trainable_variables
        d_vars = self.discriminator.trainable_variables
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = tf.cast(self.generator(condition, training=True), tf.float32)
            real = tf.cast(real, tf.float32)
            score_real = tf.cast(self.discriminator([real, condition], training=True), tf.float32)
            score_fake = tf.cast(self.discriminator([fake, condition], training=True), tf.float32)
            d_loss = 0.5 * (
                tf.reduce_mean(tf.square(score_real - real_label))
                + tf.reduce_mean(tf.square(score_fake - fake_label))
            )
            g_adv = tf.reduce_mean(tf.square(score_fake - real_label))
            g_l1 = tf.reduce_mean(tf.constant(self._l1_weights) * tf.abs(fake - real))
            g_loss = g_adv + self.l1_weight * g_l1
            # Each replica's share of the global batch's mean (the optimisers sum the replicas'
            # gradients), times the loss scale under mixed precision.
            g_scaled = self.g_optimizer.scale_loss(g_loss / replicas)
            d_scaled = self.d_optimizer.scale_loss(d_loss / replicas)
        g_grads = g_tape.gradient(g_scaled, g_vars)
        d_grads = d_tape.gradient(d_scaled, d_vars)
        self.g_optimizer.apply_gradients(zip(g_grads, g_vars, strict=True))
        self.d_optimizer.apply_gradients(zip(d_grads, d_vars, strict=True))

        if real_label > fake_label:
            said_real, said_fake = score_real > middle, score_fake > middle
        else:
            said_real, said_fake = score_real < middle, score_fake < middle
        acc_real = tf.reduce_mean(tf.cast(said_real, tf.float32))
        acc_fake = tf.reduce_mean(1.0 - tf.cast(said_fake, tf.float32))
        values = {
            "d_loss": d_loss,
            "g_loss": g_loss,
            "g_adv": g_adv,
            "g_l1": g_l1,
            "d_acc": 0.5 * (acc_real + acc_fake),
            "d_acc_real": acc_real,
            "d_acc_fake": acc_fake,
        }
        for tracker in self.trackers:
            tracker.update_state(values[tracker.name])
        return {tracker.name: tracker.result() for tracker in self.trackers}

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "generator": keras.saving.serialize_keras_object(self.generator),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "real_label": self.real_label,
            "fake_label": self.fake_label,
            "l1_weight": self.l1_weight,
            "l1_hole_weight": self.l1_hole_weight,
            "hole_size": self.hole_size,
        }

    @classmethod
    def from_config(cls, config: dict) -> InpaintingGAN:
        return cls(**config)
