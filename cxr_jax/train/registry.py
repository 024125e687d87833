from cxr_jax.registry import Registry

TRAINERS = Registry('trainer')
# Trainer name -> check(config) raising ValueError for what is wrong with a config before
# anything runs; a chain runs every stage's check before its first stage starts.
CONFIG_CHECKS = Registry('config check')
