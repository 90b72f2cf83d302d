"""Training: tokenizer training, data preparation, pretraining, supervised fine-tuning,
LoRA/QLoRA and DPO, on one process or many (torchrun)."""
