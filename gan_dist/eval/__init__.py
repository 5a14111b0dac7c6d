"""Evaluation: FID/KID/IS on the TF-Inception network (torch-fidelity), classifier-based
scores for labelled digit datasets, and PacGAN mode coverage for the 2-D mixtures.
`gan-dist eval` and periodic evaluation during training share gan_dist.eval.run."""
