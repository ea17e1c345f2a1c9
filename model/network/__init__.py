"""The network: the VAE, its categorical heads, the fused inference layers."""
