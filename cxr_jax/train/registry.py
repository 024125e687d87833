from cxr_jax.registry import Registry

TRAINERS = Registry('trainer')
