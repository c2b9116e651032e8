"""How much memory models need and use: sizes from GGUF metadata, measurements of a
process group (psutil) and of GPUs (NVML)."""
