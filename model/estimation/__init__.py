"""Estimators over the network: IWAE, ELBO and their reductions, the shared points, the proposal
scale, attribution."""
