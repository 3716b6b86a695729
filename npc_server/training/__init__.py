"""Training: corpus synthesis, tokenizer / vocoder / backbone training stages."""
