"""The latent prior: the energy MLP, the reference densities p0 and the Langevin sampler drawing from them."""
