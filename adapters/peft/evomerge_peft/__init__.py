"""evomerge-peft: the merge service over Hugging Face PEFT LoRA adapters."""
