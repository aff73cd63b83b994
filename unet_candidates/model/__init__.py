"""Keras models of the candidate stage: 2-D and 3-D U-Nets and the Dice loss."""

from unet_candidates.model.dice_loss import DiceLoss
from unet_candidates.model.unet2d import UNet2D
from unet_candidates.model.unet3d import UNet3D

__all__ = ["DiceLoss", "UNet2D", "UNet3D"]
