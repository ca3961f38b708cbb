"""Data-parallel training on Horovod and tf.distribute."""
