"""Training: the DeepSpeed engine, the one training loop, its tasks (LM pretraining, contrastive
retrieval), losses, checkpoints, fault handling and monitoring."""
