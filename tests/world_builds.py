"""A model card build for the tests: the world CLIP pretrained for a few steps on first use
(``weights: {build: "world_builds:tiny_world"}``)."""

from vlbench.world.pretrain import PretrainConfig, WorldWeights

tiny_world = WorldWeights(PretrainConfig(steps=3, n_train=256, batch_size=32, warmup=1))
