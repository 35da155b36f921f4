"""TAP-PPO: INT8 QAT networks whose record-point activations are approximated by a tri-segment step map."""
