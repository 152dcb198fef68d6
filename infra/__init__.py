"""gpugate's Pulumi program: one ComponentResource per target, the shared pieces, and the policy pack."""
