"""Layers written from scratch, one file per family: forward, backward, named
parameters and gradients (conventions in :mod:`ddp_cnn.layers.base`)."""
from .activations import ELU, LeakyReLU, PReLU, ReLU, Sigmoid, Tanh
from .base import Layer, ParamSpec
from .convolution import Conv2D
from .dense import Dense, Flatten
from .dropout import Dropout
from .loss import SoftmaxCrossEntropy
from .normalization import BatchNorm
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D, MinPool2D, Pool2D

__all__ = ["Layer", "ParamSpec", "Conv2D", "Pool2D", "MaxPool2D", "AvgPool2D", "MinPool2D", "GlobalAvgPool2D",
           "Dense", "Flatten", "Dropout", "BatchNorm", "ReLU", "LeakyReLU", "PReLU", "ELU", "Tanh", "Sigmoid",
           "SoftmaxCrossEntropy"]
