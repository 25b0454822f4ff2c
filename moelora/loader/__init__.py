"""Reading Hugging Face checkpoints: find the folder, open the safetensors lazily, fill the parameters."""
