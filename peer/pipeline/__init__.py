"""The traditional static pipeline baseline (GPipe / 1F1B over torch.distributed.pipelining)."""
