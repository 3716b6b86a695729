"""The AQAA backbone: vocabulary layout, text tokenizer, chat template, Llama-style model and streaming generator."""
