"""He et al. 2016, CIFAR-10: plain and residual networks of depth 6n+2."""
