"""The plan's network: which Keras class it is, how a plan builds it, how a file is checked.

A plan names its network (:data:`fp_reduction_3dcnn.config.NETWORKS`); training builds it here,
and loading checks a ``.keras`` file against the same plan before Keras reads it: the file must
hold that network's registered class with the settings the plan gives its constructor. A model
folder therefore says which network it is (its ``plan.json``), and prediction, detection and
export open any of them without being told.
"""

from __future__ import annotations

import keras

from fp_reduction_3dcnn.cnn3d import CNN3D
from fp_reduction_3dcnn.config import FPRPlan
from fp_reduction_3dcnn.model import MGICNN
from fp_reduction_3dcnn.resnet3d import ResNet3D

NETWORK_CLASSES = {
    "mgicnn": "fp_reduction_3dcnn>MGICNN",
    "resnet3d": "fp_reduction_3dcnn>ResNet3D",
    "cnn3d": "fp_reduction_3dcnn>CNN3D",
}
"""The registered Keras class a model file of each network must hold."""

_BUILDERS = {"mgicnn": MGICNN, "resnet3d": ResNet3D, "cnn3d": CNN3D}


def build_network(plan: FPRPlan) -> keras.Model:
    """The network a plan describes (not compiled)."""
    return _BUILDERS[plan.network].from_plan(plan)


def network_classes(plan: FPRPlan | None = None) -> tuple[str, ...]:
    """The registered class a model file of ``plan`` must hold (any of them without a plan)."""
    if plan is None:
        return tuple(NETWORK_CLASSES.values())
    return (NETWORK_CLASSES[plan.network],)


def network_description(plan: FPRPlan | None = None) -> str:
    """The model wanted, in words, for a refusal."""
    if plan is None:
        return "a false-positive reducer of this suite"
    article = "an" if plan.network_label[0] in "AEIMO" else "a"
    return f"{article} {plan.network_label} of this suite"


def mgicnn_architecture(plan: FPRPlan) -> dict:
    """The settings the plan gives the MGI-CNN's constructor (:meth:`MGICNN.from_plan`), as
    the model's config spells them: weights saved with other settings do not fit the plan."""
    return {
        "variant": plan.variant,
        "merge": plan.merge,
        "conv": plan.conv,
        "stream_filters": list(plan.stream_filters),
        "stream_top_filters": plan.stream_top_filters,
        "head_filters": plan.head_filters,
        "dense_units": list(plan.dense_units),
        "dropout": plan.dropout,
        "leaky_alpha": plan.leaky_alpha,
        "input_shape": list(plan.input_shape),
    }


def network_architecture(plan: FPRPlan) -> dict:
    """The settings the plan gives its network's constructor, as the model's config spells
    them (compared with a file's config before its weights are read)."""
    if plan.network == "mgicnn":
        return mgicnn_architecture(plan)
    settings = {"block_filters": list(plan.block_filters), "input_shape": list(plan.input_shape)}
    if plan.network == "resnet3d":
        settings["blocks_per_stage"] = plan.blocks_per_stage
    return settings
