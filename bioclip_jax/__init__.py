"""bioclip_jax: BioCLIP (a CLIP for the tree of life) in JAX/Flax."""
