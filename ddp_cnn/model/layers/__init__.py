"""Layers written from scratch, one file per family: forward, backward, named
parameters and gradients (conventions in :mod:`ddp_cnn.model.layers.base`)."""
from ddp_cnn.model.layers.activations import ELU, LeakyReLU, PReLU, ReLU, Sigmoid, Tanh
from ddp_cnn.model.layers.base import Layer, ParamSpec
from ddp_cnn.model.layers.convolution import Conv2D
from ddp_cnn.model.layers.dense import Dense, Flatten
from ddp_cnn.model.layers.dropout import Dropout
from ddp_cnn.model.layers.loss import SoftmaxCrossEntropy
from ddp_cnn.model.layers.normalization import BatchNorm
from ddp_cnn.model.layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D, MinPool2D, Pool2D

__all__ = ["Layer", "ParamSpec", "Conv2D", "Pool2D", "MaxPool2D", "AvgPool2D", "MinPool2D", "GlobalAvgPool2D",
           "Dense", "Flatten", "Dropout", "BatchNorm", "ReLU", "LeakyReLU", "PReLU", "ELU", "Tanh", "Sigmoid",
           "SoftmaxCrossEntropy"]
