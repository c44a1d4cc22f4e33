"""Class-guided image-to-image diffusion: the network, noise schedules, samplers and the guidance classifier."""
